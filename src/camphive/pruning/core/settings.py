"""The settings of :func:`camphive.prune` checked without a model or data: option names, types,
choices and ranges, from the pruning modules' own signatures and constants.

Jobs call :func:`check_prune_settings` before they train, evaluate or make a run folder, so a
misspelt option fails at once, in one line, and leaves nothing behind.
"""
from __future__ import annotations

import inspect
import numbers

from camphive.errors import ConfigError

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
    from camphive.pruning import criteria
    from camphive.pruning.structured import budget as channel_budget
    from camphive.pruning.structured import merging as channel_merging
    from camphive.pruning.structured import prune as structured
    from camphive.pruning.unstructured import merging, pairing, selection
    from camphive.pruning.unstructured import prune as pipeline
    from camphive.pruning.structured.scores import ChannelScorer, canonical_criterion

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
