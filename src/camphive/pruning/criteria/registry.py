"""Criteria by name: the one place where names and their aliases are read."""
from __future__ import annotations

from camphive.errors import ConfigError
from camphive.pruning.criteria.base import Criterion

# The one-shot peers: Wanda scores weights; SparseGPT and OBC solve whole layers (unstructured only).
LAYER_SOLVER_CRITERIA = ("sparsegpt", "obc")
WEIGHT_CRITERIA = ("camp-hive", "magnitude", "random", "taylor", "obd", "hutchinson", "wanda", *LAYER_SOLVER_CRITERIA)
CHANNEL_ONLY_CRITERIA = ("tp-magnitude", "tp-taylor", "tp-hessian")
ALL_CRITERIA = WEIGHT_CRITERIA + CHANNEL_ONLY_CRITERIA
STRUCTURED_CRITERIA = tuple(name for name in ALL_CRITERIA if name not in LAYER_SOLVER_CRITERIA)
_ALIASES = {"camphive": "camp-hive", "l1": "magnitude", "fisher": "obd", "tp-l2": "tp-magnitude",
            "tp-group-magnitude": "tp-magnitude", "tp-obd": "tp-hessian", "sparse-gpt": "sparsegpt", "exactobs": "obc",
            "exact-obs": "obc"}


def canonical_name(criterion) -> str:
    """The criterion's canonical name ("camp_hive", "CampHive " -> "camp-hive"); an instance's ``name``."""
    if isinstance(criterion, Criterion):
        return criterion.name
    key = str(criterion).strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in ALL_CRITERIA:
        raise ConfigError(f"unknown criterion {criterion!r}; use one of {', '.join(ALL_CRITERIA)} "
                          "(or pass a Criterion instance)")
    return key


def is_camp_hive(criterion) -> bool:
    return not isinstance(criterion, Criterion) and canonical_name(criterion) == "camp-hive"


def is_layer_solver(criterion) -> bool:
    """Whether ``criterion`` (a name or an instance) solves whole layers (SparseGPT, OBC, your own solver)."""
    from camphive.pruning.criteria.layer_solvers import LayerSolverCriterion

    if isinstance(criterion, Criterion):
        return isinstance(criterion, LayerSolverCriterion)
    return canonical_name(criterion) in LAYER_SOLVER_CRITERIA


def make_criterion(criterion, seed: int = 0, **options) -> Criterion:
    """A criterion object from a name (``options`` configure CAMP-HiVe) or the instance itself."""
    if isinstance(criterion, Criterion):
        if options:
            raise ConfigError(f"options {sorted(options)} configure named criteria; set them on your "
                              f"{type(criterion).__name__} instance instead")
        return criterion
    from camphive.pruning.criteria import baselines
    from camphive.pruning.criteria.camp_hive import CampHive
    from camphive.pruning.criteria.torch_pruning import TorchPruningImportance

    name = canonical_name(criterion)
    if name == "camp-hive":
        return CampHive(**options)
    if name in LAYER_SOLVER_CRITERIA:
        from camphive.pruning.criteria.layer_solvers import OptimalBrainCompression, SparseGPT

        unknown = sorted(set(options) - {"damping"})
        if unknown:
            raise ConfigError(f"criterion {name} takes only damping, got {', '.join(unknown)}")
        return (SparseGPT if name == "sparsegpt" else OptimalBrainCompression)(**options)
    if options:
        raise ConfigError(f"criterion {name} takes no options, got {', '.join(sorted(options))}")
    if name == "wanda":
        from camphive.pruning.criteria.wanda import Wanda

        return Wanda()
    if name in CHANNEL_ONLY_CRITERIA:
        return TorchPruningImportance(name)
    if name == "random":
        return baselines.RandomScores(seed)
    return {"magnitude": baselines.Magnitude, "taylor": baselines.Taylor, "obd": baselines.OptimalBrainDamage,
            "hutchinson": baselines.HutchinsonDiagonal}[name]()
