"""Settings by mode: keyword options become checked settings objects, in one place.

``settings_for("unstructured", sparsity=0.9, merge="none")`` returns an
:class:`~camphive.pruning.unstructured.settings.UnstructuredSettings`; an option the mode does
not take is refused (never dropped), naming the mode it belongs to. Jobs call
:func:`check_prune_settings` before they train, evaluate or make a run folder, so a misspelt
option fails at once, in one line, and leaves nothing behind.
"""
from __future__ import annotations

from camphive.errors import ConfigError
from camphive.pruning.core.settings import PruneSettings
from camphive.pruning.structured.settings import StructuredSettings
from camphive.pruning.unstructured.settings import UnstructuredSettings

SETTINGS = {"unstructured": UnstructuredSettings, "structured": StructuredSettings}
# Set by the jobs themselves (from their own flags), never by a user's pruning options.
_SET_BY_JOBS = {"seed", "criterion", "sparsity", "target_macs_ratio", "num_batches"}


def settings_for(mode: str, **options) -> PruneSettings:
    """The checked settings of ``mode`` built from keyword ``options``."""
    if mode not in SETTINGS:
        raise ConfigError(f"unknown mode {mode!r}; use unstructured or structured")
    cls = SETTINGS[mode]
    known = set(cls.option_names())
    unknown = sorted(set(options) - known)
    if unknown:
        other_mode = "structured" if mode == "unstructured" else "unstructured"
        other = set(SETTINGS[other_mode].option_names())
        if all(name in other for name in unknown):
            raise ConfigError(f"option(s) {', '.join(unknown)} apply to {other_mode} pruning only; pass "
                              f"mode={other_mode!r} or drop them")
        raise ConfigError(f"unknown option(s) for {mode} pruning: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if mode == "unstructured" and options.get("target_macs_ratio") is not None:
        raise ConfigError("target_macs_ratio needs mode='structured' (unstructured masks do not remove MACs); "
                          "use sparsity")
    return cls(**options)


def resolve_settings(mode: str, settings: PruneSettings | None, options: dict, sparsity=None) -> PruneSettings:
    """``settings`` as given (checked to be of ``mode``), or built from ``sparsity`` and the keyword ``options``."""
    if settings is None:
        return settings_for(mode, **({"sparsity": sparsity} if sparsity is not None else {}), **options)
    if options or sparsity is not None:
        raise ConfigError(f"pass either settings or keyword options, not both (got {', '.join(sorted(options))})")
    if not isinstance(settings, SETTINGS[mode]):
        raise ConfigError(f"settings must be {SETTINGS[mode].__name__} for {mode} pruning, got {type(settings).__name__}")
    return settings


def check_prune_settings(mode: str, criterion, sparsity=None, target_macs_ratio=None, options=None) -> PruneSettings:
    """What a job checks before any work starts: its pruning ``options`` (the ones a user sets:
    score, merge, cycles, round_to, ...) with its own ``criterion`` and targets. The settings, or
    one ConfigError line."""
    options = {key: value for key, value in dict(options or {}).items() if value is not None}
    if mode not in SETTINGS:
        raise ConfigError(f"unknown --mode {mode!r}; use unstructured or structured")
    if mode == "unstructured" and target_macs_ratio is not None:
        raise ConfigError("--target-macs-ratio needs --mode structured (unstructured masks do not remove MACs); "
                          "use --sparsity")
    reserved = sorted(set(options) & _SET_BY_JOBS)
    if reserved:
        raise ConfigError(f"unknown option(s) for {mode} pruning: {', '.join(reserved)}; the job sets them from its "
                          "own flags (--seed, --criterion, --sparsity, --target-macs-ratio, --calib-samples)")
    targets = {"sparsity": sparsity} if mode == "unstructured" else {"sparsity": sparsity,
                                                                     "target_macs_ratio": target_macs_ratio}
    return settings_for(mode, criterion=criterion, **targets, **options)
