"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning of a layer by sequential OBS over its columns.

The columns of ``W (out_units, fan_in)`` are processed left to right. When column j is reached, every
row drops the weights the mask prunes there and spreads the error over the columns not yet processed,
by the Optimal Brain Surgeon update for the Hessian restricted to columns ``>= j``. All those restricted
inverses come from one matrix: with ``U`` the upper Cholesky factor of ``H^-1`` (``U^T U = H^-1``),
``[(H_{j:, j:})^-1]_{:, 0} = U_jj U[j, j:]``, so pruning ``w_j`` is ``w[j:] -= (w_j / U_jj) U[j, j:]``.

Columns go in blocks of ``block_size``: inside a block updates are applied at once; the columns after it
receive the block's updates in one matrix product at its end (lazy batching; exact, only the order of
additions changes). At the start of each block the mask is chosen for the whole block, over all rows
jointly, as the entries with the smallest ``w^2 / U_jj^2`` (the OBS error of pruning them now); the
count is spread over blocks by cumulative rounding so the layer loses exactly ``count`` entries. With an
N:M ``pattern`` the choice is made per row at the first column of each group of m instead.
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


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, gram: torch.Tensor, count: int | None = None, *,
                    alive: torch.Tensor | None = None, block_size: int = 128, damping: float = 0.01,
                    pattern: tuple[int, int] | None = None,
                    max_bytes: int = 2**28) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``count`` entries of a layer and update the rest to keep its outputs; returns ``(new_weight, kept)``.

    ``weight``: a linear ``(out, in)`` or conv ``(out, in, *kernel)`` weight; ``gram``: ``(fan_in, fan_in)``,
    ``E[x x^T]`` of the layer's inputs; ``count``: entries pruned in the whole layer, those already pruned
    (``alive`` False, weight-shaped or ``(out, fan_in)``) included: they stay pruned, and a nonzero weight
    there is folded into the others like any pruned weight. ``pattern=(n, m)``: N:M sparsity instead of
    ``count``, n of every m consecutive inputs of each row pruned (more where ``alive`` already pruned
    more). ``max_bytes`` bounds the temporaries of the lazy updates (rows are chunked).

    Both results have ``weight``'s shape; ``new_weight`` has its dtype and device, exact zeros where pruned.
    Work is float64 on the CPU.
    """
    matrix = weight_matrix(weight)
    out_units, fan_in = matrix.shape
    hessian, dead_inputs = damped_hessian(gram, damping, fan_in)
    alive_entries = alive_matrix(alive, matrix.shape)
    if block_size < 1:
        raise ConfigError(f"block_size {block_size} must be a positive number of columns; use e.g. 128")
    # U with U^T U = H^-1: the Cholesky factor of the inverse, read from the top row down.
    upper = torch.linalg.cholesky(positive_definite_inverse(hessian), upper=True)
    if pattern is None:
        quotas = block_quotas(alive_entries, pruned_alive_count(count, alive_entries), block_size)
        group = block_size  # one choice per block
    else:
        prune_per_group, group = check_pattern(pattern, fan_in)
        block_size = max(group, block_size // group * group)  # a group never straddles a lazy update
    pruned = torch.zeros_like(alive_entries)
    for block_index, start in enumerate(range(0, fan_in, block_size)):
        end = min(start + block_size, fan_in)
        block = matrix[:, start:end].clone()
        diagonal = upper.diagonal()[start:end]
        for offset in range(0, end - start, group):
            # Chosen now, after every update from the columns before: the scores are the current OBS errors.
            width = min(group, end - start - offset)
            scores = block[:, offset : offset + width] ** 2 / diagonal[offset : offset + width] ** 2
            scores[:, dead_inputs[start + offset : start + offset + width]] = 0.0  # never seen: free to prune
            still_alive = alive_entries[:, start + offset : start + offset + width]
            if pattern is None:
                chosen = choose_in_block(scores, still_alive, quotas[block_index])
            else:
                chosen = choose_n_in_group(scores, still_alive, prune_per_group)
            pruned[:, start + offset : start + offset + width] = chosen
        errors = _sweep_block(block, upper[start:end, start:end], pruned[:, start:end])
        matrix[:, start:end] = block
        _lazy_update(matrix, errors, upper[start:end, end:], end, max_bytes)
    matrix[pruned] = 0.0
    return (matrix.reshape(weight.shape).to(weight.device, weight.dtype),
            (~pruned).reshape(weight.shape).to(weight.device))


def _sweep_block(block: torch.Tensor, upper_block: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """Prune the block's columns in order, in place; returns the scaled errors ``E (out_units, width)``.

    ``E[:, j] = w_j / U_jj`` where column j is pruned (0 elsewhere): ``E @ U[block, after]`` is what the
    block owes the columns after it.
    """
    errors = torch.zeros_like(block)
    for column in range(block.shape[1]):
        error = torch.where(pruned[:, column], block[:, column] / upper_block[column, column], 0.0)
        block[:, column:] -= error[:, None] * upper_block[column, column:]
        errors[:, column] = error
    block[pruned] = 0.0  # exactly: the update leaves round-off there
    return errors


def _lazy_update(matrix: torch.Tensor, errors: torch.Tensor, coupling: torch.Tensor, end: int, max_bytes: int) -> None:
    """``W[:, end:] -= E @ U[block, end:]`` in place, in row chunks of at most ``max_bytes`` of temporaries."""
    if coupling.shape[1] == 0:
        return
    rows_per_chunk = max(1, max_bytes // (8 * coupling.shape[1]))
    for first in range(0, matrix.shape[0], rows_per_chunk):
        rows = slice(first, first + rows_per_chunk)
        matrix[rows, end:] -= errors[rows] @ coupling


def block_quotas(alive: torch.Tensor, to_prune: int, block_size: int) -> list[int]:
    """How many alive entries each block of columns prunes: ``to_prune`` spread in proportion to the alive
    entries, by cumulative rounding so that the quotas add up exactly (and none exceeds its block's alive)."""
    alive_per_block = alive.sum(0).split(block_size)
    cumulative = torch.tensor([0] + [int(part.sum()) for part in alive_per_block]).cumsum(0)
    total = int(cumulative[-1])
    if total == 0:
        return [0] * len(alive_per_block)
    targets = (2 * to_prune * cumulative + total) // (2 * total)  # round half up, in integers
    return targets.diff().tolist()


def choose_in_block(scores: torch.Tensor, alive: torch.Tensor, quota: int) -> torch.Tensor:
    """Pruned entries of a block ``(out_units, width)``: the ``quota`` alive ones with the smallest scores
    (all rows jointly), and every entry already dead."""
    candidates = scores.masked_fill(~alive, float("inf")).flatten()
    chosen = torch.zeros(candidates.numel(), dtype=torch.bool)
    chosen[torch.topk(candidates, quota, largest=False).indices] = True
    return chosen.view_as(alive) | ~alive


def choose_n_in_group(scores: torch.Tensor, alive: torch.Tensor, count: int) -> torch.Tensor:
    """Pruned entries of a group ``(out_units, m)``: per row, the dead ones first, then the smallest scores,
    ``count`` in all (more where more are dead)."""
    ranked = scores.masked_fill(~alive, float("-inf"))
    chosen = torch.zeros_like(alive)
    chosen.scatter_(1, torch.topk(ranked, count, dim=1, largest=False).indices, True)
    return chosen | ~alive
