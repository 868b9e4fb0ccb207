"""Settings of unstructured pruning (single weights masked), checked on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

from camphive.curvature.eigen import EIGEN_METHODS
from camphive.errors import ConfigError
from camphive.pruning.core.settings import PruneSettings, check_choice
from camphive.pruning.criteria import (
    WEIGHT_CRITERIA,
    Criterion,
    canonical_name,
    is_camp_hive,
    is_layer_solver,
    make_criterion,
)
from camphive.pruning.criteria.camp_hive import CAMP_HIVE_SCORES
from camphive.pruning.unstructured.defaults import DEFAULTS
from camphive.pruning.unstructured.greedy_selection import UNIT_SELECTIONS
from camphive.pruning.unstructured.layer_solvers import check_solver_settings, default_selection
from camphive.pruning.unstructured.merging import MERGE_SOLVERS, MERGES
from camphive.pruning.unstructured.pairing import PAIRINGS
from camphive.pruning.unstructured.patterns import normalize_pattern, pattern_sparsity
from camphive.pruning.unstructured.selection import SCHEDULES, SELECTIONS, check_sparsity, keep_floor


@dataclass(frozen=True)
class UnstructuredSettings(PruneSettings):
    """Unstructured pruning: ``sparsity`` (fraction of the prunable weights removed, in [0, 1)).

    ``selection``: "global" compares scores over all layers, "layer" prunes each layer to the
    target, "unit" each output unit; every layer (unit) keeps at least ``min_keep`` (a fraction,
    or a count if >= 1). Default per criterion: "unit" for wanda, "layer" for the layer solvers
    sparsegpt and obc (which take "layer" or "global": counts from CAMP-HiVe's global selection,
    and refuse ``merge``: their update is their merge), "global" for the others.
    ``schedule``: how the target grows over the cycles (linear, cubic, constant). Loss-Hessian
    options (``curvature="loss"`` or the scores diag_lowrank / hv_product): ``top_k``
    eigenpairs by ``eigen_method``, per ``scope`` (global or layer); ``hutchinson_probes``;
    ``loss_diagonal`` (fisher or hutchinson) for ``loss_weighting`` unit/layer.
    ``clip``: bound of pair-merge coefficients. ``recovery_steps`` masked SGD steps at
    ``recovery_lr`` after each cycle. ``spectrum_top_k``: top loss-Hessian eigenvalues measured
    before and after pruning for a sharpness report (0, the default, skips it: it costs Hessian-
    vector products over the whole calibration set, often more than the pruning).
    ``pattern``: N:M semi-structured sparsity ("2:4", "4:8"): N of every M consecutive fan-in weights
    pruned in each output unit (:mod:`~camphive.pruning.unstructured.patterns`); ``sparsity`` is then N/M
    and may be omitted; layers the pattern does not fit stay dense; ``selection`` and ``min_keep`` do not apply.
    ``unit_selection``: which weights each output unit keeps once the selection has set how many: "greedy"
    (CAMP-HiVe's default without a pattern; jointly, by forward selection on the layer's Gram, in the last cycle,
    in the units that keep at most half of their alive weights, or under a pattern in every unit with each group's
    count: :mod:`~camphive.pruning.unstructured.greedy_selection`) or "scores" (the default under a pattern).
    ``merge_solver``: how the least-squares merge is solved: "auto" (the default: a direct factorisation per
    unit where its system is at most 128 wide, conjugate gradients for wider ones), "direct" or "cg".
    """

    sparsity: float | None = field(default=None, metadata={
        "help": "Fraction of the weights (unstructured) or channels (structured) to remove", "default": "",
        "panel": "Pruning"})
    scope: str = field(default="global", metadata={
        "help": "Loss Hessian: global or layer blocks", "panel": "CAMP-HiVe"})
    selection: str | None = field(default=None, metadata={
        "help": "global, layer or unit thresholds", "default": "unit for wanda, layer for sparsegpt and obc, else global",
        "panel": "Pruning"})
    schedule: str = field(default="linear", metadata={
        "help": "How the target grows over the cycles: linear, cubic or constant; camphive prune also takes gradual: "
                "prune during fine-tuning, on the cubic schedule", "panel": "Pruning"})
    top_k: int = field(default=8, metadata={"help": "Loss-Hessian eigenpairs", "min": 1, "panel": "CAMP-HiVe"})
    min_keep: float | int = field(default=0.01, metadata={
        "help": "Weights every layer keeps: a fraction (< 1) or a count", "panel": "Pruning"})
    clip: float = field(default=2.0, metadata={
        "help": "Bound of the pair-merge coefficients (merge curvature)", "panel": "CAMP-HiVe"})
    recovery_steps: int = field(default=0, metadata={
        "help": "Masked SGD steps on the calibration images after each cycle", "panel": "Pruning"})
    recovery_lr: float = field(default=1e-3, metadata={"help": "Learning rate of the recovery steps", "panel": "Pruning"})
    eigen_method: str = field(default="lanczos", metadata={
        "help": "Solver of the loss-Hessian eigenpairs: lanczos, power or eigsh", "panel": "CAMP-HiVe"})
    hutchinson_probes: int = field(default=16, metadata={
        "help": "Probes of Hutchinson's loss-Hessian diagonal", "panel": "CAMP-HiVe"})
    loss_diagonal: str = field(default="fisher", metadata={
        "help": "Loss diagonal of --loss-weighting unit or layer: fisher or hutchinson", "panel": "CAMP-HiVe"})
    spectrum_top_k: int = field(default=0, metadata={
        "help": "Top loss-Hessian eigenvalues measured before and after pruning, a sharpness report (0: skip; "
                "costs Hessian-vector products over the calibration set)", "panel": "Output"})
    pattern: str | None = field(default=None, metadata={
        "help": "Unstructured N:M sparsity, e.g. 2:4 (sparse tensor cores): N of every M consecutive inputs pruned "
                "per output unit; the sparsity is N/M", "default": "", "panel": "Pruning"})
    unit_selection: str | None = field(default=None, metadata={
        "help": "Which weights each output unit keeps (how many is the selection's): greedy (chosen jointly by "
                "forward selection on the layer's Gram, in the last cycle, where a unit keeps at most half of its "
                "alive weights; under a pattern in every unit, with each group's count) or scores (its highest "
                "scores)", "default": "greedy for camp-hive without a pattern, else scores", "panel": "CAMP-HiVe"})
    merge_solver: str | None = field(default=None, metadata={
        "help": "How the least-squares merge is solved: auto (direct per unit up to 128 wide, conjugate gradients "
                "above), direct or cg", "default": "auto with merge least_squares", "panel": "CAMP-HiVe"})

    mode = "unstructured"

    def __post_init__(self) -> None:
        self._set("pattern", normalize_pattern(self.pattern))  # before the type check: YAML reads 2:4 as 124
        super().__post_init__()
        if self.pattern is not None:
            self._set("sparsity", pattern_sparsity(self.pattern, self.sparsity))
        if self.sparsity is None:
            raise ConfigError("sparsity is required for unstructured pruning, e.g. sparsity=0.9")
        check_sparsity(self.sparsity)
        keep_floor(1, self.min_keep)
        if not isinstance(self.criterion, Criterion) and canonical_name(self.criterion) not in WEIGHT_CRITERIA:
            raise ConfigError(f"criterion {self.criterion!r} scores channel groups only; use mode='structured' or "
                              f"one of {', '.join(WEIGHT_CRITERIA)}")
        if isinstance(self.criterion, Criterion) and not self.criterion.scores_weights():
            raise ConfigError(f"criterion {self.criterion.name!r} has no per-weight scores (scores(info)); "
                              "use it with mode='structured' or implement scores")
        camp_hive = is_camp_hive(self.criterion)
        explicit = [key for key in ("score", "curvature", "loss_weighting") if getattr(self, key) is not None]
        if isinstance(self.criterion, Criterion) and (explicit or self.first_order_weight):
            raise ConfigError(f"options {', '.join(explicit or ['first_order_weight'])} configure criterion camp-hive; "
                              f"set them on your {type(self.criterion).__name__} instance instead")
        self._set("selection", self.selection or default_selection(self.criterion))
        if is_layer_solver(self.criterion):
            check_solver_settings(self)
        self._set("merge", self.merge or (DEFAULTS["merge"] if camp_hive else "none"))
        self._set("pairing", self.pairing or DEFAULTS["pairing"])
        self._set("refit", (DEFAULTS["refit"] and camp_hive) if self.refit is None else self.refit)
        cycles = DEFAULTS["cycles"] if self.refit else DEFAULTS["cycles_without_refit"]
        self._set("cycles", self.cycles or (cycles if camp_hive else 1))
        self._set("curvature", self.curvature or DEFAULTS["curvature"])
        self._set("score", self.score or DEFAULTS["score"])
        self._resolve_unit_selection(camp_hive)
        self._resolve_merge_solver()
        if self.loss_weighting is None:  # the default weighting belongs to reconstruction scores only
            reads_reconstruction = self.curvature == "reconstruction" and self.score in ("diagonal", "obs")
            self._set("loss_weighting", DEFAULTS["loss_weighting"] if reads_reconstruction else "none")
        for option, choices in (("merge", MERGES), ("pairing", PAIRINGS), ("curvature", ("reconstruction", "loss")),
                                ("scope", ("global", "layer")), ("selection", SELECTIONS), ("schedule", SCHEDULES),
                                ("score", CAMP_HIVE_SCORES), ("eigen_method", EIGEN_METHODS),
                                ("loss_diagonal", ("fisher", "hutchinson"))):
            check_choice(option, getattr(self, option), choices)
        for option in ("top_k", "hutchinson_probes"):
            if getattr(self, option) < 1:
                raise ConfigError(f"{option} must be >= 1, got {getattr(self, option)}")
        for option in ("recovery_steps", "spectrum_top_k"):
            if getattr(self, option) < 0:
                raise ConfigError(f"{option} must be >= 0, got {getattr(self, option)}")
        self.criterion_object()  # the criterion's own options are checked now, not in the first cycle

    def _resolve_unit_selection(self, camp_hive: bool) -> None:
        """Greedy forward selection refits by least squares on the reconstruction curvature, weight by weight."""
        fits = (self.merge == "least_squares" and self.curvature == "reconstruction"
                and not is_layer_solver(self.criterion))
        if self.unit_selection is None:  # under a pattern forward selection is opt-in: no gain measured at 2:4, 4:8
            default = camp_hive and fits and self.pattern is None
            self._set("unit_selection", DEFAULTS["unit_selection"] if default else "scores")
        check_choice("unit_selection", self.unit_selection, UNIT_SELECTIONS)
        if self.unit_selection == "greedy" and not fits:
            raise ConfigError("unit_selection='greedy' chooses weights for a least-squares refit on the layer's Gram; "
                              "it needs merge='least_squares', curvature='reconstruction' and no layer solver: set "
                              "those or unit_selection='scores'")

    def _resolve_merge_solver(self) -> None:
        if self.merge_solver is not None and self.merge != "least_squares":
            raise ConfigError(f"merge_solver solves the least-squares merge; with merge={self.merge!r} drop it "
                              "or pass merge='least_squares'")
        if self.merge == "least_squares":
            self._set("merge_solver", self.merge_solver or "auto")
            check_choice("merge_solver", self.merge_solver, MERGE_SOLVERS)

    def weight_options(self) -> dict:
        return {"score": self.score, "curvature": self.curvature, "loss_weighting": self.loss_weighting,
                "first_order_weight": self.first_order_weight}

    def criterion_object(self) -> Criterion:
        """The criterion this run scores with (CAMP-HiVe configured by the weight-score options)."""
        options = self.weight_options() if is_camp_hive(self.criterion) else {}
        if is_layer_solver(self.criterion) and not isinstance(self.criterion, Criterion):
            options = {"damping": self.damping}
        return make_criterion(self.criterion, seed=self.seed, **options)
