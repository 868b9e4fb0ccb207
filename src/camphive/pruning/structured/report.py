"""What a structured run reports: channel counts, parameters and MACs, latency before and after."""
from __future__ import annotations

import copy

from torch import nn

from camphive.measure import MacsReport, count_parameters
from camphive.measure import measure_latency as time_models


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
    """Interleaved CPU medians of the model before and after, at each batch size."""
    before = original.cpu()
    after = pruned if all(p.device.type == "cpu" for p in pruned.parameters()) else copy.deepcopy(pruned).cpu()
    report = time_models({"before": before, "after": after}, tuple(example[0].shape[1:]), batch_sizes=batch_sizes,
                         threads=threads, target_seconds=seconds, channels_last=channels_last, compiled=compiled)
    result = {"threads": report.threads, "channels_last": report.channels_last, "compiled": report.compiled,
              "load_average": report.load_average}
    for batch_size in batch_sizes:
        old, new = report.get("before", int(batch_size)), report.get("after", int(batch_size))
        result[f"batch_{int(batch_size)}"] = {"before_ms": old.median_ms, "after_ms": new.median_ms,
                                              "speedup": new.speedup, "before_iqr_ms": old.iqr_ms,
                                              "after_iqr_ms": new.iqr_ms, "repeats": new.repeats}
    return result
