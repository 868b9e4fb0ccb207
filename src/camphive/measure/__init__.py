"""What a model costs: parameters and MACs (:mod:`.macs`), latency (:mod:`.latency`)."""
from camphive.measure.latency import (
    LatencyReport,
    LatencyResult,
    compare_latency,
    measure_latency,
    measure_onnx_latency,
)
from camphive.measure.macs import MacsReport, count_macs, count_parameters, model_summary

__all__ = ["count_parameters", "count_macs", "model_summary", "MacsReport", "measure_latency", "measure_onnx_latency",
           "compare_latency", "LatencyReport", "LatencyResult"]
