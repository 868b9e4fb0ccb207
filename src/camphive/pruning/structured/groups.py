"""Channel groups: the units of structured pruning, found by Torch-Pruning's dependency graph.

A group is a set of output channels that must be removed together, with everything that
depends on them: the producing convs/linears (several for a residual stream), their
BatchNorm channels, depthwise filters, and the input channels of every layer that reads
them (the *consumers*, through a flatten as several input features per channel). Tracing
is Torch-Pruning's ``DependencyGraph``; this module only reads its groups into plain data
(which layer, which role, which indices) and removes channels through it.

Channel ``r`` of a group (its *root index*, ``0 <= r < size``) is the same channel in every
member; ``member.indices[i]`` is the index in that layer's own dimension of root channel
``member.root_indices[i]``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from camphive.errors import ConfigError, one_line
from camphive.layers import layer_list
from camphive.modules import Inputs, eval_mode, inputs_on_model_device

CONV_OR_LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass
class GroupMember:
    """One layer's share of a group. ``role``: producer (output channels of a conv/linear),
    depthwise (a depthwise conv: its filter and input channel), consumer (input channels of a
    conv/linear), norm (BatchNorm channels)."""

    name: str
    module: nn.Module
    role: str
    indices: torch.Tensor  # (n,) int64, in the layer's own dimension
    root_indices: torch.Tensor  # (n,) int64, the group channel of each index

    def columns(self, size: int) -> torch.Tensor:
        """``(size, positions)``: the layer indices of each group channel, in order.

        A consumer after a flatten reads each channel at several positions (features
        ``c * positions + q`` for a channel-major flatten); a conv reads it once.
        """
        order = torch.argsort(self.root_indices, stable=True)
        counts = torch.bincount(self.root_indices, minlength=size)
        if counts.numel() != size or not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
            raise ConfigError(
                f"layer {self.name} reads the channels of a group unevenly ({counts.tolist()[:8]}...); "
                "add it to ignored_layers"
            )
        return self.indices[order].reshape(size, int(counts[0]))


@dataclass
class ChannelGroup:
    """Channels removed together; ``size`` channels now, ``key`` stable across cycles."""

    key: str
    root_name: str
    size: int
    members: list[GroupMember]
    tp_group: object = field(repr=False, default=None)  # Torch-Pruning's Group (full indices)
    root_module: nn.Module | None = field(repr=False, default=None)
    root_function: object = field(repr=False, default=None)
    # GroupNorm partitions: block id of each channel; removal takes as many channels from every
    # block, so each normalisation group keeps its own channels (and a multiple of the block count).
    blocks: torch.Tensor | None = field(repr=False, default=None)

    @property
    def multiple(self) -> int:
        """Kept channel counts must be multiples of this (1, or the number of GroupNorm blocks)."""
        return 1 if self.blocks is None else int(self.blocks.max()) + 1

    def by_role(self, *roles: str) -> list[GroupMember]:
        return [member for member in self.members if member.role in roles]

    @property
    def consumers(self) -> list[GroupMember]:
        return self.by_role("consumer")

    def sum_weight_scores(self, weight_scores: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(size,)`` float64: each channel's per-weight scores summed over the group's conv/linear members."""
        return weight_scores_to_channels(self, weight_scores)


def resolve_ignored(model: nn.Module, ignored_layers: Iterable[str | nn.Module] | None) -> list[nn.Module]:
    """Modules whose output channels stay: the named modules and every module inside them."""
    modules = dict(model.named_modules())
    ignored: list[nn.Module] = []
    for item in layer_list(ignored_layers):
        if isinstance(item, nn.Module):
            module = item
        elif item in modules:
            module = modules[item]
        else:
            examples = [name for name in modules if name][:3]
            raise ConfigError(f"ignored layer {item!r} is not a module of the model; use a name from "
                              f"model.named_modules(), e.g. {examples}")
        ignored.extend(module.modules())
    return ignored


def build_dependency_graph(model: nn.Module, example_inputs: Inputs) -> tp.DependencyGraph:
    """Trace ``model`` on ``example_inputs`` (eval mode, so BatchNorm statistics stay)."""
    inputs = inputs_on_model_device(model, example_inputs)
    try:
        with eval_mode(model), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=inputs if len(inputs) > 1 else inputs[0],
                                                         verbose=False)
    except Exception as error:  # noqa: BLE001 - tracing fails in many ways; all mean the same to the user
        reason = f"{type(error).__name__}: {one_line(str(error))[:200]}"
        raise ConfigError(f"Torch-Pruning cannot trace the model ({reason}); "
                          "check example_inputs fit the model, or add the offending layer to ignored_layers") from error


def _role(graph: tp.DependencyGraph, module: nn.Module, handler) -> str | None:
    if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels \
            and module.out_channels % module.in_channels == 0:
        return "depthwise"
    if isinstance(module, CONV_OR_LINEAR):
        return "producer" if graph.is_out_channel_pruning_fn(handler) else "consumer"
    if isinstance(module, NORMS):
        return "norm"
    return None  # parameter-free ops (activations, additions, reshapes) carry no weights


def _feeds_model_output(graph: tp.DependencyGraph, group) -> bool:
    """True when removing the group's channels would change the model's output shape."""
    return any(graph.is_out_channel_pruning_fn(item.dep.handler) and not item.dep.target.outputs
               and not isinstance(item.dep.target.module, nn.Parameter) for item in group)


def _unsupported(tp_group, names: dict) -> str | None:
    """Why a group's channels cannot be removed here (or None): a grouped, not depthwise, conv."""
    for item in tp_group:
        module = item.dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups != module.in_channels:
            return (f"{names.get(module, '?')} is a grouped convolution (groups={module.groups}); its channels are "
                    "kept")
    return None


def _group_norm_blocks(tp_group, size: int, names: dict) -> tuple[torch.Tensor | None, str | None]:
    """Block id per root channel from the GroupNorms in the group (None: no GroupNorm), or why the
    blocks cannot be kept balanced."""
    blocks = torch.zeros(size, dtype=torch.int64)
    found = False
    for item in tp_group:
        module = item.dep.target.module
        if not isinstance(module, nn.GroupNorm):
            continue
        found = True
        per_block = module.num_channels // module.num_groups
        block_of_root = torch.full((size,), -1, dtype=torch.int64)
        block_of_root[torch.as_tensor(list(item.root_idxs))] = torch.as_tensor(list(item.idxs)) // per_block
        if bool((block_of_root < 0).any()):
            return None, f"GroupNorm {names.get(module, '?')} reads only part of the group; its channels are kept"
        blocks = blocks * module.num_groups + block_of_root
    if not found:
        return None, None
    _, blocks = torch.unique(blocks, return_inverse=True)
    counts = torch.bincount(blocks)
    if not bool((counts == counts[0]).all()):
        return None, "its GroupNorm groups are split unevenly; its channels are kept"
    return blocks, None


def channel_groups(model: nn.Module, graph: tp.DependencyGraph, ignored: list[nn.Module] | None = None,
                   skipped: dict[str, str] | None = None) -> list[ChannelGroup]:
    """The prunable channel groups of ``model``: every group rooted at a conv or linear, except
    those holding an ignored layer's output channels or the model's output (the classifier),
    and those whose channels cannot be removed here (a grouped convolution; GroupNorm groups
    that cannot stay balanced): their root layer's name and the reason go into ``skipped``."""
    names = {module: name for name, module in model.named_modules()}
    groups = []
    for tp_group in graph.get_all_groups(ignored_layers=list(ignored or []), root_module_types=CONV_OR_LINEAR):
        if _feeds_model_output(graph, tp_group):
            continue
        size = len(tp_group[0].idxs)
        reason = _unsupported(tp_group, names)
        blocks, norm_reason = _group_norm_blocks(tp_group, size, names) if reason is None else (None, None)
        if reason or norm_reason:
            if skipped is not None:
                skipped[names.get(tp_group[0].dep.target.module, "?")] = reason or norm_reason
            continue
        members: dict[tuple[int, str], GroupMember] = {}
        for item in tp_group:
            module = item.dep.target.module
            role = _role(graph, module, item.dep.handler)
            if role is None or module not in names:
                continue
            key = (id(module), role)
            if key in members:  # a depthwise conv appears once for its filters and once for its inputs
                continue
            members[key] = GroupMember(names[module], module, role, torch.as_tensor(list(item.idxs), dtype=torch.int64),
                                       torch.as_tensor(list(item.root_idxs), dtype=torch.int64))
        root = tp_group[0].dep.target.module
        producers = sorted(m.name for m in members.values() if m.role in ("producer", "depthwise"))
        groups.append(ChannelGroup(key="+".join(producers) or names.get(root, "?"), root_name=names.get(root, "?"),
                                   size=size, members=list(members.values()), tp_group=tp_group, root_module=root,
                                   root_function=tp_group[0].dep.handler, blocks=blocks))
    return groups


def remove_channels(graph: tp.DependencyGraph, group: ChannelGroup, channels: torch.Tensor | list[int]) -> None:
    """Physically remove the group's ``channels`` (root indices) from every member layer."""
    channels = sorted(int(c) for c in channels)
    if not channels:
        return
    if len(channels) >= group.size:
        raise ConfigError(f"cannot remove all {group.size} channels of {group.root_name}; keep at least one")
    graph.get_pruning_group(group.root_module, group.root_function, channels).prune()


def layer_weight_name(member: GroupMember) -> str:
    """The key of the member's weight in ``model.named_parameters()``."""
    return f"{member.name}.weight" if member.name else "weight"


def per_input_channel(module: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """Sum of a layer's per-weight values (scores, squares) over everything but the input channel: ``(in,)``."""
    if isinstance(module, nn.Linear):
        return scores.reshape(-1, scores.shape[-1]).sum(0)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight (in, out/groups, *k)
        return scores.flatten(1).sum(1)
    groups = module.groups
    out_channels, in_per_group = scores.shape[:2]
    return scores.reshape(groups, out_channels // groups, in_per_group, -1).sum((1, 3)).reshape(-1)


def per_output_channel(module: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """Sum of a layer's per-weight values over everything but the output channel: ``(out,)``."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        in_channels, out_per_group = scores.shape[:2]
        grouped = scores.reshape(module.groups, in_channels // module.groups, out_per_group, -1)
        return grouped.sum((1, 3)).reshape(-1)
    return scores.flatten(1).sum(1)


@torch.no_grad()
def weight_scores_to_channels(group: ChannelGroup, weight_scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum the per-weight scores of each channel over the group's conv/linear members."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        scores = weight_scores.get(layer_weight_name(member))
        if member.role == "norm" or scores is None:
            continue
        scores = scores.detach().double().cpu()
        if member.role == "consumer":
            values = per_input_channel(member.module, scores)[member.indices]
        else:
            values = per_output_channel(member.module, scores)[member.indices]
        total.index_add_(0, member.root_indices, values)
    return total
