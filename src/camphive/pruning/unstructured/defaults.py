"""The measured defaults of unstructured pruning, read by its settings and by the layer solvers' global allocation."""

# Chosen by measurement (benchmarks/unstructured.py, benchmarks/RESULTS.md, docs/method.md).
DEFAULTS = {
    "score": "diagonal",
    "curvature": "reconstruction",
    "loss_weighting": "batchnorm",
    "pairing": "coupled",
    "merge": "least_squares",
    "unit_selection": "greedy",  # which weights each unit keeps: forward selection where it keeps few
    # One cycle and the refit after it (refit=True) beat three cycles without it at every sparsity measured, and
    # cost less; without the refit, three cycles beat one.
    "refit": True,
    "cycles": 1,
    "cycles_without_refit": 3,
    "recalibrate_bn": True,  # every criterion: BatchNorm statistics re-estimated after each cycle
}
