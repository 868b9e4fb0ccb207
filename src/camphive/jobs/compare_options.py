"""Reading ``camphive compare``'s options: lists and key=value strings (as typed, or as a YAML
config file's lists and mappings reach a text option), the checks of the plan and of the
pruning settings that run before any work starts (used by ``camphive prune`` too), and the
optional TensorBoard writer.
"""
from __future__ import annotations

import inspect
import numbers
import re
from pathlib import Path

import yaml

from camphive.errors import ConfigError


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
    """Criteria (canonical names), targets and what the targets are, or one ConfigError line."""
    from camphive.pruning.channel_scores import STRUCTURED_CRITERIA, canonical_criterion
    from camphive.pruning.criteria import CRITERIA

    if mode not in ("unstructured", "structured"):
        raise ConfigError(f"unknown --mode {mode!r}; use unstructured or structured")
    criteria = [canonical_criterion(name) for name in parse_list(criteria, str, "criteria")]
    if not criteria:
        raise ConfigError("--criteria is empty; name at least one, e.g. camp-hive,magnitude")
    if len(set(criteria)) != len(criteria):
        raise ConfigError(f"--criteria names a criterion twice: {','.join(criteria)}")
    known = CRITERIA if mode == "unstructured" else STRUCTURED_CRITERIA
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


# Set by the jobs themselves, never by a user's options.
_INTERNAL = {"model", "calib_data", "sparsity", "mode", "criterion", "structured_options", "masks", "example_inputs",
             "loss_fn", "seed", "start_cycle", "on_cycle_end"}


def check_prune_settings(mode: str, criterion: str, sparsity=None, target_macs_ratio=None, options=None) -> None:
    """The checks :func:`camphive.prune` makes of its settings, made before any work starts (a
    misspelt option then fails at once, not after the dense model is trained or evaluated, and
    before a run folder is made). One ConfigError line, or None.

    ``options``: the keyword options a user gives prune (score, merge, cycles, round_to, ...).
    Only what needs no model or data is checked here: names, types, choices and ranges.
    """
    from camphive.pruning import channel_budget, channel_merging, criteria, merging, pairing, pipeline, selection, structured
    from camphive.pruning.channel_scores import ChannelScorer, canonical_criterion

    if mode not in ("unstructured", "structured"):
        raise ConfigError(f"unknown --mode {mode!r}; use unstructured or structured")
    options = {key: value for key, value in dict(options or {}).items() if value is not None}
    if mode == "unstructured" and target_macs_ratio is not None:
        raise ConfigError("--target-macs-ratio needs --mode structured (unstructured masks do not remove MACs); "
                          "use --sparsity")
    general, channel = _parameters(pipeline.prune), _parameters(structured.prune_structured)
    known = set(general) | (set(channel) if mode == "structured" else set())
    unknown = sorted(set(options) - known)
    if unknown:
        if all(name in channel for name in unknown):
            raise ConfigError(f"option(s) {', '.join(unknown)} apply to structured pruning only; pass --mode structured "
                              "or drop them")
        raise ConfigError(f"unknown option(s) for {mode} pruning: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for name, value in options.items():
        _check_type(name, value, (channel if name in channel and mode == "structured" else general).get(name))
    _check_choices(options, {"curvature": ("reconstruction", "loss"), "scope": ("global", "layer"),
                             "selection": selection.SELECTIONS, "schedule": selection.SCHEDULES})
    if "cycles" in options and options["cycles"] < 1:
        raise ConfigError(f"cycles must be >= 1, got {options['cycles']}")
    weight_options = {key: options[key] for key in ("score", "curvature", "loss_weighting", "first_order_weight")
                      if key in options}
    if mode == "unstructured":
        if sparsity is None:
            raise ConfigError("sparsity is required for unstructured pruning, e.g. sparsity=0.9")
        selection.check_sparsity(sparsity)
        if "min_keep" in options:
            selection.keep_floor(1, options["min_keep"])
        _check_choices(options, {"merge": merging.MERGES, "pairing": pairing.PAIRINGS})
        name = str(criterion).strip().lower().replace("_", "-")
        is_camp_hive = name in ("camp-hive", "camphive")
        criteria.make_criterion(criterion, **(weight_options if is_camp_hive else {}))
        return
    changed = [key for key in ("selection", "min_keep") if key in options and options[key] != general[key].default]
    if changed:
        raise ConfigError(f"{', '.join(changed)} apply to unstructured pruning; for structured pruning use "
                          "global_pruning, min_channels and ignored_layers")
    channel_budget.check_targets(sparsity, target_macs_ratio if target_macs_ratio is not None
                                 else options.get("target_macs_ratio"))
    _check_choices(options, {"merge": channel_merging.STRUCTURED_MERGES, "pairing": channel_merging.STRUCTURED_PAIRINGS,
                             "beta_from": channel_merging.BETA_SOURCES, "flatten_fit": channel_merging.FLATTEN_FITS})
    if "round_to" in options and options["round_to"] < 1:
        raise ConfigError(f"round_to must be a positive channel count such as 8, got {options['round_to']}")
    if "min_channels" in options and not options["min_channels"] > 0:
        raise ConfigError(f"min_channels must be > 0 (a count, or a fraction below 1), got {options['min_channels']}")
    is_camp_hive = canonical_criterion(criterion) == "camp-hive"
    channel_score = options.get("channel_score") or (structured.DEFAULTS["channel_score"] if is_camp_hive else "summed")
    ChannelScorer(criterion, channel_score=channel_score, **{**weight_options, **options.get("criterion_options", {})})


def _parameters(function) -> dict[str, inspect.Parameter]:
    """The keyword options of a pruning function a user may set."""
    return {name: parameter for name, parameter in inspect.signature(function).parameters.items()
            if name not in _INTERNAL and parameter.kind is not inspect.Parameter.VAR_KEYWORD}


_SIMPLE_TYPES = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,), "str": (str,), "dict": (dict,)}


def _check_type(name: str, value, parameter: inspect.Parameter | None) -> None:
    """A value of a type the parameter's annotation (``int | None``, ``float | int``, ...) does not name."""
    if parameter is None or not isinstance(parameter.annotation, str):
        return
    kinds = [part.strip() for part in parameter.annotation.split("|") if part.strip() != "None"]
    if not kinds or any(kind not in _SIMPLE_TYPES for kind in kinds):
        return  # a type this check does not read (tuples, modules, callables): left to prune
    allowed = tuple(kind for annotation in kinds for kind in _SIMPLE_TYPES[annotation])
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise ConfigError(f"option {name}={value!r} must be {' or '.join(kinds)}, e.g. "
                          f"{name}={_EXAMPLES[kinds[0]]}")


_EXAMPLES = {"int": 2, "float": 0.01, "bool": "true", "str": "name", "dict": "{key: value}"}


def _check_choices(options: dict, choices: dict) -> None:
    for option, allowed in choices.items():
        if option in options and options[option] not in allowed:
            raise ConfigError(f"unknown {option} {options[option]!r}; use one of {', '.join(allowed)}")


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
    from camphive.pruning.channel_groups import resolve_ignored

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
