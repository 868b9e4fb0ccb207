"""The plan of a ``camphive compare`` run: every check that runs before any work starts (the
criteria and targets, each criterion's pruning options at each target, the tensorboard writer,
the checkpoint, the data and the model), and the settings a resumed run must share.
"""
from __future__ import annotations

from dataclasses import dataclass

import yaml

from camphive import data as datasets
from camphive.checkpoints import load_checkpoint
from camphive.devices import resolve_device
from camphive.errors import ConfigError
from camphive.jobs.common import check_input_shape, checkpoint_dataset, load_splits, seed_everything
from camphive.jobs.compare_options import (
    check_model,
    check_plan,
    check_tensorboard,
    layer_lists,
    parse_list,
    parse_options,
)
from camphive.jobs.compare_runs import jsonable, prune_options_for
from camphive.pruning.settings import check_prune_settings
from camphive.runs import RunFolder

# Settings that may change between a run and its resume without changing its results.
RESUMABLE_CHANGES = {"out", "overwrite", "resume", "tensorboard", "device", "num_workers", "config_file"}


@dataclass
class Plan:
    """What a compare run does, checked: ``settings`` as ``config.yaml`` records them."""

    settings: dict
    stored: object  # the dense checkpoint loaded, or None (train one)
    splits: object
    device: object
    recalibrate_bn: bool  # whether pruning re-estimates BatchNorm statistics (of any criterion)
    test_loader: object


def make_plan(settings: dict) -> Plan:
    """Check the options in ``settings`` (compare_job's keywords), load the checkpoint and the data;
    one ConfigError line on the first problem, before any training or any file written."""
    criteria, targets, target_kind = check_plan(settings["mode"], settings["criteria"], settings["sparsities"],
                                                settings["macs_ratios"])
    settings.update(criteria=criteria, targets=targets, target_kind=target_kind,
                    dataset_options=parse_options(settings["dataset_options"], "dataset-options"),
                    prune_options=layer_lists(parse_options(settings["prune_options"], "prune-options")),
                    camp_hive_options=layer_lists(parse_options(settings["camp_hive_options"], "camp-hive-options")),
                    latency_batch_sizes=parse_list(settings["latency_batch_sizes"], int, "latency-batch-sizes"))
    _check_run_options(settings)
    recalibrate_bn = _check_prune_options(settings)
    stored, dataset, model = _dense_source(settings)
    device = resolve_device(settings["device"])
    seed_everything(settings["seed"])
    splits = load_splits(dataset, settings["data_root"], **settings["dataset_options"])
    if stored is not None:
        check_input_shape(stored.metadata, splits.test, settings["checkpoint"], dataset)
    check_model(stored.model if stored is not None else None, model, splits, settings["prune_options"],
                settings["camp_hive_options"], spectrum_top_k=settings["spectrum_top_k"],
                spectrum_max_iter=settings["spectrum_max_iter"])
    test_loader = datasets.loader(splits.test, batch_size=max(settings["batch_size"], 256),
                                  subset=settings["test_subset"], num_workers=settings["num_workers"], device=device)
    settings.update(dataset=splits.name, model=model,
                    sparsities=parse_list(settings["sparsities"], float, "sparsities"),
                    macs_ratios=parse_list(settings["macs_ratios"], float, "macs-ratios"))
    return Plan(settings=settings, stored=stored, splits=splits, device=device, recalibrate_bn=recalibrate_bn,
                test_loader=test_loader)


def _check_run_options(settings: dict) -> None:
    sizes = settings["latency_batch_sizes"]
    if settings["mode"] == "structured" and settings["latency"] and (not sizes or min(sizes) < 1):
        raise ConfigError(f"--latency-batch-sizes must be positive integers such as 1,64, got {sizes}")
    if settings["tensorboard"]:
        check_tensorboard()
    if settings["finetune_epochs"] < 0 or settings["dense_epochs"] < 0:
        raise ConfigError(f"epochs must be >= 0, got dense {settings['dense_epochs']}, "
                          f"fine-tune {settings['finetune_epochs']}")


def _check_prune_options(settings: dict) -> bool:
    """Every criterion's options at every target, before any training; whether any re-estimates BatchNorm."""
    recalibrate = False
    for criterion in settings["criteria"]:
        for target in settings["targets"]:
            options = prune_options_for(criterion, target, settings)
            try:
                checked = check_prune_settings(settings["mode"], criterion, options.pop("sparsity", None),
                                               options.pop("target_macs_ratio", None), options)
            except ConfigError as error:
                raise ConfigError(f"{criterion} at {settings['target_kind']} {target:g}: {error}") from error
            recalibrate = recalibrate or bool(checked.recalibrate_bn)
    return recalibrate


def _dense_source(settings: dict) -> tuple[object, str, str]:
    """The checkpoint (or None), and the dataset and model name: the checkpoint's when one is given."""
    dataset, model = settings["dataset"], settings["model"]
    stored = load_checkpoint(settings["checkpoint"]) if settings["checkpoint"] else None
    if stored is not None:
        recorded_name, recorded_options = checkpoint_dataset(stored.metadata, dataset, settings["checkpoint"])
        dataset = recorded_name
        settings["dataset_options"] = settings["dataset_options"] or recorded_options
        model = (stored.metadata.get("arch") or {}).get("name", model)
    return stored, dataset or "fashion-mnist", model  # neither --dataset nor a checkpoint names one: the default


def check_resume(run: RunFolder, settings: dict) -> None:
    """A resumed run's settings are the ones it started with (but for :data:`RESUMABLE_CHANGES`)."""
    path = run.file("config.yaml")
    if not path.is_file():
        return
    before = yaml.safe_load(path.read_text()) or {}
    now = yaml.safe_load(yaml.safe_dump(jsonable(settings)))
    changed = sorted(key for key in now if key not in RESUMABLE_CHANGES and key in before and before[key] != now[key])
    if changed:
        raise ConfigError(f"--resume in {run.path} with different settings ({', '.join(changed)}: "
                          f"{before[changed[0]]!r} before, {now[changed[0]]!r} now); use the same settings or a new --out")
