"""``camphive spectrum``: top loss-Hessian eigenvalues (global and per layer), trace, convergence plot.

Under torchrun each process takes a shard of the calibration set and the Hessian-vector
products are reduced over the processes: the same spectrum as one process, rank 0 writes it.
"""
from __future__ import annotations

from pathlib import Path

from camphive import distributed
from camphive.checkpoints import load_checkpoint
from camphive.curvature import plot_convergence, spectrum
from camphive.errors import ConfigError
from camphive.jobs.common import calibration_batches, calibration_share, machine_description, seed_everything
from camphive.runs import RunFolder, timestamp


def spectrum_job(*, checkpoint: str | Path, out: str | Path, top_k: int = 5, method: str = "lanczos",
                 per_layer: bool = True, trace_probes: int = 16, tol: float = 1e-3, max_iter: int = 100,
                 calib_samples: int = 1024, calib_batch_size: int = 128, dataset: str | None = None,
                 data_root: str | None = None, seed: int = 0, overwrite: bool = False) -> dict:
    settings = {key: value for key, value in locals().items()}
    distributed.init_from_environment()
    stored = load_checkpoint(checkpoint)
    dataset = dataset or stored.metadata.get("dataset")
    if not dataset:
        raise ConfigError(f"checkpoint {checkpoint} does not record its dataset; pass --dataset")
    seed_everything(seed)
    calib = calibration_share(calibration_batches(dataset, data_root, calib_samples, calib_batch_size, seed))
    run = RunFolder.create(out, overwrite=overwrite)
    run.write_config({"command": "spectrum", **settings, "dataset": dataset, "started": timestamp(),
                      "machine": machine_description(), **distributed.describe()})
    result = spectrum(stored.model, calib, top_k=top_k, method=method, per_layer=per_layer,
                      trace_probes=trace_probes, tol=tol, max_iter=max_iter, seed=seed)
    data = result.to_dict()
    run.write_json("spectrum.json", data)
    if run.writer:
        plot_convergence(result, run.file("convergence.png"))
    run.close()
    distributed.barrier()
    return data
