"""What a pruning run returns, for both modes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PruneResult:
    """What a pruning run did and measured. ``masks``: parameter name -> bool (True = kept)."""

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
