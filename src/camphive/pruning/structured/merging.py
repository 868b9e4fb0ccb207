"""Fold removed channels into kept ones through the layers that read them (docs/method.md, section 9).

Every consumer (a conv or linear reading the group's channels) sees activations ``a_c``
for channel ``c`` (after BN, ReLU, pooling: whatever it reads). If a removed channel's
activation is approximated from kept ones, ``a_p ~ sum_s B_sp a_s``, the consumer keeps
its output by adding ``B_sp`` times ``p``'s input weights to each kept ``s``'s:

* ``merge="least_squares"``: ``B = (A_S A_S^T + damping)^-1 A_S A_P^T`` with ``A`` the
  calibration activations the consumer reads, channel-major (one row per channel, one
  column per sample and position), every removed channel into all kept ones at once;
* ``merge="pair"``: each removed channel into one kept partner (``pairing="cyclic"``:
  round-robin in significance order; ``"coupled"``: the kept channel whose activation is
  best correlated with it), ``B_sp = beta`` the least-squares scale mapping the partner to
  the removed channel, ``beta = <a_s, a_p> / (<a_s, a_s> + damping)`` from the activations
  (``beta_from="activations"``) or ``<w_s, w_p> / (<w_s, w_s> + damping)`` from the
  producers' weights (filters scaled by their BatchNorm, biases included;
  ``beta_from="weights"``);
* ``merge="none"``: plain removal.

A linear layer after a flatten reads each channel at several positions; there ``B`` is
fitted over all positions together (``flatten_fit="shared"``) or for each position on its
own (``"per_position"``) and applied position by position. A residual group has several
consumers: each gets its own ``B`` from the activations it reads. ``damping`` is relative:
that fraction of the mean diagonal of ``A_S A_S^T`` (or of ``<w_s, w_s>``).

Grams are accumulated in float64 from one pass over the calibration batches, on the model
as it is before this cycle's removal; merges change only consumer input weights, so merges
of different groups never touch the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from camphive import distributed as dist_tools
from camphive.errors import ConfigError
from camphive.modules import eval_mode
from camphive.pruning.structured.groups import ChannelGroup, GroupMember
from camphive.pruning.unstructured.pairing import cyclic_pairs

STRUCTURED_MERGES = ("least_squares", "pair", "none")
STRUCTURED_PAIRINGS = ("cyclic", "coupled")
BETA_SOURCES = ("activations", "weights")
FLATTEN_FITS = ("shared", "per_position")


@dataclass
class ConsumerGram:
    """``gram``: ``(positions, size, size)`` float64 sums of ``a_r a_t`` over the rows the
    consumer reads (``positions = 1`` unless fitted per flatten position)."""

    member: GroupMember
    columns: torch.Tensor  # (size, positions) the consumer's input indices of each channel
    gram: torch.Tensor
    sums: torch.Tensor  # (positions, size): sums of a_r over the same rows
    rows: int  # rows summed per position
    samples: int = 0


def foldable(member: GroupMember) -> bool:
    """Linear layers and ungrouped convs: a removed input channel can move onto any kept one."""
    module = member.module
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1


def _read_positions(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """A strided 1x1 conv without padding reads only every stride-th position: keep those."""
    if isinstance(module, nn.modules.conv._ConvNd) and all(k == 1 for k in module.kernel_size) \
            and all(p == 0 for p in module.padding) and any(s > 1 for s in module.stride):
        index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in module.stride)
        return inputs[index]
    return inputs


@torch.no_grad()
def consumer_grams(model: nn.Module, batches, groups: list[ChannelGroup], flatten_fit: str = "shared",
                   distributed: bool | None = None) -> dict[tuple[str, str], ConsumerGram]:
    """``{(group key, consumer name): ConsumerGram}`` for the foldable consumers of ``groups``.

    With no batches the Grams are zero: enough for merges whose coefficients come from weights.
    ``distributed``: ``None`` sums the Grams over the processes when a group runs (``batches``
    is then this process's shard), ``False`` keeps this process's batches alone.
    """
    if flatten_fit not in FLATTEN_FITS:
        raise ConfigError(f"unknown flatten_fit {flatten_fit!r}; use one of {', '.join(FLATTEN_FITS)}")
    wanted: dict[int, list[tuple[str, GroupMember, torch.Tensor]]] = {}
    for group in groups:
        for member in group.consumers:
            if foldable(member):
                wanted.setdefault(id(member.module), []).append((group.key, member, member.columns(group.size)))
    results: dict[tuple[str, str], ConsumerGram] = {}
    for entries in wanted.values():
        for key, member, columns in entries:
            per_position = flatten_fit == "per_position" and isinstance(member.module, nn.Linear)
            positions = columns.shape[1] if per_position else 1
            zeros = torch.zeros(positions, columns.shape[0], columns.shape[0], dtype=torch.float64)
            results[(key, member.name)] = ConsumerGram(member, columns, zeros, zeros[:, 0].clone(), 0)

    def hook(module, args):
        inputs = _read_positions(module, args[0].detach())
        for key, member, columns in wanted[id(module)]:
            size, positions = columns.shape
            if isinstance(module, nn.Linear):
                features = inputs.reshape(-1, inputs.shape[-1])[:, columns.reshape(-1)]
                rows = features.double().reshape(-1, size, positions)
                if flatten_fit == "per_position":
                    gram, sums = torch.einsum("nrq,ntq->qrt", rows, rows), rows.sum(0).T
                else:
                    gram, sums = torch.einsum("nrq,ntq->rt", rows, rows)[None], rows.sum((0, 2))[None]
                count = rows.shape[0] * (1 if flatten_fit == "per_position" else positions)
            else:
                channels = inputs[:, columns[:, 0]].transpose(0, 1).reshape(size, -1).double()
                gram, sums, count = (channels @ channels.T)[None], channels.sum(1)[None], channels.shape[1]
            entry = results[(key, member.name)]
            entry.gram += gram.cpu()  # merge arithmetic runs on the CPU, in float64
            entry.sums += sums.cpu()
            entry.rows += count
            entry.samples += int(args[0].shape[0]) if args[0].dim() > 1 else 1

    modules = {id(m): m for m in model.modules()}
    handles = [modules[i].register_forward_pre_hook(hook) for i in wanted]
    device = next(model.parameters()).device
    try:
        with eval_mode(model):
            for inputs, _ in batches:
                model(inputs.to(device))
    finally:
        for handle in handles:
            handle.remove()
    if dist_tools.resolve(distributed) and results:
        _sum_over_processes(list(results.values()))
    return results


def _sum_over_processes(entries: list[ConsumerGram]) -> None:
    """Every process's Gram sums and counts replaced by their totals over the processes, in place."""
    device = dist_tools.collective_device()  # the Grams live on the CPU; NCCL reduces only GPU tensors
    grams = [tensor.cpu() for tensor in dist_tools.all_reduce_tensors(
        [entry.gram.to(device) for entry in entries] + [entry.sums.to(device) for entry in entries])]
    counts = dist_tools.all_reduce_numbers([number for entry in entries for number in (entry.rows, entry.samples)])
    for index, entry in enumerate(entries):
        entry.gram, entry.sums = grams[index], grams[len(entries) + index]
        entry.rows, entry.samples = int(counts[2 * index]), int(counts[2 * index + 1])


def _damped_inverse_apply(gram_kept: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G + damping * mean diag(G) I)^+ rhs`` per position; the pseudo-inverse covers dead channels."""
    size = gram_kept.shape[-1]
    mean_diagonal = gram_kept.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(0)
    damped = gram_kept + (damping * mean_diagonal)[:, None, None] * torch.eye(size, dtype=gram_kept.dtype)
    return torch.linalg.pinv(damped, hermitian=True, rtol=1e-12) @ rhs


def least_squares_coefficients(gram: torch.Tensor, removed: torch.Tensor, kept: torch.Tensor,
                               damping: float) -> torch.Tensor:
    """``B`` ``(positions, |S|, |P|)`` with ``a_P ~ B^T a_S`` in the least-squares sense."""
    gram_kept = gram[:, kept][:, :, kept]
    cross = gram[:, kept][:, :, removed]
    return _damped_inverse_apply(gram_kept, cross, damping)


def least_squares_with_intercept(gram: torch.Tensor, sums: torch.Tensor, rows: int, removed: torch.Tensor,
                                 kept: torch.Tensor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B (positions, |S|, |P|), c (positions, |P|))`` with ``a_P ~ B^T a_S + c``.

    The constant is a channel that is always 1: its Gram row is the channel sums and
    ``rows`` itself. Damping applies to the channels only, as in the fit without intercept.
    """
    positions, size = gram.shape[0], kept.numel()
    augmented = torch.zeros(positions, size + 1, size + 1, dtype=gram.dtype)
    augmented[:, :size, :size] = gram[:, kept][:, :, kept]
    augmented[:, :size, size] = augmented[:, size, :size] = sums[:, kept]
    augmented[:, size, size] = float(rows)
    rhs = torch.cat([gram[:, kept][:, :, removed], sums[:, None, removed]], 1)
    mean_diagonal = augmented[:, :size, :size].diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(0)
    ridge = torch.zeros(positions, size + 1, dtype=gram.dtype)
    ridge[:, :size] = (damping * mean_diagonal)[:, None]
    solution = torch.linalg.pinv(augmented + torch.diag_embed(ridge), hermitian=True, rtol=1e-12) @ rhs
    return solution[:, :size], solution[:, size]


def partners(pairing: str, removed: torch.Tensor, kept: torch.Tensor, significance: torch.Tensor,
             gram: torch.Tensor | None) -> torch.Tensor:
    """The kept partner (a channel index) of every removed channel, in ``removed``'s order."""
    if pairing == "cyclic":
        size = significance.numel()
        removed_mask = torch.zeros(1, size, dtype=torch.bool)
        kept_mask = torch.zeros(1, size, dtype=torch.bool)
        removed_mask[0, removed], kept_mask[0, kept] = True, True
        _, pruned_cols, partner_cols = cyclic_pairs(removed_mask, kept_mask, significance[None])
        lookup = dict(zip(pruned_cols.tolist(), partner_cols.tolist()))
        return torch.as_tensor([lookup[int(p)] for p in removed], dtype=torch.int64)
    if pairing == "coupled":
        if gram is None:
            raise ConfigError("pairing='coupled' needs calibration activations; it found no consumer to read them")
        total = gram.sum(0)
        diagonal = total.diagonal().clamp_min(torch.finfo(total.dtype).tiny)
        cosine = total[removed][:, kept].abs() / (diagonal[removed, None] * diagonal[None, kept]).sqrt()
        return kept[cosine.argmax(1)]
    raise ConfigError(f"unknown pairing {pairing!r}; use one of {', '.join(STRUCTURED_PAIRINGS)}")


def producer_vectors(group: ChannelGroup, norm_scale: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(size, d)``: each channel's producing weights (filters times BN scale, plus bias), concatenated."""
    parts = []
    for member in group.by_role("producer", "depthwise"):
        module = member.module
        weight = module.weight.detach().double().cpu()
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            weight = weight.transpose(0, 1)
        rows = weight.flatten(1)[member.indices]
        bias = module.bias.detach().double().cpu()[member.indices, None] if module.bias is not None else rows[:, :0]
        scale = norm_scale.get(member.name)
        block = torch.cat([rows, bias], 1)
        if scale is not None:
            block = block * scale.double().cpu()[member.indices, None]
        ordered = torch.zeros(group.size, block.shape[1], dtype=torch.float64)
        ordered[member.root_indices] = block
        parts.append(ordered)
    return torch.cat(parts, 1) if parts else torch.zeros(group.size, 0, dtype=torch.float64)


def pair_coefficients(removed: torch.Tensor, kept: torch.Tensor, partner: torch.Tensor, similarity: torch.Tensor,
                      damping: float) -> torch.Tensor:
    """Sparse ``B`` ``(positions, |S|, |P|)``: ``B[s(p), p] = <s, p> / (<s, s> + damping)``.

    ``similarity``: ``(positions, size, size)`` inner products (activation Grams or producer
    weight products).
    """
    positions = similarity.shape[0]
    slot = {int(s): i for i, s in enumerate(kept.tolist())}
    rows = torch.as_tensor([slot[int(s)] for s in partner], dtype=torch.int64)
    mean_diagonal = similarity[:, kept, kept].mean(-1)
    numerator = similarity[:, partner, removed]
    denominator = similarity[:, partner, partner] + damping * mean_diagonal[:, None]
    beta = torch.where(denominator > 0, numerator / denominator.clamp_min(torch.finfo(torch.float64).tiny),
                       torch.zeros_like(numerator))
    coefficients = torch.zeros(positions, kept.numel(), removed.numel(), dtype=torch.float64)
    coefficients[:, rows, torch.arange(removed.numel())] = beta
    return coefficients


@torch.no_grad()
def fold_into_consumer(member: GroupMember, columns: torch.Tensor, removed: torch.Tensor, kept: torch.Tensor,
                       coefficients: torch.Tensor, constants: torch.Tensor | None = None) -> torch.Tensor | None:
    """Input weights of kept channel s += sum_p B_sp times those of removed channel p (in place).

    ``coefficients``: ``(1 or positions, |S|, |P|)``; one matrix is applied at every position.
    ``constants`` ``(1 or positions, |P|)``: the removed channels' constant parts, returned as
    the consumer output they stood for, ``(out,)`` (the caller puts it into a bias).
    """
    weight = member.module.weight
    positions = columns.shape[1]
    shift = None
    if isinstance(member.module, nn.Linear):
        for q in range(positions):
            index = q if coefficients.shape[0] > 1 else 0
            kept_columns, removed_columns = columns[kept, q], columns[removed, q]
            removed_weights = weight[:, removed_columns].clone()
            weight[:, kept_columns] += removed_weights @ coefficients[index].to(weight).T
            if constants is not None:
                part = removed_weights.double() @ constants[index].to(weight.device)
                shift = part if shift is None else shift + part
    else:
        kept_channels, removed_channels = columns[kept, 0], columns[removed, 0]
        removed_weights = weight[:, removed_channels].clone()
        weight[:, kept_channels] += torch.einsum("sp,op...->os...", coefficients[0].to(weight), removed_weights)
        if constants is not None:  # every tap reads the constant (up to zero padding at the borders)
            shift = removed_weights.double().flatten(2).sum(2) @ constants[0].to(weight.device)
    return shift


def norms_after(model: nn.Module) -> dict[str, nn.Module]:
    """``{conv name: BatchNorm}`` for every BatchNorm that reads only that conv's output."""
    from camphive.conv_batchnorm import conv_batchnorm_pairs

    modules = dict(model.named_modules())
    return {conv_name: modules[norm_name] for conv_name, norm_name in conv_batchnorm_pairs(model)}


def _norm_scale(norm: nn.Module) -> torch.Tensor:
    gamma = norm.weight.detach() if norm.affine else torch.ones_like(norm.running_var)
    return gamma / torch.sqrt(norm.running_var + norm.eps)


def norm_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{conv name: gamma / sqrt(var + eps)}`` of the BatchNorm that reads only that conv."""
    return {name: _norm_scale(norm) for name, norm in norms_after(model).items()}


def _shift_output(member: GroupMember, norms: dict[str, nn.Module], shift: torch.Tensor) -> None:
    """Add ``shift`` (out,) to the consumer's output: into its bias, or its BatchNorm's mean."""
    bias = member.module.bias
    if bias is not None:
        bias += shift.to(bias)
    else:
        norm = norms[member.name]
        norm.running_mean -= shift.to(norm.running_mean)


@torch.no_grad()
def merge_group(group: ChannelGroup, removed: torch.Tensor, significance: torch.Tensor, grams: dict,
                merge: str, pairing: str, beta_from: str, damping: float, norms: dict[str, nn.Module] | None = None,
                intercept: bool = False) -> dict:
    """Fold the group's ``removed`` channels into its kept ones, for every foldable consumer.

    ``norms``: :func:`norms_after` of the model (for weight-based betas and intercepts).
    ``intercept`` (least squares only): fit ``a_P ~ B^T a_S + c`` and add the constant's
    contribution to the consumer's bias, or subtract it from the running mean of the
    BatchNorm that reads the consumer (consumers with neither are fitted without it).
    Returns what was done: ``{"consumers": [...], "unfolded": [...]}`` (consumers left as
    plain removal: grouped convs, or no activations seen).
    """
    norms = norms or {}
    report = {"consumers": [], "unfolded": []}
    if merge == "none" or removed.numel() == 0:
        return report
    keep_mask = torch.ones(group.size, dtype=torch.bool)
    keep_mask[removed] = False
    kept = keep_mask.nonzero().flatten()
    if kept.numel() == 0:
        return report
    entries = [grams[(group.key, member.name)] for member in group.consumers if (group.key, member.name) in grams]
    report["unfolded"] = [m.name for m in group.consumers if (group.key, m.name) not in grams]
    if not entries:
        return report
    if merge == "pair":
        if pairing == "coupled":
            total = sum(e.gram.sum(0, keepdim=True) / max(e.rows, 1) for e in entries)
            partner = partners("coupled", removed, kept, significance, total)
        else:
            partner = partners("cyclic", removed, kept, significance, None)
        if beta_from == "weights":
            vectors = producer_vectors(group, {name: _norm_scale(norm) for name, norm in norms.items()})
            weight_similarity = (vectors @ vectors.T)[None]
    for entry in entries:
        constants = None
        can_shift = entry.member.module.bias is not None or entry.member.name in norms
        if merge == "least_squares" and intercept and can_shift:
            coefficients, constants = least_squares_with_intercept(entry.gram, entry.sums, entry.rows, removed, kept,
                                                                   damping)
        elif merge == "least_squares":
            coefficients = least_squares_coefficients(entry.gram, removed, kept, damping)
        else:
            similarity = entry.gram if beta_from == "activations" else weight_similarity
            coefficients = pair_coefficients(removed, kept, partner, similarity, damping)
        shift = fold_into_consumer(entry.member, entry.columns, removed, kept, coefficients, constants)
        if shift is not None:
            _shift_output(entry.member, norms, shift)
        report["consumers"].append(entry.member.name)
    return report
