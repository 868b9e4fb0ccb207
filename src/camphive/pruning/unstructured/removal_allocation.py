"""How many entries each row loses, and the rows' weights once they have: the two halves of OBC's global step.

``allocate_removals`` reads a per-row table of cumulative errors (the error database) and picks one
removal count per row, adding up to the layer's count with the least summed error. ``obs_weights`` gives
each row's exact least-squares weights for a fixed set of removed entries (closed-form OBS).
"""
from __future__ import annotations

import torch

from camphive.pruning.unstructured.merging import leading_columns

EXACT_LIMIT = 2**22  # rows x (count + 1) x (steps + 1): the exact dynamic program's work above which it is skipped


def allocate_removals(cumulative: torch.Tensor, count: int) -> torch.Tensor:
    """Removals per row ``(out_units,)`` adding up to ``count``, least ``sum_r cumulative[r, k_r]``.

    ``cumulative (out_units, steps + 1)``: row r's error after k removals (``inf`` where k is not allowed;
    the allowed ks of a row must be consecutive). Exact by dynamic programming on small tables; otherwise by
    the Lagrangian relaxation, exact when each row's errors are convex in k (greedy OBS errors nearly are)
    and else off by at most one row's gap to its convex hull.
    """
    out_units, width = cumulative.shape
    if out_units * (count + 1) * width <= EXACT_LIMIT:
        return _allocate_exactly(cumulative, count)
    return _allocate_by_price(cumulative, count)


def _allocate_exactly(cumulative: torch.Tensor, count: int) -> torch.Tensor:
    """Dynamic program over rows: ``best[t]`` = least error of the rows so far losing t in all."""
    out_units, width = cumulative.shape
    best = torch.full((count + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    totals = torch.arange(count + 1)[:, None]
    taken = totals - torch.arange(width)[None, :]  # (count + 1, width): removals before this row
    choices = torch.empty(out_units, count + 1, dtype=torch.long)
    for row in range(out_units):
        before = torch.where(taken >= 0, best[taken.clamp_min(0)], float("inf"))
        best, choices[row] = (before + cumulative[row][None, :]).min(1)
    removals = torch.empty(out_units, dtype=torch.long)
    left = count
    for row in reversed(range(out_units)):
        removals[row] = choices[row, left]
        left -= int(removals[row])
    return removals


def _allocate_by_price(cumulative: torch.Tensor, count: int) -> torch.Tensor:
    """Bisect a price per removal: at price lam each row takes its smallest argmin of ``error - lam k``.

    The counts grow with the price; the last price below ``count`` is the start and the rows that jump at
    the crossing price fill the rest, cheapest slope first (the last one possibly between hull vertices).
    """
    steps = torch.arange(cumulative.shape[1], dtype=torch.float64)
    finite = cumulative[torch.isfinite(cumulative)]
    # Errors grow with k: below price 0 every row takes its fewest, above the spread of errors its most.
    low, high = -1.0, float(finite.max() - finite.min()) + 1.0

    def removals_at(price: float) -> torch.Tensor:
        return (cumulative - price * steps).argmin(1)  # first minimum: the fewest removals

    at_low, at_high = removals_at(low), removals_at(high)
    for _ in range(200):
        if int(at_low.sum()) == count:
            return at_low
        middle = (low + high) / 2
        if middle in (low, high):
            break
        at_middle = removals_at(middle)
        if int(at_middle.sum()) <= count:
            low, at_low = middle, at_middle
        else:
            high, at_high = middle, at_middle
    room = at_high - at_low
    rows = room.nonzero().flatten()
    slopes = (cumulative[rows, at_high[rows]] - cumulative[rows, at_low[rows]]) / room[rows]
    rows = rows[slopes.argsort(stable=True)]
    filled_before = room[rows].cumsum(0) - room[rows]
    extra = (count - int(at_low.sum()) - filled_before).clamp(min=torch.zeros_like(room[rows]), max=room[rows])
    removals = at_low.clone()
    removals[rows] += extra
    return removals


def obs_weights(matrix: torch.Tensor, hessian: torch.Tensor, inverse: torch.Tensor, removed: torch.Tensor,
                max_bytes: int = 2**28) -> torch.Tensor:
    """Each row's least-squares weights with its ``removed`` entries at zero: ``argmin (w - w0)^T H (w - w0)``.

    ``matrix``, ``removed``: ``(out_units, fan_in)``; ``hessian``, ``inverse``: ``H`` and ``H^-1``, float64.
    Per row, on the smaller side: kept set S, ``dw_S = H_SS^-1 H_SR w_R``; or removed set R,
    ``dw = -H^-1[:, R] (H^-1_RR)^-1 w_R``. Rows of similar width share a padded batched solve.
    """
    result = matrix.clone()
    kept = ~removed
    partial = removed.any(1) & kept.any(1)
    on_removed = removed.sum(1) <= kept.sum(1)
    for dual in (True, False):
        members = removed if dual else kept
        rows = (partial & (on_removed == dual)).nonzero().flatten()
        widths, by_width = members[rows].sum(1).sort()
        rows = rows[by_width]
        first = 0
        while first < rows.numel():
            # Sorted by width, a chunk's memory is set by its last (widest) row.
            width = int(widths[min(first + 255, rows.numel() - 1)])
            chunk = rows[first : first + max(1, min(256, max_bytes // (8 * (width * width + matrix.shape[1]))))]
            result[chunk] += _obs_update(matrix[chunk], removed[chunk], members[chunk], hessian, inverse, dual)
            first += chunk.numel()
    result[removed] = 0.0
    return result


def _obs_update(weights, removed, members, hessian, inverse, dual: bool) -> torch.Tensor:
    """The change of a chunk's rows, solved on ``members`` (the removed entries if ``dual``, else the kept)."""
    order, valid = leading_columns(members)  # members first
    both_valid = valid[:, :, None] & valid[:, None, :]
    source = inverse if dual else hessian
    system = source[order[:, :, None], order[:, None, :]] * both_valid + torch.diag_embed((~valid).double())
    if dual:
        right = weights.gather(1, order)
    else:
        right = ((weights * removed) @ hessian).gather(1, order)  # H_SR w_R (H is symmetric)
    solution = torch.cholesky_solve((right * valid).unsqueeze(-1), torch.linalg.cholesky(system)).squeeze(-1)
    spread = torch.zeros_like(weights).scatter_add_(1, order, solution * valid)
    return -(spread @ inverse) if dual else spread
