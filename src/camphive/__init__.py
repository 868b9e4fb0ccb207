"""camphive: CAMP-HiVe pruning — curvature-guided, with pruned weights merged into kept partners.

The public API::

    import camphive
    model = camphive.models.create("resnet20", num_classes=10)
    camphive.train(model, train_loader, epochs=10)
    result = camphive.prune(model, calib_loader, sparsity=0.9)
    camphive.finetune(model, train_loader, epochs=1, masks=result.masks)
    camphive.evaluate(model, test_loader)
"""
from camphive import curvature, data, models
from camphive.checkpoints import load_checkpoint, save_checkpoint
from camphive.errors import CamphiveError, CheckpointError, ConfigError, DataError, NumericalError
from camphive.export import export_onnx
from camphive.gradual import prune_gradually
from camphive.measure import count_macs, count_parameters, measure_latency, measure_onnx_latency, model_summary
from camphive.pruning import PruneResult, prune
from camphive.sparse_format import load_sparse, save_sparse
from camphive.training import evaluate, finetune, train

__version__ = "0.1.0"

__all__ = [
    "data", "models", "curvature", "train", "finetune", "evaluate", "prune", "prune_gradually", "PruneResult",
    "export_onnx",
    "count_macs", "count_parameters", "measure_latency", "measure_onnx_latency", "model_summary", "save_checkpoint",
    "load_checkpoint", "save_sparse", "load_sparse",
    "CamphiveError", "ConfigError", "DataError", "CheckpointError", "NumericalError",
]
