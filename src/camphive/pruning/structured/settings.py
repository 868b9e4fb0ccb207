"""Settings of structured pruning (whole channels removed), checked on construction."""
from __future__ import annotations

from dataclasses import dataclass, field

from camphive.devices import cpu_vector_floats
from camphive.errors import ConfigError
from camphive.measure.layer_timing import RUNTIMES
from camphive.pruning.core.settings import PruneSettings, check_choice
from camphive.pruning.criteria import Criterion, canonical_name, is_camp_hive, is_layer_solver, make_criterion
from camphive.pruning.criteria.camp_hive import CHANNEL_SCORES
from camphive.pruning.structured.budget import ChannelRounding, check_targets
from camphive.pruning.structured.merging import BETA_SOURCES, FLATTEN_FITS, STRUCTURED_MERGES, STRUCTURED_PAIRINGS

# Defaults for CAMP-HiVe (baselines default to plain removal, merge="none"), chosen by measurement
# (benchmarks/structured.py, benchmarks/RESULTS.md, docs/method.md).
DEFAULTS = {"channel_score": "greedy_obs", "merge": "least_squares", "pairing": "coupled", "beta_from": "activations",
            "flatten_fit": "shared", "intercept": False, "recalibrate_bn": True, "cycles": 1, "refit": True,
            # Kept channels in multiples of the CPU's float32 vector width (round_to: cpu_vector_floats(),
            # 16 with AVX-512, else 8) where a group had at least 16 (benchmarks/structured.py).
            "round_min_group": 16}


@dataclass(frozen=True)
class StructuredSettings(PruneSettings):
    """Structured pruning. Targets (exactly one): ``sparsity``, the fraction of each group's
    channels to remove (of all prunable channels with ``global_pruning``), or
    ``target_macs_ratio`` (2.0 = half the MACs), reached linearly over ``cycles``.

    ``round_to`` rounds kept channel counts to multiples of it, in groups that had at least
    ``round_min_group`` channels. Default (``round_to=None``): multiples of this CPU's float32
    vector width (:func:`camphive.devices.cpu_vector_floats`: 16 with AVX-512, else 8) in groups of
    at least 16 channels, measured to give the fast shapes (convolution kernels pad channel counts
    to the vector width; unrounded counts bought only 0.44-0.78 of the MACs reduction in latency);
    ``round_to=1`` keeps exact counts; an explicit ``round_to`` rounds every group unless
    ``round_min_group`` says otherwise. With a MACs target, rounded counts and uniform allocation,
    ``latency_aware`` (default) times each layer on this machine at the multiples just below and
    above its uniform count and keeps the mix of lowest predicted latency whose MACs stay within
    2 % under the target, if it saves more than 1 %
    (:mod:`~camphive.pruning.structured.latency_allocation`); the shapes then depend on the
    machine and on timing noise (``latency_aware=False``: the same shapes everywhere);
    ``latency_reach=n`` lets each group go ``n`` multiples further either way (opt-in: faster shapes,
    measured to cost accuracy before fine-tuning); ``latency_runtime="onnxruntime"`` times the
    layers in onnxruntime instead of PyTorch, for models that will run exported (the timing before
    and after pruning stays in PyTorch). Every group keeps
    at least ``min_channels`` (a count, or a fraction if < 1). ``channel_score``
    (CAMP-HiVe): "greedy_obs", "obs" or "summed". ``merge``: "least_squares" (``intercept``
    adds a constant to the fit), "pair" (``pairing`` coupled|cyclic, ``beta_from``
    activations|weights) or "none"; ``flatten_fit`` (shared|per_position) for linear layers
    after a flatten. ``measure_latency`` times the model before and after at
    ``latency_batch_sizes`` (``latency_threads``, about ``latency_seconds`` per size; NHWC with
    ``latency_channels_last``; compiled by torch.compile with ``latency_compiled``).
    """

    sparsity: float | None = None  # its --sparsity help: UnstructuredSettings.sparsity (one option, both modes)
    target_macs_ratio: float | None = field(default=None, metadata={
        "help": "Structured: MACs reduction to reach instead of a sparsity, e.g. 2.0", "default": "", "panel": "Pruning"})
    global_pruning: bool = field(default=False, metadata={
        "help": "Rank channels across layers", "off_help": "Remove the same fraction of every layer",
        "panel": "Structured"})
    round_to: int | None = field(default=None, metadata={
        "help": "Keep channel counts in multiples of N (1: exact)",
        "default": "the CPU's vector width (16 with AVX-512, else 8) in groups of >= 16 channels",
        "min": 1, "panel": "Structured"})
    round_min_group: int | None = field(default=None, metadata={
        "help": "Round only groups of at least N channels", "default": "16 with the default --round-to, else 0",
        "panel": "Structured"})
    latency_aware: bool = field(default=True, metadata={
        "help": "With a MACs target and rounded counts, round each group up or down by timing its layers here",
        "off_help": "Round as uniformly as the multiples allow (the same shapes on every machine)",
        "panel": "Structured"})
    latency_reach: int = field(default=0, metadata={
        "help": "Latency-aware rounding: multiples each group may move beyond the two around its uniform count "
                "(faster shapes, less accuracy before fine-tuning)", "min": 0, "panel": "Structured"})
    latency_runtime: str = field(default="torch", metadata={
        "help": "Latency-aware rounding: time the layers in torch (PyTorch) or onnxruntime (for exported models)",
        "panel": "Structured"})
    min_channels: int | float = field(default=1, metadata={
        "help": "Channels every layer keeps: a count, or a fraction if < 1", "panel": "Structured"})
    channel_score: str | None = field(default=None, metadata={
        "help": "Channel score: greedy_obs, obs (camp-hive) or summed",
        "default": "greedy_obs for camp-hive, else summed", "panel": "Structured"})
    beta_from: str | None = field(default=None, metadata={
        "help": "--merge pair: coefficients from activations or weights", "default": "activations",
        "panel": "Structured"})
    flatten_fit: str | None = field(default=None, metadata={
        "help": "Least-squares merge into a linear layer after a flatten: shared or per_position",
        "default": "shared", "panel": "Structured"})
    intercept: bool | None = field(default=None, metadata={
        "help": "Add a constant to the least-squares merge", "default": False,
        "off_help": "Fit without a constant", "panel": "Structured"})
    measure_latency: bool = field(default=True, metadata={
        "help": "Time the model before and after pruning", "off_help": "Skip the timing",
        "panel": "Latency (structured)"})
    latency_batch_sizes: tuple = field(default=(1, 64), metadata={
        "help": "Comma-separated batch sizes to time", "items": int, "panel": "Latency (structured)"})
    latency_threads: int | None = field(default=None, metadata={
        "help": "Threads while timing", "default": "torch's current number", "panel": "Latency (structured)"})
    latency_seconds: float = field(default=1.0, metadata={
        "help": "About this long per batch size", "panel": "Latency (structured)"})
    latency_channels_last: bool = field(default=False, metadata={
        "help": "Time the models in the NHWC layout (usually faster on CPUs)",
        "off_help": "Time them in the NCHW layout", "panel": "Latency (structured)"})
    latency_compiled: bool = field(default=False, metadata={
        "help": "Time the models compiled by torch.compile (adds compile time; needs a C++ compiler)",
        "off_help": "Time them uncompiled", "panel": "Latency (structured)"})

    mode = "structured"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_targets(self.sparsity, self.target_macs_ratio)
        if self.round_to is not None and self.round_to < 1:
            raise ConfigError(f"round_to must be a positive channel count such as 8 (1: no rounding), got {self.round_to}")
        if self.round_min_group is not None and self.round_min_group < 0:
            raise ConfigError(f"round_min_group must be a channel count >= 0, got {self.round_min_group}")
        if self.round_to is None:
            self._set("round_to", cpu_vector_floats())
            self._set("round_min_group", DEFAULTS["round_min_group"] if self.round_min_group is None
                      else self.round_min_group)
        elif self.round_min_group is None:
            self._set("round_min_group", 0)
        if self.latency_reach < 0:
            raise ConfigError(f"latency_reach must be a number of multiples >= 0 (0: just below or above the uniform "
                              f"count), got {self.latency_reach}")
        check_choice("latency_runtime", self.latency_runtime, RUNTIMES)
        if not self.min_channels > 0:
            raise ConfigError(f"min_channels must be > 0 (a count, or a fraction below 1), got {self.min_channels}")
        camp_hive = is_camp_hive(self.criterion)
        canonical_name(self.criterion)  # an unknown name fails here
        if is_layer_solver(self.criterion):
            raise ConfigError(f"criterion {canonical_name(self.criterion)} solves layers of single weights; use "
                              "mode='unstructured' (structured criteria: see camphive.pruning.criteria.STRUCTURED_CRITERIA)")
        self._set("channel_score", self.channel_score or (DEFAULTS["channel_score"] if camp_hive else "summed"))
        self._set("merge", self.merge or (DEFAULTS["merge"] if camp_hive else "none"))
        self._set("cycles", self.cycles or DEFAULTS["cycles"])
        self._set("refit", (DEFAULTS["refit"] and camp_hive) if self.refit is None else self.refit)
        for option in ("pairing", "beta_from", "flatten_fit", "intercept"):
            if getattr(self, option) is None:
                self._set(option, DEFAULTS[option])
        for option, choices in (("merge", STRUCTURED_MERGES), ("pairing", STRUCTURED_PAIRINGS),
                                ("beta_from", BETA_SOURCES), ("flatten_fit", FLATTEN_FITS),
                                ("channel_score", CHANNEL_SCORES)):
            check_choice(option, getattr(self, option), choices, " for structured pruning")
        if self.channel_score != "summed" and not camp_hive:
            raise ConfigError(f"channel_score={self.channel_score!r} belongs to criterion camp-hive; drop it for "
                              f"{canonical_name(self.criterion)}")
        if self.channel_score != "summed" and self.weight_options():
            raise ConfigError(f"criterion camp-hive (channel_score {self.channel_score}) takes no weight-score "
                              f"options, got {sorted(self.weight_options())}; they apply with channel_score='summed'")
        self.criterion_object()

    def rounding(self) -> ChannelRounding:
        return ChannelRounding(self.round_to, self.round_min_group)

    def weight_options(self) -> dict:
        """The weight-score options the user set (CAMP-HiVe with channel_score='summed')."""
        return {key: getattr(self, key) for key in ("score", "curvature", "loss_weighting", "first_order_weight")
                if getattr(self, key)}

    def criterion_object(self) -> Criterion:
        if isinstance(self.criterion, Criterion):
            return self.criterion
        if is_camp_hive(self.criterion):
            return make_criterion("camp-hive", seed=self.seed, channel_score=self.channel_score,
                                  **self.weight_options())
        return make_criterion(self.criterion, seed=self.seed)
