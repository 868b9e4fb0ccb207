"""Reading ``camphive compare``'s options: lists and key=value strings (as typed, or as a YAML
config file's lists and mappings reach a text option), the checks of the plan that run before
any work starts (the pruning settings' own: :mod:`camphive.pruning.core.settings`), and the
optional TensorBoard writer.
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from camphive.errors import ConfigError

# The criteria compare runs when none are named: the baselines and, unstructured, the one-shot peers Wanda and
# SparseGPT (each adds about a tenth to a small-cnn Fashion-MNIST run; OBC, far slower, only when asked).
DEFAULT_CRITERIA = {
    "unstructured": ("camp-hive", "magnitude", "wanda", "sparsegpt", "taylor", "obd", "hutchinson", "random"),
    "structured": ("camp-hive", "magnitude", "taylor", "obd", "hutchinson", "random"),
}


def parse_list(value, kind=str, option: str = "list") -> list:
    """``"a,b"``, ``"[a, b]"`` (a YAML list, as a config file's list reaches a text option) or a
    list, as a list of ``kind``."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        items = yaml.safe_load(text) if text.startswith("[") else [part for part in text.split(",") if part.strip()]
        if not isinstance(items, list):
            raise ConfigError(f"--{option} {value!r} is not a comma-separated list, e.g. 0.5,0.8,0.9")
    else:
        items = list(value)
    try:
        return [kind(item.strip()) if isinstance(item, str) else kind(item) for item in items]
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--{option} {value!r} holds a value that is not {kind.__name__}; e.g. 0.5,0.8,0.9") from error


_SHAPE = re.compile(r"^\d+(x\d+)+$")
# Numbers YAML 1.1 reads as strings (1e-3, 5E+2: no dot before the exponent).
_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
# N:M sparsity patterns (pattern=2:4), which YAML 1.1 reads as base-60 numbers (2:4 -> 124): kept as text.
_RATIO = re.compile(r"^\d+:\d+$")


def parse_options(value, option: str = "options") -> dict:
    """``"key=value,key=value"`` (values read as YAML scalars; ``3x32x32`` becomes ``[3, 32, 32]``),
    a YAML mapping ``"{key: value}"`` or a dict, as a dict."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    text = str(value).strip()
    if text.startswith("{"):
        parsed = _safe_yaml(text, option)
        if not isinstance(parsed, dict):
            raise ConfigError(f"--{option} {value!r} is not a mapping; write key=value,key=value")
        return parsed
    result = {}
    for part in _split_top_level(text):
        key, sep, item = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--{option} {value!r}: {part!r} is not key=value; write e.g. num_classes=100,shape=3x32x32")
        item = item.strip()
        if _SHAPE.match(item):
            result[key.strip()] = [int(size) for size in item.split("x")]
        elif _RATIO.match(item):
            result[key.strip()] = item
        else:
            result[key.strip()] = float(item) if _EXPONENT.match(item) else _safe_yaml(item, option)
    return result


def _safe_yaml(text: str, option: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"--{option} {text!r} is not readable as YAML ({str(error).splitlines()[0]})") from error


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, so ``shape=[3, 32, 32],noise=0.5`` stays two items."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [part for part in parts + [current] if part.strip()]


def check_plan(mode: str, criteria, sparsities, macs_ratios) -> tuple[list[str], list[float], str]:
    """Criteria (canonical names; None: the mode's :data:`DEFAULT_CRITERIA`), targets and what the
    targets are, or one ConfigError line."""
    from camphive.pruning.criteria import STRUCTURED_CRITERIA, WEIGHT_CRITERIA, canonical_name

    if mode not in ("unstructured", "structured"):
        raise ConfigError(f"unknown --mode {mode!r}; use unstructured or structured")
    if criteria is None:
        criteria = DEFAULT_CRITERIA[mode]
    criteria = [canonical_name(name) for name in parse_list(criteria, str, "criteria")]
    if not criteria:
        raise ConfigError("--criteria is empty; name at least one, e.g. camp-hive,magnitude")
    if len(set(criteria)) != len(criteria):
        raise ConfigError(f"--criteria names a criterion twice: {','.join(criteria)}")
    known = WEIGHT_CRITERIA if mode == "unstructured" else STRUCTURED_CRITERIA
    unknown = [name for name in criteria if name not in known]
    if unknown:
        raise ConfigError(f"criterion {unknown[0]!r} is not available for {mode} pruning; use {', '.join(known)}")
    ratios = parse_list(macs_ratios, float, "macs-ratios")
    if ratios:
        if mode != "structured":
            raise ConfigError("--macs-ratios needs --mode structured (unstructured masks do not remove MACs); "
                              "use --sparsities")
        if any(ratio <= 1.0 for ratio in ratios):
            raise ConfigError(f"--macs-ratios must all be > 1 (2.0 = half the MACs), got {ratios}")
        return criteria, sorted(set(ratios)), "macs_ratio"
    targets = parse_list(sparsities, float, "sparsities")
    if not targets:
        raise ConfigError("--sparsities is empty; give e.g. 0.5,0.8,0.9")
    if any(not 0.0 < target < 1.0 for target in targets):
        raise ConfigError(f"--sparsities must lie in (0, 1), got {targets}")
    return criteria, sorted(set(targets)), "sparsity"


def layer_lists(options: dict) -> dict:
    """``ignored_layers=conv1`` (one name, as a key=value option reads) as the list prune expects."""
    if isinstance(options.get("ignored_layers"), str):
        options["ignored_layers"] = parse_list(options["ignored_layers"], str, "ignored-layers")
    return options


def check_model(model, model_name: str, splits, *option_sets: dict, spectrum_top_k: int = 0,
                spectrum_max_iter: int = 50) -> None:
    """The architecture ``model_name`` exists (when no ``model`` is given), every ignored layer
    in ``option_sets`` is one of its modules, and the dense spectrum's ``spectrum_top_k`` is one
    ``spectrum_max_iter`` products can deliver; the model is made outside the seeded random stream."""
    import torch

    from camphive.jobs.common import model_for
    from camphive.pruning.structured.groups import resolve_ignored

    if model is None:
        with torch.random.fork_rng(devices=[]):
            model = model_for(model_name, splits)
    for options in option_sets:
        resolve_ignored(model, options.get("ignored_layers"))
    if spectrum_top_k:
        from camphive.curvature.spectrum import check_spectrum_request

        check_spectrum_request(model, spectrum_top_k, max_iter=spectrum_max_iter, per_layer=False)


def check_tensorboard() -> None:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as error:
        raise ConfigError("--tensorboard needs the tensorboard package (pip install tensorboard); run without it: "
                          "the same metrics are in logs/*.jsonl and results.csv") from error


class Scalars:
    """TensorBoard scalars when asked for; otherwise nothing (the JSONL logs hold the same values)."""

    def __init__(self, path: Path | None):
        self.writer = None
        if path is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path))

    def add(self, tag: str, value, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
