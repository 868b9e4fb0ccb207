"""``camphive prune`` and ``camphive compare``: the commands that prune.

Their options that configure pruning are generated from the settings classes' fields
(:mod:`camphive.cli.settings_options`); the others (paths, data, epochs, device, ...) are
declared here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from camphive.cli.common import ConfigOption, DeviceOption, app, echo_metrics
from camphive.cli.settings_options import setting_fields, settings_options, settings_values, switch
from camphive.pruning.settings import SETTINGS

# Help panels (each command gives their order). A generated option names its panel, one of these titles, in its
# field's metadata.
PRUNING_PANEL = "Pruning"
CAMP_HIVE_PANEL = "CAMP-HiVe"
STRUCTURED_PANEL = "Structured"
LATENCY_PANEL = "Latency (structured)"
DATA_PANEL = "Data"
TRAINING_PANEL = "Training (dense and fine-tuning)"
DENSE_PANEL = "Dense training"
FINETUNE_PANEL = "Fine-tuning"
SPECTRUM_PANEL = "Spectrum"
OUTPUT_PANEL = "Output"

# prune takes every settings field as an option but num_batches: its calibration set is --calib-samples images.
PRUNE_SETTINGS = setting_fields(SETTINGS.values(), exclude=("num_batches",))
# compare takes these; every other setting goes in --prune-options (all criteria) or --camp-hive-options.
COMPARE_SETTINGS = setting_fields(SETTINGS.values(), only=("cycles", "latency_batch_sizes", "latency_seconds",
                                                           "latency_channels_last", "latency_compiled"))


@app.command("prune")
@settings_options(PRUNE_SETTINGS, panels=(PRUNING_PANEL, CAMP_HIVE_PANEL, STRUCTURED_PANEL, LATENCY_PANEL, DATA_PANEL,
                                          FINETUNE_PANEL, OUTPUT_PANEL))
def prune_command(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., help="model.safetensors to prune (from camphive train)."),
    mode: str = typer.Option("unstructured", help="unstructured (masks) or structured (channels removed).",
                             rich_help_panel=PRUNING_PANEL),
    dataset: Optional[str] = typer.Option(None, help="Default: the dataset recorded in the checkpoint.",
                                          rich_help_panel=DATA_PANEL),
    data_root: Optional[str] = typer.Option(None, help="Dataset folder (default: the dataset's usual place).",
                                            rich_help_panel=DATA_PANEL),
    calib_samples: int = typer.Option(1024, min=1, help="Calibration images drawn from the training split.",
                                      rich_help_panel=DATA_PANEL),
    finetune_epochs: int = typer.Option(0, min=0, help="Fine-tuning epochs after pruning.",
                                        rich_help_panel=FINETUNE_PANEL),
    finetune_lr: float = typer.Option(0.01, help="Fine-tuning learning rate.", rich_help_panel=FINETUNE_PANEL),
    train_subset: Optional[int] = typer.Option(None, help="Fine-tune on N random training samples (default: all).",
                                               rich_help_panel=FINETUNE_PANEL),
    pruning_steps: Optional[int] = typer.Option(None, help="--schedule gradual: pruning steps over the first 80% "
                                                "of fine-tuning (default: 10).", rich_help_panel=FINETUNE_PANEL),
    out: Path = typer.Option(Path("runs/prune"), help="Run folder to write.", rich_help_panel=OUTPUT_PANEL),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder.", rich_help_panel=OUTPUT_PANEL),
    resume: bool = typer.Option(False, help="Continue the stopped run in --out (after its last saved cycle or "
                                "epoch).", rich_help_panel=OUTPUT_PANEL),
    device: str = DeviceOption,
    seed: int = typer.Option(0, help="Seed of every random choice."),
    config: Optional[Path] = ConfigOption,
    **settings,
):
    """Prune a checkpoint with CAMP-HiVe (or a baseline), optionally fine-tune, write the pruned checkpoint."""
    from camphive.jobs.prune import prune_job

    options = settings_values(ctx, PRUNE_SETTINGS, settings)
    # The job takes the criterion and the targets as arguments of its own, the other settings as its options.
    criterion = options.pop("criterion", PRUNE_SETTINGS["criterion"].default)
    results = prune_job(checkpoint=checkpoint, out=out, sparsity=options.pop("sparsity", None), mode=mode,
                        criterion=criterion, target_macs_ratio=options.pop("target_macs_ratio", None), dataset=dataset,
                        data_root=data_root, calib_samples=calib_samples, finetune_epochs=finetune_epochs,
                        finetune_lr=finetune_lr, train_subset=train_subset, device=device, seed=seed,
                        overwrite=overwrite, resume=resume, options=options, pruning_steps=pruning_steps)
    summary = {"dense accuracy": results["dense"]["accuracy"]}
    if results["pruned"]:  # a gradual run has no model "right after pruning"
        summary["pruned accuracy"] = results["pruned"]["accuracy"]
    summary["channels removed" if mode == "structured" else "sparsity"] = results["prune"]["sparsity"]
    if results["finetuned"]:
        summary["fine-tuned accuracy"] = results["finetuned"]["accuracy"]
    if results["prune"].get("dense_layers"):
        summary["left dense (no N:M layout)"] = ", ".join(results["prune"]["dense_layers"])
    if mode == "structured":
        summary.update(structured_summary(results["prune"]))
    echo_metrics(f"{criterion} ({mode}) -> {out}", summary)


def structured_summary(prune: dict) -> dict:
    """What a structured run bought: the MACs reduction (and whether its target was reached), the channel
    rounding it used (the default depends on the CPU) and the measured speed-up at each batch size."""
    summary = {"MACs reduction": f"{prune['macs_ratio']:.2f}x"}
    target = prune.get("target_macs_ratio")
    if target and not prune.get("target_reached", True):
        summary["MACs reduction"] += f" (target {target:g}x not reached)"
    config = prune.get("config", {})
    if (config.get("round_to") or 1) > 1:
        groups = f" in groups of >= {config['round_min_group']} channels" if config.get("round_min_group") else ""
        summary["channel counts"] = f"multiples of {config['round_to']}{groups} (--round-to)"
    allocation = prune.get("latency_allocation")
    if allocation:
        summary["latency-aware rounding"] = latency_rounding_summary(allocation)
    from camphive.measure.latency import latency_columns

    timed = [(size, latency_columns(prune.get("latency"), size)["speedup"]) for size in
             config.get("latency_batch_sizes") or ()]
    speedups = [f"{speedup:.2f}x at batch {size}" for size, speedup in timed if speedup is not None]
    if speedups:
        summary["speed-up"] = ", ".join(speedups)
    return summary


def latency_rounding_summary(allocation: dict) -> str:
    """One line on what the latency-aware rounding did (--no-latency-aware turns it off)."""
    if allocation.get("kept_uniform_because"):
        return f"not used: {allocation['kept_uniform_because']}"
    runtime = allocation.get("runtime", "torch")
    where = f" in {runtime}," if runtime != "torch" else ""
    timed = f"{allocation['timed_shapes']} layer shapes timed{where} in {allocation['timing_seconds']:.1f} s"
    if not allocation.get("changed_groups"):
        return f"the uniform rounding was the fastest ({timed})"
    return (f"{allocation['changed_groups']} groups rounded the other way, predicted "
            f"{allocation['predicted_speedup_over_uniform']:.2f}x faster than uniform ({timed})")


@app.command("compare")
@settings_options(COMPARE_SETTINGS, panels=(DATA_PANEL, PRUNING_PANEL, TRAINING_PANEL, DENSE_PANEL, FINETUNE_PANEL,
                                            LATENCY_PANEL, SPECTRUM_PANEL, OUTPUT_PANEL),
                  notes={"cycles": "CAMP-HiVe only"})
def compare_command(
    ctx: typer.Context,
    model: str = typer.Option("small-cnn", help="Architecture to train when no --checkpoint is given.",
                              rich_help_panel=DATA_PANEL),
    checkpoint: Optional[Path] = typer.Option(None, help="Dense model.safetensors to start from (default: train "
                                              "one).", rich_help_panel=DATA_PANEL),
    dataset: Optional[str] = typer.Option(None, help="fashion-mnist (default), cifar10, cifar100, imagenet or "
                                          "synthetic; with --checkpoint, the one it records.",
                                          rich_help_panel=DATA_PANEL),
    data_root: Optional[str] = typer.Option(None, help="Dataset folder (default: the dataset's usual place).",
                                            rich_help_panel=DATA_PANEL),
    dataset_options: Optional[str] = typer.Option(None, help="key=value,... e.g. num_classes=100,shape=3x32x32 "
                                                  "(synthetic).", rich_help_panel=DATA_PANEL),
    calib_samples: int = typer.Option(1024, min=1, help="Calibration images drawn from the training split.",
                                      rich_help_panel=DATA_PANEL),
    calib_batch_size: int = typer.Option(128, min=1, rich_help_panel=DATA_PANEL),
    test_subset: Optional[int] = typer.Option(None, help="Evaluate on the first N test samples (default: all).",
                                              rich_help_panel=DATA_PANEL),
    num_workers: int = typer.Option(0, min=0, help="DataLoader worker processes.", rich_help_panel=DATA_PANEL),
    criteria: Optional[str] = typer.Option(None, show_default=False, help="Comma-separated criteria (default: "
                                           "camp-hive, magnitude, wanda, sparsegpt, taylor, obd, hutchinson, "
                                           "random; structured: without wanda and sparsegpt).",
                                           rich_help_panel=PRUNING_PANEL),
    sparsities: str = typer.Option("0.5,0.8,0.9", help="Comma-separated sparsities (weights, or channels if "
                                   "structured).", rich_help_panel=PRUNING_PANEL),
    mode: str = typer.Option("unstructured", help="unstructured (masks) or structured (channels removed).",
                             rich_help_panel=PRUNING_PANEL),
    macs_ratios: Optional[str] = typer.Option(None, help="Structured: MACs reductions instead of sparsities, e.g. "
                                              "1.5,2,3.", rich_help_panel=PRUNING_PANEL),
    prune_options: Optional[str] = typer.Option(None, help="key=value,... for every criterion (see camphive.prune), "
                                                "e.g. spectrum_top_k=1 for the pruned models' sharpness.",
                                                rich_help_panel=PRUNING_PANEL),
    camp_hive_options: Optional[str] = typer.Option(None, help="key=value,... for CAMP-HiVe only (score, merge, "
                                                    "...).", rich_help_panel=PRUNING_PANEL),
    batch_size: int = typer.Option(128, min=1, rich_help_panel=TRAINING_PANEL),
    momentum: float = typer.Option(0.9, rich_help_panel=TRAINING_PANEL),
    nesterov: bool = typer.Option(True, rich_help_panel=TRAINING_PANEL),
    weight_decay: float = typer.Option(5e-4, rich_help_panel=TRAINING_PANEL),
    label_smoothing: float = typer.Option(0.0, rich_help_panel=TRAINING_PANEL),
    train_subset: Optional[int] = typer.Option(None, help="Dense training and fine-tuning on N random samples "
                                               "(default: all).", rich_help_panel=TRAINING_PANEL),
    amp: bool = typer.Option(False, help="bfloat16 autocast on CUDA.", rich_help_panel=TRAINING_PANEL),
    dense_epochs: int = typer.Option(10, min=0, help="Dense training epochs (without --checkpoint).",
                                     rich_help_panel=DENSE_PANEL),
    dense_lr: float = typer.Option(0.1, rich_help_panel=DENSE_PANEL),
    dense_schedule: str = typer.Option("cosine", help="cosine, step or constant.", rich_help_panel=DENSE_PANEL),
    dense_warmup_epochs: float = typer.Option(0.0, rich_help_panel=DENSE_PANEL),
    finetune_epochs: int = typer.Option(1, min=0, help="Fine-tuning epochs after pruning.",
                                        rich_help_panel=FINETUNE_PANEL),
    finetune_lr: float = typer.Option(0.01, rich_help_panel=FINETUNE_PANEL),
    finetune_schedule: str = typer.Option("cosine", help="cosine, step or constant.", rich_help_panel=FINETUNE_PANEL),
    finetune_subset: Optional[int] = typer.Option(None, help="Fine-tuning alone on N random samples (default: "
                                                  "all).", rich_help_panel=FINETUNE_PANEL),
    latency: Optional[bool] = typer.Option(None, "--latency", help="Time dense and pruned models (CPU, "
                                           "interleaved; default).", rich_help_panel=LATENCY_PANEL),
    no_latency: bool = typer.Option(False, "--no-latency", help="Skip the timing.", rich_help_panel=LATENCY_PANEL),
    spectrum_top_k: int = typer.Option(3, min=0, help="Top loss-Hessian eigenvalues of the dense model to report "
                                       "(0: skip).", rich_help_panel=SPECTRUM_PANEL),
    spectrum_max_iter: int = typer.Option(50, min=1, help="Eigen-solver iterations.", rich_help_panel=SPECTRUM_PANEL),
    out: Path = typer.Option(Path("runs/compare"), help="Run folder to write.", rich_help_panel=OUTPUT_PANEL),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder.", rich_help_panel=OUTPUT_PANEL),
    resume: bool = typer.Option(False, help="Continue a stopped compare run in --out (same settings).",
                                rich_help_panel=OUTPUT_PANEL),
    tensorboard: bool = typer.Option(False, help="Also write TensorBoard scalars (needs the tensorboard package).",
                                     rich_help_panel=OUTPUT_PANEL),
    device: str = DeviceOption,
    seed: int = typer.Option(0, help="Seed of every random choice."),
    config: Optional[Path] = ConfigOption,
    **settings,
):
    """Every criterion from the same dense model, calibration data, seed and fine-tuning; JSON, CSV, Markdown, HTML."""
    _compare(ctx, {key: value for key, value in locals().items() if key not in ("ctx", "config", "settings")}, settings)


def _compare(ctx: typer.Context, options: dict, settings: dict) -> None:
    """Run compare_job with the command's own ``options`` (--latency resolved) and its ``settings``; print the
    headline and where the report is."""
    from camphive.jobs.compare import compare_job

    latency = switch(ctx, "latency", options["latency"], options.pop("no_latency"))
    options["latency"] = True if latency is None else latency
    options.update(settings_values(ctx, COMPARE_SETTINGS, settings, defaults=True))
    results = compare_job(**options, config_file=ctx.meta.get("config_file"))
    print(results["headline"])
    print(f"report: {Path(options['out']) / 'report.html'} ({results['seconds']:.0f} s)")
