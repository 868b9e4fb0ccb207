"""The measured defaults of unstructured pruning, read by its settings and by the layer solvers' global allocation."""

# Chosen by measurement (benchmarks/unstructured.py, benchmarks/RESULTS.md, docs/method.md).
DEFAULTS = {
    "score": "diagonal",
    "curvature": "reconstruction",
    "loss_weighting": "batchnorm",
    "pairing": "coupled",
    "merge": "least_squares",
    "unit_selection": "greedy",  # which weights each unit keeps: forward selection where it keeps few
    "cycles": 3,
    "recalibrate_bn": True,  # every criterion: BatchNorm statistics re-estimated after each cycle
}
