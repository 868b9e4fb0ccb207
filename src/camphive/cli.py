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


def _interrupt(_signum, _frame):
    raise Interrupted("interrupted; files already written are complete, and commands with --resume can continue the run")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line and a non-zero exit."""
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        app(args=argv, prog_name="camphive")
    except CamphiveError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return error.exit_code
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
