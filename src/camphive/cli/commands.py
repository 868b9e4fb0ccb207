"""The commands that train, evaluate, analyse and export: ``train``, ``evaluate``, ``demo``,
``spectrum`` and ``export``, each one call of its job."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from camphive.cli.common import ConfigOption, DeviceOption, app, echo_metrics
from camphive.errors import ConfigError


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
    echo_metrics(f"trained {model} on {dataset} -> {out}", metrics["test"])


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
    echo_metrics(f"{checkpoint} on {metrics['dataset']} ({split})", metrics)


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
    echo_metrics(f"spectrum of {checkpoint} -> {out}", {
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
            echo_metrics(f"exported {checkpoint} -> {target}", {
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
    echo_metrics(f"exported {checkpoint} -> {target}", {"max abs difference vs torch": result["max_abs_diff"],
                                                        "bytes": result["file_size_bytes"]})
