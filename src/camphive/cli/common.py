"""What every command shares: the Typer app, ``--config FILE.yaml``, ``--device`` and the printed metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import yaml

from camphive.errors import ConfigError, one_line

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


def echo_metrics(title: str, metrics: dict) -> None:
    """``title`` in bold, then one ``key: value`` line per number, text or None in ``metrics``."""
    from rich.console import Console

    console = Console()
    console.print(f"[bold]{title}[/bold]")
    for key, value in metrics.items():
        if isinstance(value, float):
            console.print(f"  {key}: {value:.4f}")
        elif isinstance(value, (int, str)) or value is None:
            console.print(f"  {key}: {value}")
