"""Parameters, multiply-accumulates (MACs) and latency of a model.

MAC convention (one forward pass, hooks on modules, model in eval mode):

* Convolutions (1d/2d/3d, grouped and depthwise, transposed): every weight is used once per
  output position, so MACs = positions x weights, which for an ordinary convolution is
  ``out_elements * (in_channels / groups) * kernel_elements``. Linear layers likewise:
  ``out_elements * in_features`` (leading dimensions beyond the batch included). Biases are
  not counted.
* ``nonzero=True`` counts only the non-zero weights (each still used once per position):
  the effective MACs of an unstructured-sparse model run by a sparse kernel.
* ``include_norm_and_add=True`` also counts 1 MAC per output element of every BatchNorm (in
  eval mode it is one multiply-add, ``x * scale + shift``) and 1 per output element of every
  tensor-tensor addition or subtraction that the forward pass performs outside those
  layers (residual sums, found by a ``TorchFunctionMode``; additions of a Python number are
  not counted). Activations, pooling and other norms are not counted: they are not MACs.
  Published MAC counts (ResNet-56: 125 M) are conv + linear only, i.e. the ``conv`` and
  ``linear`` entries of :attr:`MacsReport.by_kind`.

Counts are for the forward pass on the inputs given, so pass one sample for per-sample
MACs (:func:`model_summary` does so).
"""
from __future__ import annotations

import copy
import gc
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from camphive.errors import ConfigError
from camphive.layers import prunable_layers

Inputs = torch.Tensor | Sequence[torch.Tensor]
_NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
_ADDITION_NAMES = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__"}
_ROOT_NAME = "(model)"


def as_input_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """A tensor becomes a 1-tuple; a sequence of tensors a tuple (positional arguments)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence) and all(isinstance(x, torch.Tensor) for x in example_inputs):
        return tuple(example_inputs)
    raise ConfigError(
        f"example inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}; "
        "pass e.g. torch.randn(1, 3, 32, 32)"
    )


def inputs_on_model_device(model: nn.Module, example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """``example_inputs`` as a tuple on the device of ``model``'s parameters (a GPU model is often
    handed CPU examples, as data loaders give them); unchanged for a model without parameters."""
    inputs = as_input_tuple(example_inputs)
    device = next((p.device for p in model.parameters()), None)
    return inputs if device is None else tuple(x.to(device) for x in inputs)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode, then restore each module's own training flag."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags.items():
            module.training = training


def count_parameters(model: nn.Module, nonzero: bool = False) -> int:
    """Number of parameter entries (shared parameters once); only non-zero ones if ``nonzero``."""
    if nonzero:
        return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


@dataclass
class MacsReport:
    """MACs of one forward pass: ``total``, per module name, and per kind (conv, linear, norm, add).

    Additions are attributed to the module whose forward performed them (``"(model)"`` for
    the top module). ``uncounted`` names modules with parameters whose compute is not
    counted (e.g. LayerNorm, embeddings, attention), so a total that misses them says so.
    """

    total: int
    per_layer: dict[str, int]
    by_kind: dict[str, int]
    nonzero: bool
    include_norm_and_add: bool
    uncounted: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _conv_or_linear_macs(module: nn.Module, inputs: tuple, output: torch.Tensor, nonzero: bool) -> int:
    """MACs = weights used x positions where each is used (see the module docstring)."""
    weight = module.weight.detach()
    weights = int(torch.count_nonzero(weight)) if nonzero else weight.numel()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        positions = inputs[0].numel() // module.in_channels  # each weight scatters once per input position
    elif isinstance(module, nn.Linear):
        positions = output.numel() // module.out_features
    else:
        positions = output.numel() // module.out_channels
    return positions * weights


class _AdditionCounter(TorchFunctionMode):
    """Counts output elements of tensor-tensor additions, attributed to the running module."""

    def __init__(self, module_stack: list[tuple[str, nn.Module]], record: Callable[[str, str, int], None]) -> None:
        super().__init__()
        self.module_stack = module_stack
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in _ADDITION_NAMES and len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
            owner_name, owner = self.module_stack[-1] if self.module_stack else (_ROOT_NAME, None)
            # Additions inside counted layers (none in torch's own) would be counted twice.
            if not isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd, *_NORM_TYPES)):
                self.record(owner_name, "add", result.numel() if isinstance(result, torch.Tensor) else 0)
        return result


def count_macs(
    model: nn.Module, example_inputs: Inputs, nonzero: bool = False, include_norm_and_add: bool = True
) -> MacsReport:
    """Count MACs of ``model(*example_inputs)`` by hooks on one forward pass.

    The model runs once in eval mode without gradients; each module's training flag is
    restored afterwards. See the module docstring for what is counted. The inputs are moved to
    the model's device.
    """
    inputs = inputs_on_model_device(model, example_inputs)
    per_layer: dict[str, int] = {}
    by_kind = {"conv": 0, "linear": 0, "norm": 0, "add": 0}
    uncounted: list[str] = []
    module_stack: list[tuple[str, nn.Module]] = []

    def record(name: str, kind: str, macs: int) -> None:
        per_layer[name] = per_layer.get(name, 0) + macs
        by_kind[kind] += macs

    def make_hooks(name: str, module: nn.Module):
        def pre_hook(mod, args):
            module_stack.append((name or _ROOT_NAME, mod))

        def post_hook(mod, args, output):
            module_stack.pop()
            if isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
                kind = "linear" if isinstance(mod, nn.Linear) else "conv"
                record(name or _ROOT_NAME, kind, _conv_or_linear_macs(mod, args, output, nonzero))
            elif isinstance(mod, _NORM_TYPES):
                if include_norm_and_add:
                    record(name or _ROOT_NAME, "norm", output.numel())
            elif any(True for _ in mod.parameters(recurse=False)) and (name or _ROOT_NAME) not in uncounted:
                uncounted.append(name or _ROOT_NAME)

        return pre_hook, post_hook

    handles = []
    try:
        for name, module in model.named_modules():
            pre_hook, post_hook = make_hooks(name, module)
            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
        with eval_mode(model), torch.no_grad():
            if include_norm_and_add:
                with _AdditionCounter(module_stack, record):
                    model(*inputs)
            else:
                model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return MacsReport(
        total=sum(by_kind.values()), per_layer=per_layer, by_kind=by_kind, nonzero=nonzero,
        include_norm_and_add=include_norm_and_add, uncounted=uncounted,
    )


def model_summary(model: nn.Module, example_inputs: Inputs) -> dict[str, Any]:
    """Parameters, sparsity and per-sample MACs (dense and non-zero) of ``model``.

    MACs are for the first sample of ``example_inputs`` (leading dimension sliced to 1).
    ``macs`` follows the full convention (conv, linear, BN, additions); ``macs_conv_linear``
    is the figure comparable with published counts. ``layers`` covers the prunable (conv
    and linear) layers: weights, non-zero weights, sparsity and MACs.
    """
    first_sample = tuple(x[:1] for x in as_input_tuple(example_inputs))
    dense = count_macs(model, first_sample, nonzero=False)
    sparse = count_macs(model, first_sample, nonzero=True)
    layers = {}
    for name, layer in prunable_layers(model).items():
        weights = layer.weight.numel()
        nonzero = int(torch.count_nonzero(layer.weight.detach()))
        layers[name] = {
            "weights": weights, "nonzero": nonzero, "sparsity": 1.0 - nonzero / weights,
            "macs": dense.per_layer.get(name, 0), "macs_nonzero": sparse.per_layer.get(name, 0),
        }
    prunable_weights = sum(entry["weights"] for entry in layers.values())
    prunable_nonzero = sum(entry["nonzero"] for entry in layers.values())
    parameters = count_parameters(model)
    nonzero_parameters = count_parameters(model, nonzero=True)
    return {
        "parameters": parameters,
        "nonzero_parameters": nonzero_parameters,
        "prunable_weights": prunable_weights,
        "prunable_nonzero": prunable_nonzero,
        "sparsity": 1.0 - prunable_nonzero / prunable_weights if prunable_weights else 0.0,
        "macs": dense.total,
        "macs_nonzero": sparse.total,
        "macs_conv_linear": dense.by_kind["conv"] + dense.by_kind["linear"],
        "macs_conv_linear_nonzero": sparse.by_kind["conv"] + sparse.by_kind["linear"],
        "macs_uncounted_modules": dense.uncounted,
        "layers": layers,
    }


# --------------------------------------------------------------------------- latency


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
    if isinstance(models, nn.Module):
        models = {"model": models}
    if not models:
        raise ConfigError("no models to time; pass a dict {name: model} with at least one model")
    _check_timing_arguments(batch_sizes, repeats, warmup, threads)
    if channels_last and len(input_shape) != 3:
        raise ConfigError(f"channels_last needs image inputs (C, H, W), got input shape {tuple(input_shape)}; "
                          "time without channels_last")
    names = list(models)
    device = _common_device(models)
    if channels_last:
        models = {name: copy.deepcopy(model).to(memory_format=torch.channels_last) for name, model in models.items()}
    if compiled:
        warmup = max(warmup, 2)
    synchronize = device.type == "cuda"
    generator = torch.Generator().manual_seed(seed)
    previous_threads = torch.get_num_threads()

    def make_runner(name: str, model: nn.Module) -> Callable[[torch.Tensor], None]:
        forward = _compiled_forward(name, model) if compiled else model

        def run(batch: torch.Tensor) -> None:
            forward(batch)
            if synchronize:
                torch.cuda.synchronize(device)
        return run

    def make_batch(batch_size: int) -> torch.Tensor:
        batch = torch.randn((batch_size, *input_shape), generator=generator).to(device=device, dtype=dtype)
        return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch

    with ExitStack() as stack:
        for model in models.values():
            stack.enter_context(eval_mode(model))
        stack.enter_context(torch.inference_mode())
        stack.callback(torch.set_num_threads, previous_threads)
        if threads is not None:
            torch.set_num_threads(threads)
        if compiled:  # never time an eager fallback as if it were compiled
            stack.enter_context(torch._dynamo.config.patch(fail_on_recompile_limit_hit=True))
        results, load = _time_interleaved({name: make_runner(name, models[name]) for name in names}, make_batch,
                                          batch_sizes, repeats, warmup, target_seconds, min_repeats, max_repeats)
    return LatencyReport(
        baseline=names[0], device=str(device), threads=threads or previous_threads, warmup=warmup, results=results,
        channels_last=channels_last, compiled=compiled, load_average=load,
    )


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

    results, load = _time_interleaved(runners, make_batch, batch_sizes, repeats, warmup, target_seconds, min_repeats,
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


def _time_interleaved(runners: Mapping[str, Callable], make_batch: Callable, batch_sizes, repeats, warmup,
                      target_seconds, min_repeats, max_repeats
                      ) -> tuple[list[LatencyResult], tuple[float, float] | None]:
    """Time every runner on the same batch, interleaved: round r starts with runner ``r mod n``.
    Also returns the load average before and after (None where the OS has none)."""
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
