"""The ``camphive`` command line: thin, each command is one call of a job or the API.

Every command accepts ``--config FILE.yaml`` whose keys (option names, with ``-`` or ``_``)
fill in any option not given on the command line. Errors a user can fix print one line and
exit with status 2; no traceback.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from camphive import progress
from camphive.errors import CamphiveError, ConfigError, one_line


class Interrupted(CamphiveError):
    exit_code = 130


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="CAMP-HiVe: curvature-guided pruning with cyclic pair merging.",
)


def _load_config(ctx: typer.Context, _param, path: Optional[Path]):
    """Read a YAML config into the command's defaults (command-line values still win)."""
    if path is None:
        return None
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file of option: value lines")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML ({one_line(error)[:120]})") from error
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value, got {type(values).__name__}")
    known = {param.name for param in ctx.command.params}
    defaults = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path} sets unknown option {key!r}; known: {', '.join(sorted(known - {'config'}))}")
        defaults[name] = value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta["config_file"] = str(path)
    return path


ConfigOption = typer.Option(None, "--config", help="YAML file of option values (command-line options win).",
                            callback=_load_config, is_eager=True, exists=False, dir_okay=False)
DeviceOption = typer.Option("auto", help="auto (CUDA when present), cpu or cuda[:N].")


def _echo_metrics(title: str, metrics: dict) -> None:
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{title}[/bold]")
    for key, value in metrics.items():
        if isinstance(value, float):
            console.print(f"  {key}: {value:.4f}")
        elif isinstance(value, (int, str)) or value is None:
            console.print(f"  {key}: {value}")


@app.command()
def train(
    model: str = typer.Option("small-cnn", help="Architecture name (see camphive models)."),
    dataset: str = typer.Option("fashion-mnist", help="fashion-mnist, cifar10, cifar100, imagenet or synthetic."),
    data_root: Optional[str] = typer.Option(None, help="Dataset folder (default: the dataset's usual place)."),
    dataset_options: Optional[str] = typer.Option(None, help="key=value,... e.g. num_classes=100,shape=3x32x32 "
                                                  "(synthetic); recorded in the checkpoint."),
    out: Path = typer.Option(Path("runs/train"), help="Run folder to write."),
    epochs: int = typer.Option(10, min=0),
    batch_size: int = typer.Option(128, min=1),
    lr: float = typer.Option(0.1),
    momentum: float = typer.Option(0.9),
    nesterov: bool = typer.Option(True),
    weight_decay: float = typer.Option(5e-4),
    schedule: str = typer.Option("cosine", help="cosine, step or constant."),
    warmup_epochs: float = typer.Option(0.0),
    label_smoothing: float = typer.Option(0.0),
    train_subset: Optional[int] = typer.Option(None, help="Train on the first N samples only."),
    test_subset: Optional[int] = typer.Option(None),
    num_workers: int = typer.Option(0),
    amp: bool = typer.Option(False, help="bfloat16 autocast on CUDA."),
    device: str = DeviceOption,
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="Replace an existing run folder."),
    resume: bool = typer.Option(False, help="Continue the stopped run in --out."),
    config: Optional[Path] = ConfigOption,
):
    """Train a dense model and write a run folder (config, metrics, checkpoint, log)."""
    from camphive.jobs import train_job

    options = {key: value for key, value in locals().items() if key not in ("config", "train_job")}
    metrics = train_job(**options)
    _echo_metrics(f"trained {model} on {dataset} -> {out}", metrics["test"])


@app.command()
def evaluate(
    checkpoint: Path = typer.Option(..., help="model.safetensors written by camphive."),
    dataset: Optional[str] = typer.Option(None, help="Default: the dataset recorded in the checkpoint."),
    data_root: Optional[str] = typer.Option(None),
    split: str = typer.Option("test"),
    batch_size: int = typer.Option(256, min=1),
    subset: Optional[int] = typer.Option(None),
    device: str = DeviceOption,
    out: Optional[Path] = typer.Option(None, help="Also write a run folder here."),
    overwrite: bool = typer.Option(False),
    config: Optional[Path] = ConfigOption,
):
    """Evaluate a checkpoint: top-1, top-5 and loss."""
    from camphive.jobs import evaluate_job

    options = {key: value for key, value in locals().items() if key not in ("config", "evaluate_job")}
    metrics = evaluate_job(**options)
    _echo_metrics(f"{checkpoint} on {metrics['dataset']} ({split})", metrics)


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, help="Run folder (default: runs/demo-<time>)."),
    data_root: Optional[str] = typer.Option(None, help="Fashion-MNIST folder (default: the Debian package's)."),
    epochs: int = typer.Option(4, min=1, help="Dense training epochs."),
    device: str = DeviceOption,
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False),
    config: Optional[Path] = ConfigOption,
):
    """The main job: train the default model on Fashion-MNIST and write a report."""
    from camphive.jobs.demo import demo_job

    options = {key: value for key, value in locals().items() if key not in ("config", "demo_job")}
    result = demo_job(**options)
    print(result["summary"])


def _options(**values) -> dict:
    """Options the user set (None means: the API's measured default)."""
    return {key: value for key, value in values.items() if value is not None}


# Help panels of the prune and compare commands. An on/off switch whose --NAME/--no-NAME pair would not fit
# whole in an 80-column terminal (the option table cuts names rather than wrap them) is declared as two
# options, one row each, joined by _switch.
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


def _switch(ctx: typer.Context, name: str, on: Optional[bool], off: bool) -> Optional[bool]:
    """The value of the switch ``name`` declared as the options --NAME (``on``) and --no-NAME (``off``).

    None when neither is set. When both are set, the one given on the command line wins over the
    one a config file gave; both on the command line contradict each other.
    """
    if not off:
        return on
    if not on:
        return False
    on_command_line = [getattr(ctx.get_parameter_source(key), "name", None) == "COMMANDLINE"
                       for key in (name, f"no_{name}")]
    if on_command_line[0] == on_command_line[1]:
        option = name.replace("_", "-")
        raise ConfigError(f"--{option} and --no-{option} contradict each other; give one of them")
    return on_command_line[0]


@app.command("prune")
def prune_command(
    ctx: typer.Context,
    checkpoint: Path = typer.Option(..., help="model.safetensors to prune (from camphive train)."),
    sparsity: Optional[float] = typer.Option(None, help="Fraction of the weights (unstructured) or channels "
                                             "(structured) to remove.", rich_help_panel=PRUNING_PANEL),
    target_macs_ratio: Optional[float] = typer.Option(None, help="Structured: MACs reduction to reach instead of "
                                                      "a sparsity, e.g. 2.0.", rich_help_panel=PRUNING_PANEL),
    mode: str = typer.Option("unstructured", help="unstructured (masks) or structured (channels removed).",
                             rich_help_panel=PRUNING_PANEL),
    criterion: str = typer.Option("camp-hive", help="camp-hive, magnitude, random, taylor, obd, hutchinson, wanda; "
                                  "unstructured also sparsegpt, obc; structured also tp-magnitude, tp-taylor, "
                                  "tp-hessian.",
                                  rich_help_panel=PRUNING_PANEL),
    cycles: Optional[int] = typer.Option(None, min=1, help="Pruning rounds, curvature re-estimated in each "
                                         "(default: 3 for camp-hive unstructured, else 1).",
                                         rich_help_panel=PRUNING_PANEL),
    schedule: Optional[str] = typer.Option(None, help="How the target grows over the cycles: linear, cubic or "
                                           "constant (default: linear); gradual: prune during fine-tuning, on "
                                           "the cubic schedule.", rich_help_panel=PRUNING_PANEL),
    selection: Optional[str] = typer.Option(None, help="global, layer or unit thresholds (default: unit for "
                                            "wanda, layer for sparsegpt and obc, else global).",
                                            rich_help_panel=PRUNING_PANEL),
    min_keep: Optional[float] = typer.Option(None, help="Weights every layer keeps: a fraction (< 1) or a count "
                                             "(default: 0.01).", rich_help_panel=PRUNING_PANEL),
    ignored_layers: Optional[str] = typer.Option(None, help="Comma-separated module names to leave unpruned.",
                                                 rich_help_panel=PRUNING_PANEL),
    pattern: Optional[str] = typer.Option(None, help="Unstructured N:M sparsity, e.g. 2:4 (sparse tensor cores): "
                                          "N of every M consecutive inputs pruned per output unit; the sparsity "
                                          "is N/M.", rich_help_panel=PRUNING_PANEL),
    recalibrate_bn: Optional[bool] = typer.Option(None, "--recalibrate-bn", help="Re-estimate BatchNorm statistics "
                                                  "on the calibration images after each cycle (default).",
                                                  rich_help_panel=PRUNING_PANEL),
    no_recalibrate_bn: bool = typer.Option(False, "--no-recalibrate-bn", help="Keep the BatchNorm statistics.",
                                           rich_help_panel=PRUNING_PANEL),
    score: Optional[str] = typer.Option(None, help="Weight score: diagonal, obs, diag_lowrank or hv_product "
                                        "(default: diagonal).", rich_help_panel=CAMP_HIVE_PANEL),
    curvature: Optional[str] = typer.Option(None, help="reconstruction (layer Gram) or loss (Hessian eigenpairs) "
                                            "(default: reconstruction).", rich_help_panel=CAMP_HIVE_PANEL),
    loss_weighting: Optional[str] = typer.Option(None, help="none, unit, layer or batchnorm (default: batchnorm "
                                                 "for reconstruction diagonal/obs scores, else none).",
                                                 rich_help_panel=CAMP_HIVE_PANEL),
    scope: Optional[str] = typer.Option(None, help="Loss Hessian: global or layer blocks (default: global).",
                                        rich_help_panel=CAMP_HIVE_PANEL),
    top_k: Optional[int] = typer.Option(None, min=1, help="Loss-Hessian eigenpairs (default: 8).",
                                        rich_help_panel=CAMP_HIVE_PANEL),
    damping: Optional[float] = typer.Option(None, help="Curvature damping, a fraction of the mean diagonal "
                                            "(default: 0.01).", rich_help_panel=CAMP_HIVE_PANEL),
    pairing: Optional[str] = typer.Option(None, help="cyclic or coupled (default: coupled).",
                                          rich_help_panel=CAMP_HIVE_PANEL),
    merge: Optional[str] = typer.Option(None, help="Unstructured: curvature, half, none or least_squares; "
                                        "structured: least_squares, pair or none (default: least_squares for "
                                        "camp-hive, none for baselines).", rich_help_panel=CAMP_HIVE_PANEL),
    round_to: Optional[int] = typer.Option(None, min=1, help="Keep channel counts in multiples of N (default: "
                                           "8 in groups of >= 16 channels; 1: exact).", rich_help_panel=STRUCTURED_PANEL),
    global_pruning: Optional[bool] = typer.Option(None, "--global-pruning", help="Rank channels across layers.",
                                                  rich_help_panel=STRUCTURED_PANEL),
    no_global_pruning: bool = typer.Option(False, "--no-global-pruning", help="Remove the same fraction of every "
                                           "layer (default).", rich_help_panel=STRUCTURED_PANEL),
    min_channels: Optional[float] = typer.Option(None, help="Channels every layer keeps: a count, or a fraction "
                                                 "if < 1 (default: 1).", rich_help_panel=STRUCTURED_PANEL),
    latency_channels_last: Optional[bool] = typer.Option(None, "--latency-channels-last", help="Time the models "
                                                         "in the NHWC layout (usually faster on CPUs).",
                                                         rich_help_panel=LATENCY_PANEL),
    no_latency_channels_last: bool = typer.Option(False, "--no-latency-channels-last", help="Time them in the "
                                                  "NCHW layout (default).", rich_help_panel=LATENCY_PANEL),
    latency_compiled: Optional[bool] = typer.Option(None, "--latency-compiled", help="Time the models compiled "
                                                    "by torch.compile (adds compile time; needs a C++ compiler).",
                                                    rich_help_panel=LATENCY_PANEL),
    no_latency_compiled: bool = typer.Option(False, "--no-latency-compiled", help="Time them uncompiled "
                                             "(default).", rich_help_panel=LATENCY_PANEL),
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
):
    """Prune a checkpoint with CAMP-HiVe (or a baseline), optionally fine-tune, write the pruned checkpoint."""
    from camphive.jobs.compare_options import parse_list
    from camphive.jobs.prune import prune_job

    ignored = None if ignored_layers is None else parse_list(ignored_layers, str, "ignored-layers")
    options = _options(score=score, curvature=curvature, loss_weighting=loss_weighting, pairing=pairing,
                       merge=merge, cycles=cycles, schedule=schedule, selection=selection, scope=scope,
                       top_k=top_k, min_keep=min_keep, damping=damping,
                       recalibrate_bn=_switch(ctx, "recalibrate_bn", recalibrate_bn, no_recalibrate_bn),
                       ignored_layers=ignored, pattern=pattern, round_to=round_to,
                       global_pruning=_switch(ctx, "global_pruning", global_pruning, no_global_pruning),
                       min_channels=min_channels,
                       latency_channels_last=_switch(ctx, "latency_channels_last", latency_channels_last,
                                                     no_latency_channels_last),
                       latency_compiled=_switch(ctx, "latency_compiled", latency_compiled, no_latency_compiled))
    results = prune_job(checkpoint=checkpoint, out=out, sparsity=sparsity, mode=mode, criterion=criterion,
                        target_macs_ratio=target_macs_ratio, dataset=dataset, data_root=data_root,
                        calib_samples=calib_samples, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr,
                        train_subset=train_subset, device=device, seed=seed, overwrite=overwrite, resume=resume,
                        options=options, pruning_steps=pruning_steps)
    summary = {"dense accuracy": results["dense"]["accuracy"]}
    if results["pruned"]:  # a gradual run has no model "right after pruning"
        summary["pruned accuracy"] = results["pruned"]["accuracy"]
    summary["sparsity"] = results["prune"]["sparsity"]
    if results["finetuned"]:
        summary["fine-tuned accuracy"] = results["finetuned"]["accuracy"]
    if results["prune"].get("dense_layers"):
        summary["left dense (no N:M layout)"] = ", ".join(results["prune"]["dense_layers"])
    _echo_metrics(f"{criterion} ({mode}) -> {out}", summary)


@app.command("spectrum")
def spectrum_command(
    checkpoint: Path = typer.Option(..., help="model.safetensors to analyse."),
    out: Path = typer.Option(Path("runs/spectrum")),
    top_k: int = typer.Option(5, min=1),
    method: str = typer.Option("lanczos", help="lanczos, power or eigsh."),
    per_layer: bool = typer.Option(True),
    trace_probes: int = typer.Option(16, min=0),
    tol: float = typer.Option(1e-3),
    max_iter: int = typer.Option(100, min=1),
    calib_samples: int = typer.Option(1024, min=1),
    dataset: Optional[str] = typer.Option(None),
    data_root: Optional[str] = typer.Option(None),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False),
    config: Optional[Path] = ConfigOption,
):
    """Top loss-Hessian eigenvalues (global and per layer), trace estimate, convergence PNG and JSON."""
    from camphive.jobs.spectrum import spectrum_job

    options = {key: value for key, value in locals().items() if key not in ("config", "spectrum_job")}
    result = spectrum_job(**options)
    _echo_metrics(f"spectrum of {checkpoint} -> {out}", {
        "eigenvalues": ", ".join(f"{value:.4g}" for value in result["global"]["eigenvalues"]),
        "trace": None if result["trace"] is None else result["trace"]["trace"],
        "Hessian-vector products": result["num_matvecs"],
    })


@app.command("export")
def export_command(
    checkpoint: Path = typer.Option(..., help="model.safetensors (dense or pruned)."),
    onnx: Optional[Path] = typer.Option(None, help="ONNX file to write (--format onnx)."),
    sparse: Optional[Path] = typer.Option(None, help="Sparse file to write (--format sparse; default: "
                                          "NAME.sparse.safetensors beside the checkpoint)."),
    format: Optional[str] = typer.Option(None, help="onnx, or sparse: pruned weights as bitmask + values (default: "
                                         "sparse when only --sparse is given, else onnx)."),
    values_dtype: str = typer.Option("float32", help="--format sparse: dtype of the weights' values, float32 "
                                     "(exact), float16 or bfloat16."),
    input_shape: Optional[str] = typer.Option(None, help="C,H,W (default: recorded in the checkpoint)."),
    fold_batchnorm: bool = typer.Option(True),
    opset: int = typer.Option(17),
    config: Optional[Path] = ConfigOption,
):
    """Export to ONNX and check it in onnxruntime against torch, or to a compressed sparse file."""
    from camphive.jobs.export import export_job, export_sparse_job, export_target

    output_format, target = export_target(checkpoint, format, onnx, sparse, values_dtype)  # also a config-file key
    if output_format == "sparse":
        result = export_sparse_job(checkpoint=checkpoint, sparse=target, values_dtype=values_dtype)
        if result is not None:  # None under torchrun on processes other than rank 0
            _echo_metrics(f"exported {checkpoint} -> {target}", {
                "bytes": result["file_bytes"], "dense float32 checkpoint bytes": result["dense_bytes"],
                "size / dense": result["ratio"], "max abs difference vs checkpoint": result["max_abs_diff"]})
        return
    shape = None
    if input_shape:
        try:
            shape = tuple(int(part) for part in input_shape.split(","))
        except ValueError as error:
            raise ConfigError(f"--input-shape {input_shape!r} is not C,H,W integers, e.g. 3,32,32") from error
    result = export_job(checkpoint=checkpoint, onnx=target, input_shape=shape, fold_batchnorm=fold_batchnorm, opset=opset)
    if result is None:  # under torchrun, another process (rank 0) exported
        return
    _echo_metrics(f"exported {checkpoint} -> {target}", {"max abs difference vs torch": result["max_abs_diff"],
                                                        "bytes": result["file_size_bytes"]})


@app.command("compare")
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
    cycles: Optional[int] = typer.Option(None, min=1, help="CAMP-HiVe pruning cycles (default: 3 unstructured, "
                                         "1 structured).", rich_help_panel=PRUNING_PANEL),
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
    latency_batch_sizes: str = typer.Option("1,64", help="Comma-separated batch sizes to time.",
                                            rich_help_panel=LATENCY_PANEL),
    latency_seconds: float = typer.Option(1.0, help="About this long per batch size.", rich_help_panel=LATENCY_PANEL),
    latency_channels_last: Optional[bool] = typer.Option(None, "--latency-channels-last", help="Time in the NHWC "
                                                         "layout (usually faster on CPUs).",
                                                         rich_help_panel=LATENCY_PANEL),
    no_latency_channels_last: bool = typer.Option(False, "--no-latency-channels-last", help="Time in the NCHW "
                                                  "layout (default).", rich_help_panel=LATENCY_PANEL),
    latency_compiled: Optional[bool] = typer.Option(None, "--latency-compiled", help="Time the models compiled by "
                                                    "torch.compile.", rich_help_panel=LATENCY_PANEL),
    no_latency_compiled: bool = typer.Option(False, "--no-latency-compiled", help="Time them uncompiled "
                                             "(default).", rich_help_panel=LATENCY_PANEL),
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
):
    """Every criterion from the same dense model, calibration data, seed and fine-tuning; JSON, CSV, Markdown, HTML."""
    from camphive.jobs.compare import compare_job

    options = {key: value for key, value in locals().items() if key not in ("ctx", "config", "compare_job")}
    for name, default in (("latency", True), ("latency_channels_last", False), ("latency_compiled", False)):
        value = _switch(ctx, name, options[name], options.pop(f"no_{name}"))
        options[name] = default if value is None else value
    results = compare_job(**options, config_file=ctx.meta.get("config_file"))
    print(results["headline"])
    print(f"report: {Path(out) / 'report.html'} ({results['seconds']:.0f} s)")


def _interrupt(_signum, _frame):
    raise Interrupted("interrupted; files already written are complete, and commands with --resume can continue the run")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        from camphive import distributed

        # Under torchrun: joins the process group, silences ranks other than 0, leaves it at exit.
        with distributed.session():
            result = app(args=argv, prog_name="camphive", standalone_mode=False)
        if isinstance(result, int) and not isinstance(result, bool):
            return result  # --help and friends return their exit code
    except CamphiveError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
    except Exception as error:
        # Usage errors of the command-line parser (unknown option, value of the wrong type):
        # one line too, instead of the parser's framed message.
        if hasattr(error, "format_message") and hasattr(error, "exit_code"):
            command = getattr(getattr(error, "ctx", None), "command_path", "camphive")
            message = one_line(error.format_message()).rstrip(".")
            if message:  # empty when the parser already printed the help
                print(f"error: {message}; see {command} --help", file=sys.stderr)
            return int(error.exit_code)
        raise
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


def _entry() -> None:
    progress.set_enabled(None)
    sys.exit(main())


if __name__ == "__main__":
    _entry()
