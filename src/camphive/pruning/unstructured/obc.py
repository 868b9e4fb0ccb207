"""Optimal Brain Compression / ExactOBS (Frantar & Alistarh, 2022) for unstructured and N:M sparsity.

Each row ``w`` of ``W (out_units, fan_in)`` is pruned greedily, one weight at a time, by Optimal Brain
Surgeon on the layer Hessian ``H`` (the damped ``E[x x^T]``): remove the p with the smallest
``w_p^2 / [H^-1]_pp`` (the exact error increase), update the others ``w -= (w_p / [H^-1]_pp) H^-1[:, p]``
and eliminate p from ``H^-1`` (``H^-1 -= H^-1[:, p] H^-1[p, :] / [H^-1]_pp``). After k steps a row's
weights are the exact least-squares optimum for its k removed entries, and its summed step losses are
its exact error. Recording every row's trajectory gives OBC's global error database: how many entries
each row loses is then chosen so the layer loses exactly ``count`` with the least summed error, and each
row's final weights are the closed-form OBS solution for its first removals.

Rows run in batches, each with its own copy of ``H^-1`` (memory ``fan_in^2`` float64 per row, bounded by
``max_bytes``). The eliminations are applied lazily: a step needs one column and the diagonal of the
current inverse, so the last few rank-1 downdates are kept as vectors and folded in by one batched
matrix product every ``LAZY_STEPS`` steps; the inverse is compacted to the entries left as they shrink.
"""
from __future__ import annotations

import torch

from camphive.errors import ConfigError
from camphive.pruning.unstructured.reconstruction_hessian import (
    alive_matrix,
    check_pattern,
    damped_hessian,
    positive_definite_inverse,
    pruned_alive_count,
    weight_matrix,
)
from camphive.pruning.unstructured.removal_allocation import allocate_removals, obs_weights

LAZY_STEPS = 32


@torch.no_grad()
def obc_prune(weight: torch.Tensor, gram: torch.Tensor, count: int | None = None, *,
              alive: torch.Tensor | None = None, damping: float = 0.01, pattern: tuple[int, int] | None = None,
              max_fan_in: int = 4096, max_bytes: int = 2**28,
              layer: str = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``count`` entries of a layer by greedy per-row OBS and a global choice; returns ``(new_weight, kept)``.

    ``weight``: linear ``(out, in)`` or conv ``(out, in, *kernel)``; ``gram``: ``(fan_in, fan_in)``; ``count``:
    entries pruned in the whole layer, already pruned ones (``alive`` False) included, which are removed
    first (a nonzero weight there is folded into the others). ``pattern=(n, m)``: N:M sparsity instead,
    each row greedy under the constraint. ``layer`` names the layer in errors. Both results have
    ``weight``'s shape; ``new_weight`` has its dtype and device, exact zeros where pruned.
    """
    matrix = weight_matrix(weight)
    out_units, fan_in = matrix.shape
    if fan_in > max_fan_in:
        raise ConfigError(f"{layer} of {out_units} x {fan_in} has fan-in {fan_in} above OBC's max_fan_in "
                          f"{max_fan_in} (cost fan_in^3 per row); use sparsegpt, or raise max_fan_in")
    hessian, dead_inputs = damped_hessian(gram, damping, fan_in)
    alive_entries = alive_matrix(alive, matrix.shape)
    inverse = positive_definite_inverse(hessian)
    dead_per_row = (~alive_entries).sum(1)
    if pattern is None:
        to_prune = pruned_alive_count(count, alive_entries)
        steps = min(fan_in, int(dead_per_row.max()) + to_prune)  # no row can lose more
        order, losses = greedy_trajectories(matrix, inverse, alive_entries, dead_inputs, steps, None, max_bytes)
        cumulative = torch.cat([torch.zeros(out_units, 1, dtype=torch.float64), losses.cumsum(1)], dim=1)
        steps_taken = torch.arange(steps + 1)
        cumulative[steps_taken[None, :] < dead_per_row[:, None]] = float("inf")  # dead entries go first
        removals = allocate_removals(cumulative, count)
    else:
        prune_per_group, group = check_pattern(pattern, fan_in)
        # A group loses n, or all its dead entries if more.
        dead_per_group = (~alive_entries).reshape(out_units, -1, group).sum(2)
        removals = dead_per_group.clamp_min(prune_per_group).sum(1)
        order, _ = greedy_trajectories(matrix, inverse, alive_entries, dead_inputs, int(removals.max()),
                                       (prune_per_group, group), max_bytes)
    removed = torch.zeros_like(alive_entries)
    first_steps = torch.arange(order.shape[1])[None, :] < removals[:, None]
    removed.scatter_(1, order, first_steps)
    pruned_weights = obs_weights(matrix, hessian, inverse, removed, max_bytes)
    return (pruned_weights.reshape(weight.shape).to(weight.device, weight.dtype),
            (~removed).reshape(weight.shape).to(weight.device))


def greedy_trajectories(matrix: torch.Tensor, inverse: torch.Tensor, alive: torch.Tensor, dead_inputs: torch.Tensor,
                        steps: int, pattern: tuple[int, int] | None = None,
                        max_bytes: int = 2**28) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first ``steps`` greedy OBS removals: ``(order, losses)``, both ``(out_units, steps)``.

    ``order[r, t]``: the column removed at step t; ``losses[r, t]``: the exact error increase
    ``w_p^2 / [H^-1]_pp``, but 0 for entries already dead (removed first) and for inputs never seen
    (``dead_inputs``, whose only cost is the damping's). With ``pattern=(n, m)`` a group that has lost n is
    closed: a row takes from it only once every group is closed (those steps are recorded, never used).
    ``inverse``: ``H^-1 (fan_in, fan_in)``; rows run in batches of at most ``max_bytes`` of state.
    """
    out_units, fan_in = matrix.shape
    bytes_per_row = 8 * fan_in * (fan_in + LAZY_STEPS + 8)
    rows_per_batch = max(1, max_bytes // bytes_per_row)
    order = torch.empty(out_units, steps, dtype=torch.long)
    losses = torch.empty(out_units, steps, dtype=torch.float64)
    for first in range(0, out_units, rows_per_batch):
        rows = slice(first, first + rows_per_batch)
        order[rows], losses[rows] = _batch_trajectory(matrix[rows], inverse, alive[rows], dead_inputs, steps,
                                                      pattern)
    return order, losses


class _BatchState:
    """The greedy state of a batch of rows, over the columns left (``width`` of them, the same in every row).

    ``stale_inverse (b, width, width)`` lacks the last ``pending`` downdates, kept as the rows of
    ``V = vectors[:, :pending]`` (current inverse = stale - V^T V); ``diagonal`` and ``weights`` are always
    current; ``columns`` maps each position back to its original column.
    """

    def __init__(self, weights: torch.Tensor, inverse: torch.Tensor, alive: torch.Tensor):
        batch, fan_in = weights.shape
        self.weights = weights.clone()
        self.stale_inverse = inverse.expand(batch, fan_in, fan_in).clone()
        self.diagonal = inverse.diagonal().expand(batch, fan_in).clone()
        self.columns = torch.arange(fan_in).expand(batch, fan_in).clone()
        self.dead = ~alive
        self.removed = torch.zeros(batch, fan_in, dtype=torch.bool)
        self.vectors = torch.empty(batch, LAZY_STEPS, fan_in, dtype=torch.float64)
        self.pending = 0

    def remove(self, positions: torch.Tensor) -> torch.Tensor:
        """Remove one entry per row (at ``positions``, ``(b,)``) with the OBS update; returns its error increase."""
        rows = torch.arange(positions.numel())
        column = self.stale_inverse[rows, positions]  # symmetric: row p is column p
        if self.pending:
            pending = self.vectors[:, : self.pending]
            at_position = pending[rows, :, positions]  # (b, pending)
            column = column - (at_position.unsqueeze(1) @ pending).squeeze(1)
        pivot = column[rows, positions].clamp_min(torch.finfo(torch.float64).tiny)
        removed_weight = self.weights[rows, positions]
        self.weights -= (removed_weight / pivot)[:, None] * column
        self.weights[rows, positions] = 0.0
        vector = column / pivot.sqrt()[:, None]
        self.diagonal -= vector**2
        self.vectors[:, self.pending] = vector
        self.pending += 1
        self.removed[rows, positions] = True
        if self.pending == LAZY_STEPS:
            self._fold_pending()
        return removed_weight**2 / pivot

    def _fold_pending(self) -> None:
        pending = self.vectors[:, : self.pending]
        self.stale_inverse.baddbmm_(pending.transpose(1, 2), pending, alpha=-1.0)
        self.pending = 0
        left = int((~self.removed[0]).sum())
        if 0 < left <= 3 * self.removed.shape[1] // 4:
            self._compact(left)

    def _compact(self, left: int) -> None:
        """Keep only the positions not removed (every row has ``left`` of them), in column order."""
        keep = (~self.removed).nonzero()[:, 1].view(-1, left)
        rows = torch.arange(keep.shape[0])[:, None, None]
        self.stale_inverse = self.stale_inverse[rows, keep[:, :, None], keep[:, None, :]]
        for name in ("weights", "diagonal", "columns", "dead", "removed"):
            setattr(self, name, getattr(self, name).gather(1, keep))
        self.vectors = torch.empty(keep.shape[0], LAZY_STEPS, left, dtype=torch.float64)


def _batch_trajectory(weights: torch.Tensor, inverse: torch.Tensor, alive: torch.Tensor, dead_inputs: torch.Tensor,
                      steps: int, pattern: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    state = _BatchState(weights, inverse, alive)
    batch = weights.shape[0]
    rows = torch.arange(batch)
    order = torch.empty(batch, steps, dtype=torch.long)
    losses = torch.empty(batch, steps, dtype=torch.float64)
    if pattern is not None:
        group_losses = torch.zeros(batch, weights.shape[1] // pattern[1], dtype=torch.long)
    for step in range(steps):
        scores = state.weights**2 / state.diagonal
        scores[dead_inputs[state.columns]] = 0.0  # an input never seen costs nothing (but for the damping)
        if pattern is not None:
            closed = group_losses.gather(1, state.columns // pattern[1]) >= pattern[0]
            scores[closed] = torch.finfo(torch.float64).max  # only once every group is closed
        scores = scores.masked_fill(state.dead, float("-inf")).masked_fill(state.removed, float("inf"))
        positions = scores.argmin(1)
        free = state.dead[rows, positions] | dead_inputs[state.columns[rows, positions]]
        order[:, step] = state.columns[rows, positions]
        losses[:, step] = torch.where(free, 0.0, state.remove(positions))  # may compact: positions go stale
        if pattern is not None:
            group_losses.scatter_add_(1, order[:, step : step + 1] // pattern[1],
                                      torch.ones(batch, 1, dtype=torch.long))
    return order, losses
