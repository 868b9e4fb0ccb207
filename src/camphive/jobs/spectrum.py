"""``camphive spectrum``: top loss-Hessian eigenvalues (global and per layer), trace, convergence plot.

Under torchrun each process takes a shard of the calibration set and the Hessian-vector
products are reduced over the processes: the same spectrum as one process, rank 0 writes it.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

from camphive import distributed
from camphive.checkpoints import load_checkpoint
from camphive.curvature import plot_convergence, spectrum
from camphive.curvature.spectrum import check_spectrum_request
from camphive.jobs.common import (
    calibration_batches,
    calibration_share,
    check_input_shape,
    checkpoint_dataset,
    machine_description,
    seed_everything,
)
from camphive.runs import RunFolder, timestamp


def spectrum_job(*, checkpoint: str | Path, out: str | Path, top_k: int = 5, method: str = "lanczos",
                 per_layer: bool = True, trace_probes: int = 16, tol: float = 1e-3, max_iter: int = 100,
                 calib_samples: int = 1024, calib_batch_size: int = 128, dataset: str | None = None,
                 data_root: str | None = None, seed: int = 0, overwrite: bool = False) -> dict:
    """Write ``spectrum.json`` (strict JSON: numbers that are not finite, such as the standard
    error of a one-probe trace or an unknown residual, are ``null``) and ``convergence.png``.

    ``top_k`` and ``max_iter`` are checked by :func:`camphive.curvature.spectrum` before any
    Hessian-vector product; eigen-solves that stop before converging are listed under
    ``warnings`` in the result and issued once as a :class:`UserWarning`.
    """
    settings = {key: value for key, value in locals().items()}
    distributed.init_from_environment()
    stored = load_checkpoint(checkpoint)
    dataset, dataset_options = checkpoint_dataset(stored.metadata, dataset, checkpoint)
    # Counts the solver cannot deliver are refused before the data is read or the run folder made.
    check_spectrum_request(stored.model, top_k, method=method, max_iter=max_iter, per_layer=per_layer)
    seed_everything(seed)
    calib = calibration_batches(dataset, data_root, calib_samples, calib_batch_size, seed, **dataset_options)
    check_input_shape(stored.metadata, SimpleNamespace(input_shape=tuple(calib[0][0].shape[1:])), checkpoint, dataset)
    calib = calibration_share(calib)
    run = RunFolder.create(out, overwrite=overwrite)
    with run.discarded_on_error():  # a spectrum that fails leaves no folder behind
        run.write_config({"command": "spectrum", **settings, "dataset": dataset, "dataset_options": dataset_options,
                          "started": timestamp(), "machine": machine_description(), **distributed.describe()})
        result = spectrum(stored.model, calib, top_k=top_k, method=method, per_layer=per_layer,
                          trace_probes=trace_probes, tol=tol, max_iter=max_iter, seed=seed)
        data = result.to_dict()  # strict JSON-ready: no NaN
        if data["warnings"] and distributed.is_main_process():
            warnings.warn(f"{len(data['warnings'])} eigen-solve(s) stopped before converging, estimates kept "
                          f"(first: {data['warnings'][0]}); see 'warnings' in spectrum.json", stacklevel=2)
        run.write_json("spectrum.json", data)
        if run.writer:
            plot_convergence(result, run.file("convergence.png"))
    run.close()
    distributed.barrier()
    return data
