"""What removing a channel costs once it is folded into the kept ones: Optimal Brain Surgeon in channel space.

A consumer (a conv or linear reading the group's channels) computes ``z = W a`` from the
channel activations ``a``. With ``G = E[a a^T]`` (per sample, damped as the merge damps it),
removing channel ``p`` and folding it into the kept channels by least squares (what
``merge="least_squares"`` does) leaves the output error ``1/2 ||w_p||^2 / [G^-1]_pp``, with
``w_p`` the consumer's weights of ``p`` (all outputs and kernel taps) and ``1 / [G^-1]_pp``
the part of ``a_p`` the other channels cannot reproduce: exact for a linear layer or a 1x1
conv, and for larger kernels the error under the channel-level model the merge uses (one
fold for every tap; correlations between taps are ignored). That is the Optimal Brain
Surgeon saliency of a channel under the consumer's reconstruction curvature (docs/method.md,
section 2, at channel level).

* ``channel_score="obs"``: that saliency of every channel alone, summed over the group's
  consumers (position by position after a flatten).
* ``channel_score="greedy_obs"``: removal one channel at a time, each time the channel whose
  removal costs least *given those already removed and folded* (OBS's sequential update:
  fold ``p`` into the kept weights, downdate ``G^-1``). Channels that are only redundant
  together (two near-copies) are then not both removed. The score of a channel is the
  running maximum of the marginal costs up to its removal (made strictly increasing), so
  lower scores are removed first and every group's first ``k`` removals are the greedy
  choice for ``k``. Cost: O(n^3) per consumer for a group of n channels.

Consumers without a Gram (grouped convs) add ``1/2 ||w_p||^2``: removal without folding.
"""
from __future__ import annotations

import torch
from torch import nn

from camphive.pruning.structured.groups import ChannelGroup, per_input_channel

_TINY = 1e-300


def _consumer_state(entry, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inverse, products)``, both ``(positions, n, n)`` float64, of one consumer.

    ``inverse``: ``(G + damping)^+`` per position; ``products``: ``W_q^T W_q`` with ``W_q`` the
    consumer's input weights read at position ``q`` (rows: outputs and kernel taps), one
    position unless a linear layer is fitted per flatten position (a shared fit stacks the
    positions as extra rows). Only these products matter: the cost of a channel is its
    diagonal entry, and an OBS fold changes them by a rank-2 update.
    """
    gram = entry.gram / max(entry.samples, 1)
    size = gram.shape[-1]
    mean_diagonal = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(0)
    damped = gram + (damping * mean_diagonal)[:, None, None] * torch.eye(size, dtype=gram.dtype)
    inverse = torch.linalg.pinv(damped, hermitian=True, rtol=1e-12)
    weight = entry.member.module.weight.detach().double().cpu()
    columns = entry.columns  # (size, positions)
    if isinstance(entry.member.module, nn.Linear):
        selected = weight.reshape(-1, weight.shape[-1])[:, columns]  # (out, size, positions)
        if gram.shape[0] > 1:
            weights = selected.permute(2, 0, 1)  # (positions, out, size)
        else:
            weights = selected.permute(0, 2, 1).reshape(-1, size)[None]  # (1, out * positions, size)
    else:
        selected = weight[:, columns[:, 0]]  # (out, size, *kernel)
        weights = selected.flatten(2).transpose(1, 2).reshape(-1, size)[None]  # (1, out * taps, size)
    return inverse, weights.transpose(1, 2) @ weights


def _unfolded_cost(group: ChannelGroup, grams: dict) -> torch.Tensor:
    cost = torch.zeros(group.size, dtype=torch.float64)
    for member in group.consumers:
        if (group.key, member.name) in grams:
            continue
        weight = member.module.weight.detach().double().cpu()
        cost.index_add_(0, member.root_indices, 0.5 * per_input_channel(member.module, weight**2)[member.indices])
    return cost


def _states(group: ChannelGroup, grams: dict, damping: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One ``(inverse, products)`` per consumer that has a Gram."""
    keys = [(group.key, member.name) for member in group.consumers]
    return [_consumer_state(grams[key], damping) for key in keys if key in grams]


def _marginal_costs(states) -> torch.Tensor:
    total = None
    for inverse, products in states:
        diagonal = inverse.diagonal(dim1=-2, dim2=-1)  # (positions, n)
        energy = products.diagonal(dim1=-2, dim2=-1)  # (positions, n): ||w_c||^2
        cost = torch.where(diagonal > 0, energy / diagonal.clamp_min(_TINY), torch.zeros_like(energy)).sum(0)
        total = cost if total is None else total + cost
    return 0.5 * total


@torch.no_grad()
def obs_saliency(group: ChannelGroup, grams: dict, damping: float) -> torch.Tensor:
    """``(size,)``: each channel's fold-aware removal cost on its own (see the module docstring)."""
    states = _states(group, grams, damping)
    base = _unfolded_cost(group, grams)
    return base + _marginal_costs(states) if states else base


@torch.no_grad()
def greedy_obs_removal(group: ChannelGroup, grams: dict, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, marginal)``: channels in greedy removal order and what each removal adds.

    ``marginal[:k].sum()`` is the fold-aware output error of removing ``order[:k]`` together
    (sequential OBS updates equal the joint least-squares fold). A removed channel's row and
    column are zero from then on and never reach the others' entries, so once a quarter of the
    channels in the matrices are removed they are dropped from them (every entry left is computed
    as before, bit for bit): the steps then cost ~0.44 n^3 in all instead of n^3.
    """
    states = _states(group, grams, damping)
    base = _unfolded_cost(group, grams)
    order = torch.empty(group.size, dtype=torch.int64)
    marginal = torch.empty(group.size, dtype=torch.float64)
    channels = torch.arange(group.size)  # the channel of each row and column of the matrices in ``states``
    alive = torch.ones(group.size, dtype=torch.bool)
    for step in range(group.size):  # O(n^2) per step and consumer
        cost = base[channels] + (_marginal_costs(states) if states else 0.0)
        cost = torch.where(alive, cost, torch.full_like(cost, float("inf")))
        position = int(torch.argmin(cost))
        order[step], marginal[step] = channels[position], cost[position]
        alive[position] = False
        for inverse, products in states:  # OBS: fold the chosen channel into the others, then drop it from G^-1
            _remove(inverse, products, position)
        left = group.size - step - 1
        if 0 < left <= 3 * alive.numel() // 4:
            kept = alive.nonzero().squeeze(1)
            states = [(inverse.index_select(1, kept).index_select(2, kept),
                       products.index_select(1, kept).index_select(2, kept)) for inverse, products in states]
            channels, alive = channels[kept], torch.ones(kept.numel(), dtype=torch.bool)
    return order, marginal


def _remove(inverse: torch.Tensor, products: torch.Tensor, chosen: int) -> None:
    """One OBS step on a consumer's ``(inverse, products)``, in place: fold channel ``chosen`` into the
    others, then zero its row and column.

    The updates run as in-place rank-1 products (``baddbmm_``): a temporary the size of the
    matrices (32 MB for a 2048-channel group) would be mapped and faulted in afresh on every step
    by the default allocator, which made a step 70 times slower."""
    pivot = inverse[:, chosen, chosen]  # (positions,)
    row = inverse[:, chosen, :] / torch.where(pivot > 0, pivot, torch.ones_like(pivot))[:, None]
    row = torch.where((pivot > 0)[:, None], row, torch.zeros_like(row))  # (positions, n)
    # W <- W - w_chosen row^T, so W^T W <- M - row m^T - m row^T + M_cc row row^T (m = M[:, chosen]),
    # which is M - row h^T - h row^T with h = m - M_cc row / 2.
    column = products[:, :, chosen]
    half = column - 0.5 * column[:, chosen, None] * row
    products.baddbmm_(row[:, :, None], half[:, None, :], alpha=-1)
    products.baddbmm_(half[:, :, None], row[:, None, :], alpha=-1)
    products[:, chosen, :] = 0
    products[:, :, chosen] = 0
    inverse.baddbmm_(inverse[:, :, chosen : chosen + 1].clone(), row[:, None, :], alpha=-1)
    inverse[:, chosen, :] = 0
    inverse[:, :, chosen] = 0


def greedy_obs_scores(group: ChannelGroup, grams: dict, damping: float) -> torch.Tensor:
    """``(size,)``: the running maximum of the marginal costs up to each channel's greedy removal."""
    order, marginal = greedy_obs_removal(group, grams, damping)
    increasing = torch.cummax(marginal, 0).values
    for step in range(1, increasing.numel()):  # strictly: ties would be broken by index, not by the greedy order
        if increasing[step] <= increasing[step - 1]:
            increasing[step] = torch.nextafter(increasing[step - 1], torch.tensor(float("inf"), dtype=torch.float64))
    scores = torch.empty(group.size, dtype=torch.float64)
    scores[order] = increasing
    return scores
