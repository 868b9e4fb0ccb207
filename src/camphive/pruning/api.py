"""The convenient entry point: ``camphive.prune(model, data, sparsity, mode=..., **options)``."""
from __future__ import annotations

from camphive.errors import ConfigError
from camphive.pruning.core.result import PruneResult
from camphive.pruning.core.settings import PruneSettings
from camphive.pruning.settings import settings_for


def prune(model, calib_data, sparsity: float | None = None, *, mode: str = "unstructured",
          settings: PruneSettings | None = None, masks=None, loss_fn=None, example_inputs=None, start_cycle: int = 0,
          resume_state: dict | None = None, on_cycle_end=None, reference=None, **options) -> PruneResult:
    """Prune ``model`` in place and return a :class:`PruneResult`.

    ``calib_data``: calibration batches (a DataLoader, a Dataset or a list of ``(inputs,
    targets)``). ``sparsity``: unstructured, the fraction of the prunable weights (conv and
    linear weights) to remove, in [0, 1); structured, the fraction of channels (or pass
    ``target_macs_ratio``). ``mode``: "unstructured" (masks) or "structured" (channels
    removed). Keyword ``options`` build the mode's settings
    (:class:`~camphive.pruning.unstructured.settings.UnstructuredSettings`,
    :class:`~camphive.pruning.structured.settings.StructuredSettings`, where every option is
    described); an option the mode does not take is an error. Or pass ``settings`` built
    yourself. ``criterion`` is a name or a :class:`~camphive.pruning.criteria.Criterion`.

    ``masks`` (unstructured): weights already pruned. ``example_inputs``: one sample for MACs
    (default: the first calibration sample). Resuming: see
    :func:`camphive.pruning.core.driver.run_cycles`. ``reference`` (with the refit, camp-hive's default): the unpruned
    model the refit matches (default: a copy of ``model`` as passed).
    """
    from camphive.pruning.structured.prune import prune_structured
    from camphive.pruning.unstructured.prune import prune_unstructured

    if settings is None:
        settings = settings_for(mode, **({"sparsity": sparsity} if sparsity is not None else {}), **options)
    elif sparsity is not None or options:
        raise ConfigError("pass either settings or sparsity and keyword options, not both")
    if settings.mode != mode and mode != "unstructured":
        raise ConfigError(f"settings are for {settings.mode} pruning but mode={mode!r}; drop mode or rebuild them")
    common = {"loss_fn": loss_fn, "example_inputs": example_inputs, "start_cycle": start_cycle,
              "on_cycle_end": on_cycle_end}
    if settings.mode == "structured":
        if masks:
            raise ConfigError("masks apply to unstructured pruning; structured pruning removes channels")
        return prune_structured(model, calib_data, settings=settings, resume_state=resume_state, reference=reference,
                                **common)
    if resume_state is not None:
        raise ConfigError("resume_state applies to structured pruning; unstructured runs resume from masks")
    return prune_unstructured(model, calib_data, settings=settings, masks=masks, reference=reference, **common)
