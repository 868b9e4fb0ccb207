"""Pair each weight pruned this cycle with a kept partner in the same output unit.

All functions work on one layer viewed as ``(out_units, fan_in)`` and return three index
tensors ``(rows, pruned_cols, partner_cols)`` of equal length: weight ``[rows[i],
pruned_cols[i]]`` merges into ``[rows[i], partner_cols[i]]``. Pruned weights whose unit has
no kept weight left get no partner (they are simply removed).
"""
from __future__ import annotations

import torch

from camphive.errors import ConfigError

PAIRINGS = ("cyclic", "coupled")
Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def cyclic_pairs(pruned: torch.Tensor, kept: torch.Tensor, significance: torch.Tensor) -> Pairs:
    """Round-robin pairing in significance order, per unit.

    In each unit, the pruned weights sorted by decreasing significance (p_1, p_2, ...) go to
    the kept weights sorted by decreasing significance (s_1, s_2, ...): p_i -> s_((i-1) mod |S|) + 1,
    so every kept weight receives a merge before any receives a second one.
    """
    pruned, kept = pruned.bool(), kept.bool()
    negative = torch.finfo(torch.float64).min
    significance = significance.double()
    kept_order = torch.where(kept, significance, negative).argsort(dim=1, descending=True, stable=True)
    pruned_order = torch.where(pruned, significance, negative).argsort(dim=1, descending=True, stable=True)
    kept_count = kept.sum(1, keepdim=True)
    pruned_count = pruned.sum(1, keepdim=True)
    position = torch.arange(pruned.shape[1], device=pruned.device).expand_as(pruned)
    valid = (position < pruned_count) & (kept_count > 0)
    partner_rank = position % kept_count.clamp_min(1)
    partners = kept_order.gather(1, partner_rank)
    rows = torch.arange(pruned.shape[0], device=pruned.device)[:, None].expand_as(pruned)
    return rows[valid], pruned_order[valid], partners[valid]


def coupled_pairs(pruned: torch.Tensor, kept: torch.Tensor, curvature, name: str,
                  chunk_elements: int = 2**24) -> Pairs:
    """Pair each pruned weight p with the kept s of its unit maximising |Hhat_ps| / sqrt(Hhat_ss).

    That ratio is how much of p's removal the partner s can absorb in the second-order
    model: the loss reduction of the best single-partner merge is Hhat_ps^2 / (2 Hhat_ss).
    """
    out_units, fan_in = pruned.shape
    rows, cols = pruned.bool().nonzero(as_tuple=True)
    has_partner = kept.bool().any(1)[rows]
    rows, cols = rows[has_partner], cols[has_partner]
    if rows.numel() == 0:
        return rows, cols, cols.clone()
    scale = curvature.diagonal(name, out_units).clamp_min(torch.finfo(torch.float32).tiny).rsqrt()
    partners = torch.empty_like(cols)
    step = max(1, chunk_elements // fan_in)
    for start in range(0, rows.numel(), step):
        r, c = rows[start : start + step], cols[start : start + step]
        coupling = curvature.matrix_rows(name, out_units, r, c).abs() * scale[r]
        coupling = coupling.masked_fill(~kept.bool()[r], -1.0)
        partners[start : start + step] = coupling.argmax(1)
    return rows, cols, partners


def make_pairs(pairing: str, pruned, kept, significance, curvature=None, name: str | None = None) -> Pairs:
    if pairing == "cyclic":
        return cyclic_pairs(pruned, kept, significance)
    if pairing == "coupled":
        if curvature is None:
            raise ConfigError("pairing='coupled' needs a curvature; use merge='curvature' or 'least_squares' with it")
        return coupled_pairs(pruned, kept, curvature, name)
    raise ConfigError(f"unknown pairing {pairing!r}; use one of {', '.join(PAIRINGS)}")
