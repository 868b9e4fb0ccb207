"""Latency of models on their device: interleaved medians of several models timed side by
side (PyTorch eager, channels-last or compiled; onnxruntime sessions), so that their ratio is
measured in one run on a noisy machine."""
from __future__ import annotations

import copy
import gc
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from camphive.errors import ConfigError
from camphive.modules import eval_mode


@dataclass
class LatencyResult:
    """Wall-clock time of one forward pass of one model at one batch size (milliseconds)."""

    model: str
    batch_size: int
    median_ms: float
    iqr_ms: float  # 75th minus 25th percentile: the spread machine noise leaves
    q25_ms: float
    q75_ms: float
    min_ms: float
    repeats: int
    speedup: float  # baseline median / this median (> 1: faster than the baseline)
    samples_per_second: float


@dataclass
class LatencyReport:
    """Latency of several models, measured interleaved; the first model is the baseline."""

    baseline: str
    device: str
    threads: int
    warmup: int
    results: list[LatencyResult]
    channels_last: bool = False
    compiled: bool = False
    # 1-minute load average before and after timing (None where the OS has none): other work on
    # the machine's cores slows multi-threaded runs far more than the medians' spread shows.
    load_average: tuple[float, float] | None = None

    def get(self, model: str, batch_size: int) -> LatencyResult:
        for result in self.results:
            if result.model == model and result.batch_size == batch_size:
                return result
        raise KeyError(f"no latency measured for model {model!r} at batch size {batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _common_device(models: Mapping[str, nn.Module]) -> torch.device:
    devices = {p.device for model in models.values() for p in model.parameters()}
    if len(devices) > 1:
        raise ConfigError(f"models to time sit on different devices {sorted(map(str, devices))}; move them to one device")
    return devices.pop() if devices else torch.device("cpu")


def measure_latency(
    models: Mapping[str, nn.Module] | nn.Module,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int | None = None,
    warmup: int = 2,
    target_seconds: float = 1.5,
    min_repeats: int = 5,
    max_repeats: int = 1000,
    threads: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    channels_last: bool = False,
    compiled: bool = False,
) -> LatencyReport:
    """Median latency of each model on random inputs of shape ``(batch, *input_shape)``.

    Runs are interleaved between the models (round r runs every model once, starting
    with model ``r mod n`` so no model always follows the same one), so machine noise
    hits all models alike. The first model is the baseline for ``speedup``. Models run
    in eval mode under ``torch.inference_mode`` on their (common) device, with
    ``torch.cuda.synchronize`` around each CUDA run; training flags are restored.
    ``repeats=None`` picks the number of rounds so that timing one batch size takes
    about ``target_seconds`` (clamped to [min_repeats, max_repeats]). ``threads`` sets
    ``torch.set_num_threads`` for the measurement only. Garbage collection is paused
    while timing, as ``timeit`` does. The report's ``load_average`` (before, after) says how
    busy the machine was: with other processes on its cores, runs with more than one thread
    can slow many times over (a thread waits at every parallel region for one descheduled),
    so time with ``threads=1`` on a shared machine.

    ``channels_last=True`` times copies of the models in the NHWC memory layout, with
    NHWC inputs (4-D inputs only): on CPUs, oneDNN convolutions usually run faster in
    it, and closer to what their MACs predict. The models passed in are left as they are.

    ``compiled=True`` times the models compiled by ``torch.compile`` (TorchInductor, static
    shapes; on the CPU it needs a C++ compiler; the models themselves are not changed): it
    fuses the small operators that dominate pruned models. Each model compiles once per batch
    size, in the first warm-up round (at least two are run, so the timed rounds and their count
    never include compiling).

    On glibc, activations of several MB are mmapped and unmapped on every forward pass by
    default, so timings also carry page faults that depend on the allocator's history (the
    same model measured 60 or 85 ms in two processes); benchmarks/structured.py pins the
    allocator (``mallopt``) first, as jemalloc/tcmalloc deployments effectively do.
    """
    models = _models_to_time(models, input_shape, channels_last, batch_sizes, repeats, warmup, threads)
    names = list(models)
    device = _common_device(models)
    if channels_last:
        models = {name: copy.deepcopy(model).to(memory_format=torch.channels_last) for name, model in models.items()}
    if compiled:
        warmup = max(warmup, 2)
    make_batch = _random_batches(input_shape, torch.Generator().manual_seed(seed), device, dtype, channels_last)
    previous_threads = torch.get_num_threads()
    with ExitStack() as stack:
        for model in models.values():
            stack.enter_context(eval_mode(model))
        stack.enter_context(torch.inference_mode())
        stack.callback(torch.set_num_threads, previous_threads)
        if threads is not None:
            torch.set_num_threads(threads)
        if compiled:  # never time an eager fallback as if it were compiled
            stack.enter_context(torch._dynamo.config.patch(fail_on_recompile_limit_hit=True))
        runners = {name: _torch_runner(name, models[name], compiled, device) for name in names}
        results, load = time_interleaved(runners, make_batch, batch_sizes, repeats, warmup, target_seconds,
                                          min_repeats, max_repeats)
    return LatencyReport(
        baseline=names[0], device=str(device), threads=threads or previous_threads, warmup=warmup, results=results,
        channels_last=channels_last, compiled=compiled, load_average=load,
    )


def _models_to_time(models: Mapping[str, nn.Module] | nn.Module, input_shape: Sequence[int], channels_last: bool,
                    batch_sizes, repeats, warmup, threads) -> Mapping[str, nn.Module]:
    """``models`` as a non-empty ``{name: model}`` mapping (one model is ``{"model": model}``), with the
    timing arguments checked."""
    if isinstance(models, nn.Module):
        models = {"model": models}
    if not models:
        raise ConfigError("no models to time; pass a dict {name: model} with at least one model")
    _check_timing_arguments(batch_sizes, repeats, warmup, threads)
    if channels_last and len(input_shape) != 3:
        raise ConfigError(f"channels_last needs image inputs (C, H, W), got input shape {tuple(input_shape)}; "
                          "time without channels_last")
    return models


def _torch_runner(name: str, model: nn.Module, compiled: bool, device: torch.device) -> Callable[[torch.Tensor], None]:
    """One timed call of ``model`` (compiled if asked), waiting for CUDA to finish it."""
    forward = _compiled_forward(name, model) if compiled else model
    synchronize = device.type == "cuda"

    def run(batch: torch.Tensor) -> None:
        forward(batch)
        if synchronize:
            torch.cuda.synchronize(device)
    return run


def _random_batches(input_shape: Sequence[int], generator: torch.Generator, device: torch.device,
                    dtype: torch.dtype, channels_last: bool) -> Callable[[int], torch.Tensor]:
    """``make_batch(batch_size)``: random inputs drawn from ``generator``, on ``device`` in ``dtype`` and layout."""
    def make_batch(batch_size: int) -> torch.Tensor:
        batch = torch.randn((batch_size, *input_shape), generator=generator).to(device=device, dtype=dtype)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch
    return make_batch


def compare_latency(
    models: Mapping[str, nn.Module],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    threads: int | None = None,
    target_seconds: float = 1.5,
    channels_last: bool = False,
    compiled: bool = False,
) -> dict[str, dict]:
    """CPU latency of the model before pruning (the first of ``models``) against each model after
    it, timed interleaved in one run (:func:`measure_latency`) so machine noise falls on all alike.

    Models on another device are timed as CPU copies. Returns ``{name: record}`` for every model
    after the first, each record in the one layout every report reads::

        {"device", "threads", "channels_last", "compiled", "load_average",
         "batch_<n>": {"before_ms", "after_ms", "before_iqr_ms", "after_iqr_ms", "speedup", "repeats"}}

    (medians and interquartile ranges in milliseconds; ``speedup`` = before / after).
    """
    if len(models) < 2:
        raise ConfigError(f"compare_latency needs the model before pruning and at least one after, got {len(models)} "
                          "model(s); pass {'before': original, 'after': pruned}")
    on_cpu = {name: model if all(p.device.type == "cpu" for p in model.parameters()) else copy.deepcopy(model).cpu()
              for name, model in models.items()}
    report = measure_latency(on_cpu, input_shape, batch_sizes=tuple(batch_sizes), threads=threads,
                             target_seconds=target_seconds, channels_last=channels_last, compiled=compiled)
    baseline = report.baseline
    records = {}
    for name in list(on_cpu)[1:]:
        record: dict[str, Any] = {"device": report.device, "threads": report.threads,
                                  "channels_last": report.channels_last, "compiled": report.compiled,
                                  "load_average": report.load_average}
        for size in batch_sizes:
            before, after = report.get(baseline, int(size)), report.get(name, int(size))
            record[f"batch_{int(size)}"] = {"before_ms": before.median_ms, "after_ms": after.median_ms,
                                            "before_iqr_ms": before.iqr_ms, "after_iqr_ms": after.iqr_ms,
                                            "speedup": after.speedup, "repeats": after.repeats}
        records[name] = record
    return records


def latency_columns(record: dict | None, batch_size: int) -> dict[str, Any]:
    """One batch size of a :func:`compare_latency` record as flat table columns (``latency_batch``,
    ``latency_before_ms``, ``latency_after_ms``, ``latency_before_iqr_ms``, ``latency_after_iqr_ms``,
    ``speedup``); all ``None`` without a record."""
    timing = (record or {}).get(f"batch_{int(batch_size)}")
    columns = {"latency_batch": int(batch_size) if timing else None}
    for key in ("before_ms", "after_ms", "before_iqr_ms", "after_iqr_ms"):
        columns[f"latency_{key}"] = timing[key] if timing else None
    columns["speedup"] = timing["speedup"] if timing else None
    return columns


LATENCY_COLUMNS = tuple(latency_columns(None, 1))


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every OS
        return None


def _compiled_forward(name: str, model: nn.Module) -> Callable[[torch.Tensor], Any]:
    """``model`` compiled by ``torch.compile``; compile errors (raised at the first call) become one line."""
    def call(batch: torch.Tensor):
        return model(batch)

    # torch.compile keeps compiled code per Python code object: models of one class would share one
    # cache, check each other's guards on every call, and past its recompile limit (8) Dynamo would
    # silently run them eagerly. A code object of its own per model keeps each model's cache apart.
    call.__code__ = call.__code__.replace(co_name=f"compiled_{abs(hash(name))}_{id(model)}")
    forward = torch.compile(call, dynamic=False)
    compiled_sizes: set[tuple[int, ...]] = set()

    def run(batch: torch.Tensor):
        if tuple(batch.shape) in compiled_sizes:
            return forward(batch)
        try:
            output = forward(batch)
        except Exception as error:  # noqa: BLE001 - Dynamo/Inductor raise many exception types
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
            raise ConfigError(f"torch.compile failed for model {name!r} ({first_line}); time it without "
                              "compiled=True (on a CPU, Inductor needs a C++ compiler such as gcc)") from error
        compiled_sizes.add(tuple(batch.shape))
        return output

    return run


def measure_onnx_latency(
    files: Mapping[str, str | os.PathLike],
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int | None = None,
    warmup: int = 2,
    target_seconds: float = 1.5,
    min_repeats: int = 5,
    max_repeats: int = 1000,
    threads: int = 1,
    seed: int = 0,
) -> LatencyReport:
    """Median latency of exported ONNX models in onnxruntime (CPUExecutionProvider, all graph
    optimisations, ``threads`` intra-op threads), interleaved as :func:`measure_latency` does;
    the first file is the baseline. Each file must take one float32 input of shape
    ``(batch, *input_shape)`` (as :func:`camphive.export_onnx` writes with ``dynamic_batch``).
    """
    import onnxruntime

    if not files:
        raise ConfigError("no ONNX files to time; pass a dict {name: path} with at least one file")
    _check_timing_arguments(batch_sizes, repeats, warmup, threads)
    runners = {}
    for name, path in files.items():
        if not Path(path).is_file():
            raise ConfigError(f"ONNX file {str(path)!r} does not exist; export the model first (camphive export)")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ConfigError(f"onnxruntime cannot load {str(path)!r} ({str(error).splitlines()[0][:120]}); "
                              "export the model again (camphive export)") from error
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise ConfigError(f"ONNX file {str(path)!r} takes {len(inputs)} inputs; only one-input models can be "
                              "timed here")
        fixed = [(i, size) for i, size in enumerate(inputs[0].shape[1:]) if isinstance(size, int)]
        if len(inputs[0].shape) != len(input_shape) + 1 or any(size != input_shape[i] for i, size in fixed):
            raise ConfigError(f"ONNX file {str(path)!r} takes inputs of shape {inputs[0].shape}, not (batch, "
                              f"{', '.join(map(str, input_shape))}); pass the input shape it was exported with")
        input_name = inputs[0].name
        runners[name] = lambda batch, session=session, input_name=input_name: session.run(None, {input_name: batch})
    generator = np.random.default_rng(seed)

    def make_batch(batch_size: int) -> np.ndarray:
        return generator.standard_normal((batch_size, *input_shape), dtype=np.float32)

    results, load = time_interleaved(runners, make_batch, batch_sizes, repeats, warmup, target_seconds, min_repeats,
                                      max_repeats)
    return LatencyReport(baseline=next(iter(files)), device="cpu (onnxruntime)", threads=int(threads), warmup=warmup,
                         results=results, load_average=load)


def _check_timing_arguments(batch_sizes, repeats, warmup, threads) -> None:
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if repeats is not None and repeats < 1:
        raise ConfigError(f"repeats must be >= 1 (or None to calibrate), got {repeats}")
    if warmup < 0 or threads is not None and threads < 1:
        raise ConfigError(f"warmup must be >= 0 and threads >= 1, got warmup={warmup}, threads={threads}")


def time_interleaved(runners: Mapping[str, Callable], make_batch: Callable, batch_sizes, repeats, warmup,
                      target_seconds, min_repeats, max_repeats
                      ) -> tuple[list[LatencyResult], tuple[float, float] | None]:
    """Time every runner on the same batch, interleaved: round r starts with runner ``r mod n``.
    Also returns the load average before and after (None where the OS has none). A runner may
    ignore the batch it is given (and run on inputs of its own, as layers of different shapes do)."""
    load_before = _load_average()
    names = list(runners)
    results: list[LatencyResult] = []

    def run_once(name: str, batch) -> float:
        start = time.perf_counter()
        runners[name](batch)
        return time.perf_counter() - start

    gc_was_enabled = gc.isenabled()
    try:
        for batch_size in batch_sizes:
            batch = make_batch(int(batch_size))
            last_seconds = {name: 0.0 for name in names}
            for _ in range(warmup):  # interleaved too, so every model warms up alike
                for name in names:
                    last_seconds[name] = run_once(name, batch)
            if repeats is None and warmup == 0:  # no estimate yet: one untimed round gives it
                last_seconds = {name: run_once(name, batch) for name in names}
            rounds = repeats or int(np.clip(round(target_seconds / max(sum(last_seconds.values()), 1e-9)),
                                            min_repeats, max_repeats))
            times: dict[str, list[float]] = {name: [] for name in names}
            gc.collect()
            gc.disable()
            for round_index in range(rounds):
                start = round_index % len(names)
                for name in names[start:] + names[:start]:
                    times[name].append(run_once(name, batch))
            if gc_was_enabled:
                gc.enable()
            summaries = [_summarize(name, int(batch_size), np.asarray(times[name])) for name in names]
            for summary in summaries:
                summary.speedup = summaries[0].median_ms / summary.median_ms
            results.extend(summaries)
    finally:
        if gc_was_enabled:
            gc.enable()
    load_after = _load_average()
    return results, (None if load_before is None or load_after is None else (load_before, load_after))


def _summarize(name: str, batch_size: int, seconds: np.ndarray) -> LatencyResult:
    """Quantiles of the timings; ``speedup`` is filled in by the caller."""
    milliseconds = seconds * 1e3
    q25, median, q75 = np.percentile(milliseconds, [25, 50, 75])
    return LatencyResult(
        model=name, batch_size=batch_size, median_ms=float(median), iqr_ms=float(q75 - q25),
        q25_ms=float(q25), q75_ms=float(q75), min_ms=float(milliseconds.min()), repeats=len(seconds),
        speedup=1.0, samples_per_second=batch_size / (float(median) / 1e3),
    )
