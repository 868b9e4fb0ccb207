"""Which weights a unit keeps, chosen greedily on its reconstruction curvature (forward selection).

The selection of a cycle fixes how many weights each output unit keeps (``m``, from the scores compared
over all layers). Scores such as ``1/2 w_j^2 G_jj`` then choose *which* m independently of each other,
ignoring that correlated inputs can stand in for one another once the kept weights are refit. This module
chooses them jointly, the way orthogonal least squares (forward stepwise regression) does: starting from
no kept weight, add the one that lowers the unit's refit error

    E(S) = min over v supported on S of (w - v)^T H (w - v),   H = the unit's damped G,

the most, then the next given those, until m are kept. The error decrease of adding j is
``rho_j^2 / d_j`` with ``rho = H (w - v_S)`` the residual correlation and ``d_j`` the Schur complement
``H_jj - H_jS H_SS^-1 H_Sj``; both are updated in place with the rows ``U = L^-1 H_S,:`` of a growing
Cholesky factor ``L L^T = H_SS``, so a unit costs about ``a m^2`` (a: its alive weights). Removing weights
one at a time instead (backward, as Optimal Brain Compression does) costs about ``a^3 / 3``: forward is
the cheap direction when few weights stay, which is when the choice matters most.

Blocks: a step adds up to ``block`` weights at once (the largest gains, then orthogonalised together),
so a unit takes at most ``max_steps`` steps; ``block = 1`` is the exact greedy. The weights themselves
are refit afterwards by the least-squares merge (:func:`~camphive.pruning.unstructured.merging.
least_squares_merge`), whose solution on the chosen set is the ``v_S`` above.

N:M patterns: with ``groups`` (the fan-in's groups of M, :mod:`~camphive.pruning.unstructured.patterns`)
each unit keeps a given count in every group; a step then adds the largest gains among the entries of
groups not yet full (at most the group's remaining count per group and block), so the choice is joint
across the whole unit and the pattern holds exactly.
"""
from __future__ import annotations

import torch

from camphive.pruning.unstructured.merging import leading_columns
from camphive.pruning.unstructured.patterns import ranks_in_groups

# A unit is re-chosen greedily only where it keeps at most this fraction of its alive weights: there forward
# selection costs at most about a^3 / 8 (a m^2 / 2 in general), under 40 % of the backward elimination's a^3 / 3,
# and few kept weights is where choosing them jointly matters. Measured against 0.25 and 1 (every unit, every
# cycle) on resnet20 at sparsity 0.9 / 0.95 / 0.98: docs/method.md, section 11.
MAX_KEEP_FRACTION = 0.5
# Under an N:M pattern (opt-in there) every unit of a patterned layer is re-chosen in the last cycle, whatever it
# keeps (2:4 keeps 2 of the 3 weights a group has left after the first cycles); docs/method.md, section 4.
UNIT_SELECTIONS = ("greedy", "scores")
MAX_STEPS = 64  # steps per unit: blocks of ceil(m / 64) weights (exact greedy while m <= 64)
MAX_BYTES = 2**28  # state of a batch of units (their rows of L^-1 H)
DTYPE = torch.float32  # the choice only: the refit that follows is solved in float64


@torch.no_grad()
def choose_within_units(matrix: torch.Tensor, curvature, name: str, alive: torch.Tensor,
                        pruned_now: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
    """The weights to prune now, re-chosen by forward selection in every unit that keeps at most
    ``MAX_KEEP_FRACTION`` of its alive weights (same count per unit); other units as ``pruned_now`` has them.

    All arguments ``(out_units, fan_in)``; ``alive``, ``pruned_now`` bool. With ``groups`` (``(G, M)`` columns,
    an N:M layout), every unit pruning now is re-chosen with the same count in each group. Returns a new bool
    matrix.
    """
    alive, pruned_now = alive.bool(), pruned_now.bool()
    kept = alive & ~pruned_now
    if groups is None:
        greedy = pruned_now.any(1) & (kept.sum(1) <= MAX_KEEP_FRACTION * alive.sum(1))
        keep = torch.where(greedy, kept.sum(1), alive.sum(1))
    else:
        groups = groups.to(alive.device)
        greedy = pruned_now.any(1)
        keep = torch.where(greedy[:, None], kept[:, groups].sum(-1), alive[:, groups].sum(-1))
    if not bool(greedy.any()):
        return pruned_now.clone()
    chosen = greedy_keep(matrix, curvature, name, alive, keep, groups=groups)
    return torch.where(greedy[:, None], alive & ~chosen, pruned_now)


@torch.no_grad()
def greedy_keep(matrix: torch.Tensor, curvature, name: str, alive: torch.Tensor, keep: torch.Tensor,
                max_steps: int = MAX_STEPS, max_bytes: int = MAX_BYTES, groups: torch.Tensor | None = None) -> torch.Tensor:
    """``(out_units, fan_in)`` bool: for each unit r, ``keep[r]`` of its ``alive`` weights chosen by forward
    selection on its curvature in ``curvature`` (a :class:`~camphive.pruning.core.unit_curvature.UnitCurvature`).

    ``matrix``: the layer's weights ``(out_units, fan_in)`` (the target each unit is refit to); ``keep``:
    ``(out_units,)`` counts, at most the unit's alive weights. With ``groups`` (``(G, M)`` column indices
    covering the fan-in, an N:M layout), ``keep`` is ``(out_units, G)``: how many of each group's alive weights
    the unit keeps. A unit keeping all or none of its alive weights is returned as is (all or none).
    """
    out_units, fan_in = matrix.shape
    alive = alive.bool()
    keep = keep.to(torch.long).cpu()
    if groups is not None:
        groups = groups.to(alive.device)
        if keep.shape != (out_units, groups.shape[0]) or groups.numel() != fan_in:
            raise ValueError("with groups, keep must be (out_units, groups) and the groups must cover the fan-in")
        if bool((keep > alive[:, groups].sum(-1).cpu()).any()):
            raise ValueError("keep must be at most each group's alive weights")
    group_keep, keep = (keep, keep.sum(1)) if groups is not None else (None, keep)
    alive_counts = alive.sum(1).cpu()
    if bool((keep > alive_counts).any()) or bool((keep < 0).any()):
        raise ValueError("keep must be between 0 and each unit's alive weights")
    chosen = alive & (keep == alive_counts).to(alive.device)[:, None]
    units = ((keep > 0) & (keep < alive_counts)).nonzero().flatten()
    if units.numel() == 0:
        return chosen
    widths, by_width = alive_counts[units].sort()  # similar widths share a batch: less padding
    units = units[by_width]
    first = 0
    while first < units.numel():
        batch = _batch_size(units[first:], widths[first:], keep, max_steps, max_bytes)
        batch_units = units[first : first + batch]
        rows = batch_units.to(matrix.device)
        quota = None if group_keep is None else (groups, group_keep[batch_units].to(matrix.device))
        chosen[rows] = _forward_select(matrix[rows], curvature, name, out_units, rows, alive[rows],
                                       keep[batch_units].to(matrix.device), max_steps, quota)
        first += batch
    return chosen


def _batch_size(units, widths, keep, max_steps, max_bytes) -> int:
    """Units in the next batch: the state grows with the widest unit's alive count times the most kept."""
    size = 1
    while size < units.numel():
        width, most = int(widths[min(2 * size, units.numel()) - 1]), int(keep[units[: 2 * size]].max())
        if 8 * 2 * size * width * (most + 2 * _block(most, max_steps) + 4) > max_bytes:
            break
        size = min(2 * size, units.numel())
    return size


def _block(keep: int, max_steps: int) -> int:
    return max(1, -(-keep // max_steps))


def _forward_select(weights, curvature, name, out_units, rows, alive, keep, max_steps, quota=None) -> torch.Tensor:
    """Forward selection for a batch of units, on their alive columns only (padded to the widest).

    ``quota``: None, or ``(groups, group_keep)`` of an N:M layout: each step then takes, per group, at most
    what the group still has to keep."""
    batch, fan_in = weights.shape
    device = weights.device
    columns, valid = leading_columns(alive)  # alive columns first, padded to the widest unit
    width = columns.shape[1]
    block = _block(int(keep.max()), max_steps)
    residual = curvature.times(name, out_units, rows, weights).to(DTYPE).gather(1, columns) * valid
    schur = curvature.diagonal(name, out_units)[rows].to(DTYPE).gather(1, columns)
    schur = torch.where(valid, schur, torch.ones_like(schur))
    floor = 1e-12 * schur.masked_fill(~valid, 0.0).amax(1, keepdim=True)  # below: already explained, no gain
    steps = -(-int(keep.max()) // block)
    basis = torch.zeros(batch, steps * block, width, dtype=DTYPE, device=device)
    taken = torch.zeros(batch, dtype=torch.long, device=device)
    picked = torch.zeros(batch, width, dtype=torch.bool, device=device)
    if quota is not None:
        groups, remaining = quota[0], quota[1].clone()
        group_of = torch.empty(fan_in, dtype=torch.long, device=device)
        group_of[groups.flatten()] = torch.arange(groups.shape[0], device=device).repeat_interleave(groups.shape[1])
        column_group = group_of[columns]  # (batch, width)
    for step in range(steps):
        take = (keep - taken).clamp(0, block)
        gain = torch.where(schur > floor, residual**2 / schur.clamp_min(torch.finfo(DTYPE).tiny), 0.0)
        gain = gain.masked_fill(~valid | picked, -1.0)
        if quota is not None:
            gain = _within_quota(gain, columns, groups, remaining, fan_in)
        positions = gain.topk(block, dim=1).indices  # (batch, block)
        slots = torch.arange(block, device=device)[None, :] < take[:, None]
        # an entry the kept ones already explain (taken only to fill a group's count) adds nothing to the basis
        spans = slots & (schur.gather(1, positions) > floor)
        new_rows = _schur_rows(curvature, name, out_units, rows, columns, positions, basis[:, : step * block])
        new_rows = new_rows * spans[:, :, None]
        pivots = new_rows.gather(2, positions[:, None, :].expand(-1, block, -1))  # (batch, block, block)
        pivots = pivots * (spans[:, :, None] & spans[:, None, :]) + torch.diag_embed((~spans).to(pivots.dtype))
        factor = _cholesky(pivots)
        orthogonal = torch.linalg.solve_triangular(factor, new_rows, upper=False)  # rows of L^-1 H for the block
        along = torch.linalg.solve_triangular(factor, (residual.gather(1, positions) * spans).unsqueeze(-1),
                                              upper=False)
        schur -= (orthogonal**2).sum(1)
        residual -= (orthogonal * along).sum(1)
        basis[:, step * block : (step + 1) * block] = orthogonal
        picked |= torch.zeros_like(picked).scatter_(1, positions, slots)  # positions past the slots may be picked ones
        if quota is not None:
            remaining.scatter_add_(1, column_group.gather(1, positions), -slots.to(torch.long))
        taken += take
    chosen = torch.zeros(batch, fan_in, dtype=torch.bool, device=device)
    chosen.scatter_(1, columns, picked & valid)
    return chosen


def _within_quota(gain, columns, groups, remaining, fan_in) -> torch.Tensor:
    """``gain`` with -1 on every entry beyond its group's remaining count (the group's largest gains stay)."""
    full = torch.full((gain.shape[0], fan_in), -1.0, dtype=gain.dtype, device=gain.device)
    full.scatter_(1, columns, gain)
    grouped = full[:, groups]  # (batch, G, M)
    grouped = grouped.masked_fill(ranks_in_groups(grouped, descending=True) >= remaining[:, :, None], -1.0)
    full[:, groups.flatten()] = grouped.flatten(1)
    return full.gather(1, columns)


def _cholesky(pivots: torch.Tensor) -> torch.Tensor:
    """Cholesky factors of the blocks' Schur complements; positive definite under any damping > 0, else (two
    inputs equal on the calibration data, damping 0) regularised by a relative 1e-10 on the diagonal."""
    factor, info = torch.linalg.cholesky_ex(pivots)
    if bool((info != 0).any()):
        scale = pivots.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)
        shift = 1e-10 * scale[:, None, None] * torch.eye(pivots.shape[-1], dtype=pivots.dtype, device=pivots.device)
        factor = torch.linalg.cholesky(pivots + shift)
    return factor


def _schur_rows(curvature, name, out_units, rows, columns, positions, basis) -> torch.Tensor:
    """``(batch, block, width)``: rows ``positions`` of ``H`` (over the alive columns) minus what the kept
    weights already explain, ``H_P,: - U_:,P^T U``."""
    original = columns.gather(1, positions)
    full = curvature.unit_rows(name, out_units, rows, original).to(DTYPE)  # (batch, block, fan_in)
    rows_of_h = full.gather(2, columns[:, None, :].expand(-1, positions.shape[1], -1))
    if basis.shape[1] == 0:
        return rows_of_h
    at_positions = basis.gather(2, positions[:, None, :].expand(-1, basis.shape[1], -1))  # (batch, t, block)
    return rows_of_h - at_positions.transpose(1, 2) @ basis
