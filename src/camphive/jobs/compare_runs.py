"""The per-criterion runs of ``camphive compare``: each (criterion, target) prunes a copy of the
dense model, is evaluated, fine-tuned and evaluated again, and becomes one row of
``rows.jsonl`` as soon as it is done (what ``resume`` skips); in structured mode, the dense
model and every pruned model of a target are then timed together.
"""
from __future__ import annotations

import copy
import json

from camphive.errors import CamphiveError
from camphive.jobs.common import seed_everything
from camphive.jobs.compare_options import Scalars
from camphive.measure.latency import LATENCY_COLUMNS, compare_latency, latency_columns
from camphive.pruning import prune
from camphive.report import METHOD
from camphive.runs import RunFolder, atomic_write_text, timestamp
from camphive.sparse_format import dense_checkpoint_bytes, sparse_file_bytes
from camphive.training import evaluate, finetune


def jsonable(value):
    return json.loads(json.dumps(value, default=lambda item: item.item() if hasattr(item, "item") else str(item)))


def prune_options_for(criterion: str, target: float, settings: dict) -> dict:
    """The keyword options :func:`camphive.prune` gets for ``criterion`` at ``target``."""
    # The dense model's spectrum is measured once for all criteria (spectrum.json); the sharpness of every
    # pruned model costs two eigen-solves per run, so it is measured only when asked (spectrum_top_k=1,
    # unstructured; prune()'s default is 0).
    options = dict(settings["prune_options"])
    if criterion == METHOD:
        options.update(settings["camp_hive_options"])
        if settings["cycles"]:
            options["cycles"] = settings["cycles"]
    if settings["target_kind"] == "macs_ratio":
        options["target_macs_ratio"] = target
    else:
        options["sparsity"] = target
    if settings["mode"] == "structured":
        options["measure_latency"] = False  # timed here, every criterion of a target with the dense model at once
    return options


def _row_key(criterion: str, target: float) -> str:
    return f"{criterion}@{float(target):.6g}"


def finished_rows(run: RunFolder) -> dict:
    """The rows a stopped run finished, by (criterion, target)."""
    path = run.file("rows.jsonl")
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {_row_key(row["criterion"], row["target"]): row for row in rows}


def _write_rows(run: RunFolder, rows: list[dict]) -> None:
    run.keep()  # finished rows are what --resume skips: never discarded once written
    atomic_write_text(run.file("rows.jsonl"), "".join(json.dumps(jsonable(row)) + "\n" for row in rows))


class CriterionRuns:
    """Every (criterion, target) of the plan from one dense model, with the same calibration
    batches, seed and fine-tuning data for all."""

    def __init__(self, run: RunFolder, settings: dict, dense_model, dense_masks, calib, test_loader, finetune_loader,
                 device, scalars: Scalars, log):
        self.run, self.settings, self.device, self.scalars, self.log = run, settings, device, scalars, log
        self.dense_model, self.dense_masks = dense_model, dense_masks
        self.calib, self.test_loader, self.finetune_loader = calib, test_loader, finetune_loader

    def all_rows(self) -> list[dict]:
        """Run every row not already done (``resume``), target by target; the rows in plan order."""
        settings = self.settings
        done = finished_rows(self.run) if settings["resume"] else {}
        rows = []
        for step, target in enumerate(settings["targets"]):
            pruned_models = {}
            for criterion in settings["criteria"]:
                if _row_key(criterion, target) in done:
                    rows.append(done[_row_key(criterion, target)])
                    continue
                row, pruned_models[criterion] = self.one(criterion, target, step)
                rows.append(row)
                _write_rows(self.run, rows)
                self.log.info("%s at %s %g: %.4f after pruning, %s after fine-tuning", criterion,
                              settings["target_kind"], target, row["pruned"],
                              "–" if row["finetuned"] is None else f"{row['finetuned']:.4f}")
            if settings["mode"] == "structured" and settings["latency"] and pruned_models:
                self.time_target(target, pruned_models, rows)
                _write_rows(self.run, rows)
        return rows

    def time_target(self, target: float, pruned_models: dict, rows: list[dict]) -> None:
        """CPU latency of the dense model and every model pruned at ``target``, timed interleaved in one
        run so machine noise falls on all alike; into their rows (``latency`` and its flat columns)."""
        settings = self.settings
        sizes = settings["latency_batch_sizes"]
        records = compare_latency({"dense": self.dense_model, **pruned_models}, tuple(self.calib[0][0].shape[1:]),
                                  batch_sizes=sizes, target_seconds=settings["latency_seconds"],
                                  channels_last=settings["latency_channels_last"],
                                  compiled=settings["latency_compiled"])
        for row in rows:
            if row["target"] == target and row["criterion"] in records:
                record = records[row["criterion"]]
                row.update(latency_columns(record, sizes[0]), latency=record)

    def one(self, criterion: str, target: float, step: int) -> tuple[dict, object]:
        """Prune a copy of the dense model with one criterion, evaluate, fine-tune, evaluate: (row, pruned model)."""
        settings, device = self.settings, self.device
        event = self._event_log(criterion, target)
        seed = settings["seed"]
        seed_everything(seed)
        model = copy.deepcopy(self.dense_model)
        options = prune_options_for(criterion, target, settings)
        sparsity = options.pop("sparsity", None)
        try:
            # The example (for MACs and tracing) on the model's device: MACs are counted by running the model on it.
            result = prune(model, self.calib, sparsity, mode=settings["mode"], criterion=criterion, seed=seed,
                           masks=self.dense_masks or None, example_inputs=self.calib[0][0][:1].to(device), **options)
        except CamphiveError as error:
            raise type(error)(f"{criterion} at {settings['target_kind']} {target:g}: {error}") from error
        pruned = evaluate(model, self.test_loader, device=device)
        event("pruned", accuracy=pruned["accuracy"], top5=pruned["top5"], sparsity=result.sparsity,
              seconds=result.seconds, num_hvps=result.num_hvps)
        self.scalars.add(f"{criterion}/pruned_accuracy", pruned["accuracy"], step)
        finetuned, history, finetune_seconds = None, [], 0.0
        if settings["finetune_epochs"]:
            history, finetune_seconds = self._finetune(model, result.masks, event)
            finetuned = evaluate(model, self.test_loader, device=device)
            event("finetuned", accuracy=finetuned["accuracy"], top5=finetuned["top5"], seconds=finetune_seconds)
            self.scalars.add(f"{criterion}/finetuned_accuracy", finetuned["accuracy"], step)
        # What the final model costs on disk: the compressed file (bitmask + values) of an unstructured
        # model, the checkpoint of a structured one (its channels are gone).
        file_bytes = (sparse_file_bytes(model, masks=result.masks or None) if settings["mode"] == "unstructured"
                      else dense_checkpoint_bytes(model))
        return _row(criterion, target, result, pruned, finetuned, history, finetune_seconds, file_bytes), model

    def _finetune(self, model, masks, event) -> tuple[list, float]:
        settings = self.settings

        def on_epoch_end(record, _state) -> None:
            event("finetune_epoch", epoch=record.epoch, train_loss=record.train_loss,
                  train_accuracy=record.train_accuracy, test_accuracy=record.test_accuracy, seconds=record.seconds)

        seed_everything(settings["seed"])
        trained = finetune(model, self.finetune_loader, settings["finetune_epochs"], masks=masks or None,
                           lr=settings["finetune_lr"], momentum=settings["momentum"], nesterov=settings["nesterov"],
                           weight_decay=settings["weight_decay"], schedule=settings["finetune_schedule"],
                           eval_data=self.test_loader if settings["finetune_epochs"] > 1 else None, device=self.device,
                           seed=settings["seed"], amp=settings["amp"], on_epoch_end=on_epoch_end)
        return trained.to_dict()["history"], trained.seconds

    def _event_log(self, criterion: str, target: float):
        """``event(kind, **values)``: one line appended to ``logs/<criterion>.jsonl`` (rank 0 only)."""
        run = self.run
        log_path = run.file(f"logs/{criterion}.jsonl")
        if run.writer:
            log_path.parent.mkdir(exist_ok=True)

        def event(kind: str, **values) -> None:
            if not run.writer:
                return
            with log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(jsonable({"event": kind, "criterion": criterion, "target": target,
                                                  "time": timestamp(), **values})) + "\n")
        return event


def _row(criterion, target, result, pruned, finetuned, history, finetune_seconds, file_bytes) -> dict:
    before, after = result.before, result.after
    structured = result.mode == "structured"
    macs_after = after["macs"] if structured else after["macs_nonzero"]
    details = result.to_dict()
    details.pop("layer_sparsity", None)
    return {
        "criterion": criterion, "target": float(target), "sparsity": result.sparsity,
        "parameters": after["parameters"] if structured else after["nonzero_parameters"],
        "macs": macs_after, "macs_ratio": before["macs"] / max(macs_after, 1),
        "pruned": pruned["accuracy"], "pruned_top5": pruned["top5"], "pruned_loss": pruned["loss"],
        "finetuned": finetuned["accuracy"] if finetuned else None,
        "finetuned_top5": finetuned["top5"] if finetuned else None,
        "finetuned_loss": finetuned["loss"] if finetuned else None, "file_bytes": file_bytes,
        **dict.fromkeys(LATENCY_COLUMNS),
        "sharpness_after": (result.extra.get("sharpness", {}).get("after") or [None])[0],
        "num_hvps": result.num_hvps, "curvature_seconds": result.curvature_seconds, "prune_seconds": result.seconds,
        "finetune_seconds": finetune_seconds,
        "layer_sparsity": result.layer_sparsity, "finetune_history": history, "prune": details,
    }
