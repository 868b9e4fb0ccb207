"""What a structured run reports: channel counts, parameters and MACs, latency before and after."""
from __future__ import annotations

from torch import nn

from camphive.measure import MacsReport, count_parameters
from camphive.measure.latency import compare_latency


def out_channels(model: nn.Module) -> dict[str, int]:
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            counts[name] = module.out_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            counts[name] = module.out_channels
    return counts


def layer_sparsity(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    return {name: 1.0 - after.get(name, count) / count for name, count in before.items() if count}


def cost_summary(model: nn.Module, macs: MacsReport) -> dict:
    """Parameters and per-sample MACs (total, and conv + linear as published counts are)."""
    return {"parameters": count_parameters(model), "macs": int(macs.total),
            "macs_conv_linear": int(macs.by_kind["conv"] + macs.by_kind["linear"]), "macs_by_kind": dict(macs.by_kind)}


def latency_before_after(original: nn.Module, pruned: nn.Module, example, batch_sizes, threads, seconds, channels_last,
                         compiled) -> dict:
    """Interleaved CPU medians of the model before and after, at each batch size: the
    :func:`~camphive.measure.latency.compare_latency` record."""
    return compare_latency({"before": original, "after": pruned}, tuple(example[0].shape[1:]), batch_sizes=batch_sizes,
                           threads=threads, target_seconds=seconds, channels_last=channels_last,
                           compiled=compiled)["after"]
