"""What a pruning run returns, for both modes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PruneResult:
    """What a pruning run did and measured.

    Always measured: ``masks`` (parameter name -> bool, True = kept; empty for structured runs,
    whose channels are gone), ``sparsity`` (global: of the prunable weights, or of the prunable
    channels), ``layer_sparsity``, ``before``/``after`` (parameters and per-sample MACs, dense and
    non-zero), ``seconds`` (wall time of the whole call), ``cycles`` (per cycle: target, what was
    removed, seconds, the calibration quantities computed and their seconds, warnings),
    ``config`` (the resolved settings: every option as the run used it) and ``num_hvps`` /
    ``curvature_seconds`` / ``eigenvalues`` (loss-Hessian work the criterion asked for; 0 and
    empty for the default, which reads only the layers' reconstruction curvature).

    Measured only when asked: the sharpness report (``extra["sharpness"]``: top loss-Hessian
    eigenvalues before and after, unstructured ``spectrum_top_k`` > 0; empty by default) and,
    structured, latency before and after (``extra["latency"]``, ``measure_latency``; ``None`` when
    off). With an N:M ``pattern`` (unstructured), ``extra["dense_layers"]`` names the layers the
    pattern does not fit, left dense (``{parameter name: why}``). With the refit (``refit``, on by
    default for camp-hive in either mode), ``extra["refit"]`` holds the layers refitted, the refit's wall
    seconds, how it read the layers (``passes``: "one forward of each model" or "stopped forwards per layer")
    and, where the activations of all calibration batches did not fit in memory, ``first_layers``: how many
    layers, refitted first, saw how many of the samples. Not measured here: accuracy
    (evaluate the model: ``camphive.evaluate``) and the latency of unstructured models (masks do
    not make dense kernels faster).
    """

    mode: str
    masks: dict[str, torch.Tensor]
    sparsity: float
    layer_sparsity: dict[str, float]
    before: dict
    after: dict
    eigenvalues: dict
    num_hvps: int
    curvature_seconds: float
    seconds: float
    cycles: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "sparsity": self.sparsity, "layer_sparsity": self.layer_sparsity,
            "before": self.before, "after": self.after, "eigenvalues": self.eigenvalues,
            "num_hvps": self.num_hvps, "curvature_seconds": self.curvature_seconds, "seconds": self.seconds,
            "cycles": self.cycles, "config": self.config, **self.extra,
        }
