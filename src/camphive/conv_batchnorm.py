"""Which BatchNorm reads which convolution alone: the pairs that can be folded (export) and whose
statistics scale a convolution's output units (pruning scores)."""
from __future__ import annotations

from torch import fx, nn

_FOLDABLE_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def conv_batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, BN name)`` pairs where the BN reads the conv output and nothing else does.

    Found on the ``torch.fx`` graph, which sees residual branches: a conv whose output
    also feeds a residual sum, or a module called more than once, is never paired. Modules
    without children are traced as opaque calls (their insides do not matter here, and a
    custom layer whose forward reads its input's shape would otherwise stop the trace). When
    the model cannot be traced symbolically (data-dependent control flow), only adjacent
    ``(conv, BN)`` children of an ``nn.Sequential`` are paired: there the data flow is
    certain, whereas registration order elsewhere says nothing about it. A module whose
    parameters the forward reads directly (``self.conv.weight``) is not paired either. BNs without
    running statistics (``track_running_stats=False``) are skipped: they normalize with
    batch statistics even in eval mode.
    """
    modules = dict(model.named_modules())
    try:
        graph = ChildlessModulesAsLeaves().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: use the safe fallback
        return [pair for pair in _sequential_pairs(model) if _foldable(modules[pair[0]], modules[pair[1]])]
    calls: dict[str, int] = {}
    read_directly: set[str] = set()  # modules whose parameters the forward also reads itself
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr":
            read_directly.add(node.target.rpartition(".")[0])
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BATCHNORMS):
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        once = calls[source.target] == 1 and calls[node.target] == 1
        if once and not {source.target, node.target} & read_directly and _foldable(modules[source.target], modules[node.target]):
            pairs.append((source.target, node.target))
    return pairs


class ChildlessModulesAsLeaves(fx.Tracer):
    """A tracer that records every module without children as one call, custom or not."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return next(module.children(), None) is None or super().is_leaf_module(module, qualified_name)


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (conv_name, _), (bn_name, _) in zip(children, children[1:]):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + conv_name, prefix + bn_name))
    return pairs


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) in _FOLDABLE_CONVS and isinstance(bn, _BATCHNORMS)
        and bn.running_mean is not None and bn.num_features == conv.out_channels
    )
