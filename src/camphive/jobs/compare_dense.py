"""The dense stage of ``camphive compare``: the dense model every criterion starts from (a
checkpoint's, or trained here, resumably), its accuracy as trained and, as the pruned models
get it, with BatchNorm re-estimated on the calibration images, its size and its Hessian
spectrum.
"""
from __future__ import annotations

import copy
import json

import torch
from torch import nn

from camphive import data as datasets
from camphive.checkpoints import load_checkpoint, load_training_state, save_checkpoint, save_training_state
from camphive.jobs.common import checkpoint_metadata, model_for, seed_everything
from camphive.jobs.compare_options import Scalars
from camphive.jobs.compare_report import RECALIBRATED
from camphive.pruning.core.batchnorm import recalibrate_batchnorm
from camphive.runs import RunFolder, atomic_write_text
from camphive.training import TrainState, evaluate, train

DENSE_STATE = "dense_state.pt"


def dense_model(run: RunFolder, stored, model_name: str, splits, settings: dict, log, scalars: Scalars):
    """The dense model every criterion starts from: the checkpoint's, the one this run already
    trained (``resume``), or one trained now, resumably (state saved each epoch)."""
    dense_path = run.file("dense.safetensors")
    if stored is not None:
        save_checkpoint(dense_path, stored.model, stored.masks or None,
                        **{key: value for key, value in stored.metadata.items() if key not in ("format", "arch")})
        return stored.model, stored.masks or {}, {"checkpoint": str(settings["checkpoint"])}
    done_path = run.file("dense_train.json")
    if settings["resume"] and dense_path.is_file() and done_path.is_file():
        log.info("reusing the dense model trained by this run")
        return load_checkpoint(dense_path).model, {}, json.loads(done_path.read_text())
    seed_everything(settings["seed"])
    network = model_for(model_name, splits)
    loader = datasets.loader(splits.train, batch_size=settings["batch_size"], train=True, seed=settings["seed"],
                             subset=settings["train_subset"], random_subset=settings["train_subset"] is not None,
                             num_workers=settings["num_workers"], device=settings["device"])
    metadata = checkpoint_metadata(splits, seed=settings["seed"])
    state = None
    if settings["resume"] and run.file(DENSE_STATE).is_file():
        saved = load_training_state(run.file(DENSE_STATE))
        network.load_state_dict(saved["model"])
        state = TrainState(epoch=saved["epoch"], optimizer=saved["optimizer"], scheduler=saved["scheduler"],
                           history=json.loads(saved["history"]))
        log.info("resuming dense training at epoch %d", state.epoch)

    def on_epoch_end(record, train_state: TrainState) -> None:
        run.keep()  # a trained epoch is what --resume continues from: never discarded once written
        save_training_state(run.file(DENSE_STATE), {
            "model": network.state_dict(), "epoch": train_state.epoch, "optimizer": train_state.optimizer,
            "scheduler": train_state.scheduler, "history": json.dumps(train_state.history)})
        atomic_write_text(run.file("dense_metrics.jsonl"), "".join(json.dumps(row) + "\n" for row in train_state.history))
        scalars.add("dense/train_loss", record.train_loss, record.epoch)
        scalars.add("dense/train_accuracy", record.train_accuracy, record.epoch)
        log.info("dense epoch %d: loss %.4f train acc %.4f (%.1fs)", record.epoch, record.train_loss,
                 record.train_accuracy, record.seconds)

    result = train(network, loader, settings["dense_epochs"], lr=settings["dense_lr"], momentum=settings["momentum"],
                   nesterov=settings["nesterov"], weight_decay=settings["weight_decay"],
                   schedule=settings["dense_schedule"], warmup_epochs=settings["dense_warmup_epochs"],
                   label_smoothing=settings["label_smoothing"], device=settings["device"], seed=settings["seed"],
                   amp=settings["amp"], state=state, on_epoch_end=on_epoch_end)
    summary = result.to_dict()
    save_checkpoint(dense_path, network, epoch=settings["dense_epochs"], train=summary, **metadata)
    atomic_write_text(done_path, json.dumps(summary))
    return network, {}, summary


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
               for module in model.modules())


def dense_accuracy(model: nn.Module, test_loader, calib, recalibrate_bn: bool, device, log) -> dict:
    """The dense model's test metrics as trained and, on a copy, with BatchNorm re-estimated on the
    calibration batches as pruning does (``recalibrated``; None without BatchNorm), and which of
    the two is the reference the pruned models are read against (``reference``,
    ``reference_accuracy``): the re-estimated one when pruning re-estimates (``recalibrate_bn``)."""
    as_trained = evaluate(model, test_loader, device=device)
    recalibrated = None
    if _has_batchnorm(model):
        copied = copy.deepcopy(model)
        cuda = [parameter.device for parameter in copied.parameters() if parameter.device.type == "cuda"][:1]
        with torch.random.fork_rng(devices=cuda):  # dropout in train mode draws: leave the seeded stream as it was
            recalibrate_batchnorm(copied, calib, reduce_over_processes=True)  # as the pruning driver does
        recalibrated = evaluate(copied, test_loader, device=device)
    use_recalibrated = recalibrate_bn and recalibrated is not None
    reference = recalibrated if use_recalibrated else as_trained
    if recalibrated is None:
        log.info("dense accuracy %.4f", as_trained["accuracy"])
    else:
        log.info("dense accuracy %.4f as trained, %.4f with %s", as_trained["accuracy"], recalibrated["accuracy"],
                 RECALIBRATED)
    return {**as_trained, "recalibrated": recalibrated, "reference": "recalibrated" if use_recalibrated else "as trained",
            "reference_accuracy": reference["accuracy"], "reference_top5": reference["top5"]}


def dense_size(model, calib) -> dict:
    from camphive.measure import model_summary
    from camphive.sparse_format import dense_checkpoint_bytes

    summary = model_summary(model, calib[0][0][:1].to(next(model.parameters()).device))
    return {"parameters": summary["parameters"], "macs": summary["macs"], "macs_conv_linear": summary["macs_conv_linear"],
            "file_bytes": dense_checkpoint_bytes(model)}


def dense_spectrum(run: RunFolder, model, calib, top_k: int, max_iter: int, seed: int, log) -> dict | None:
    """Top ``top_k`` loss-Hessian eigenvalues of the dense model on the calibration batches."""
    if top_k < 1:
        return None
    if run.file("spectrum.json").is_file() and run.file("convergence.png").is_file():
        return run.read_json("spectrum.json")
    from camphive.curvature import plot_convergence, spectrum

    result = spectrum(model, calib, top_k=top_k, per_layer=False, trace_probes=0, max_iter=max_iter, seed=seed)
    plot_convergence(result, run.file("convergence.png"))
    data = result.to_dict()
    run.write_json("spectrum.json", data)
    log.info("dense spectrum: %s (%d products, %.1fs)", data["global"].get("eigenvalues"), data["num_matvecs"],
             data["wall_time_s"])
    return data
