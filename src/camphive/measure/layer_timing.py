"""What each layer shape costs on this machine: a lookup table timed on isolated layers.

Two channel allocations with the same MACs can differ in speed by a tenth or more on a CPU:
convolution kernels pad channel counts to the vector width, and narrow layers at large
resolutions are bound by memory traffic rather than arithmetic. :class:`LayerTimer` times the
conv, linear and BatchNorm layers of a model in isolation at the channel counts asked for
(fresh layers with random weights, on random inputs of the layer's own input shape, in eval
mode without autograd), once per distinct shape: all the shapes of one request run
interleaved, so that machine noise hits them alike, and their medians are kept as seconds per
sample. Layers it cannot rebuild (transposed convolutions, other types) are costed by their
MACs at the mean rate of the timed ones.

On the CPU the timing runs in a child process whose allocator keeps freed memory
(:func:`~camphive.measure.allocator.keep_freed_memory`): in a default glibc process each
batch-64 activation is mmapped and unmapped on every call, and the page faults that follow
depend on the allocator's history: four timings of the same resnet20 layer shapes in one default
process varied by up to 28-29 % (2.5-3.2 % median), in the child by up to 5.5-11 % (1.5-1.8 %), and
the sums of the child's timings ranked 20 channel mixes in the order of their whole-model latency
with Spearman 0.81 (resnet20), 0.84 (resnet56) and 0.92 (MobileNetV2) (benchmarks/layer_timing.py).

``runtime="onnxruntime"`` times each conv and linear layer as a one-layer ONNX model (the exporter
of :func:`camphive.export_onnx`) in an onnxruntime session instead, for models that will run
there: its kernels (MLAS) pad and block channels differently from PyTorch's. A BatchNorm layer
then costs nothing: the export folds it into the convolution before it (one that follows no
convolution, rare in CNNs, is priced at nothing too). A layer that cannot be exported is timed
in PyTorch, with a warning.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import nn

from camphive.errors import one_line
from camphive.measure.latency import time_interleaved
from camphive.measure.macs import count_macs
from camphive.modules import eval_mode, inputs_on_model_device

log = logging.getLogger("camphive.measure")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = {"BatchNorm1d": nn.BatchNorm1d, "BatchNorm2d": nn.BatchNorm2d, "BatchNorm3d": nn.BatchNorm3d}
RUNTIMES = ("torch", "onnxruntime")  # where LayerTimer times layers


@dataclass(frozen=True)
class _LayerSpec:
    """How to rebuild one layer at other channel counts: its kind, hyperparameters and input shape."""

    kind: str  # "conv", "linear", "norm" or "other" (costed by MACs)
    module: nn.Module
    sample_shape: tuple[int, ...]  # input shape of one sample (channels first; a linear's features last)
    macs_now: float  # per sample, at the channel counts it had when the spec was made (count_macs)
    channels_now: tuple[int, int]  # those (input, output) channel counts
    per_channel: bool  # a norm or a depthwise conv: MACs follow its channels, not inputs x outputs

    def macs(self, in_channels: int, out_channels: int) -> float:
        """Per-sample MACs at these channel counts: a norm's and a depthwise conv's scale with their
        channels, the others' with inputs times outputs."""
        in_now, out_now = self.channels_now
        if self.per_channel:
            return self.macs_now * out_channels / out_now
        return self.macs_now * in_channels * out_channels / (in_now * out_now)

    def activation_bytes(self, in_channels: int, out_channels: int) -> float:
        """float32 bytes of one sample's input and output (outputs at the input's resolution, at most)."""
        positions = math.prod(self.sample_shape[:-1] if self.kind == "linear" else self.sample_shape[1:])
        return 4.0 * positions * (in_channels + out_channels)

    def recipe(self, in_channels: int, out_channels: int, batch: int) -> tuple:
        """A plain, hashable description of the layer at these counts, which :func:`build_layer` builds."""
        module = self.module
        if self.kind == "conv":
            depthwise = module.groups > 1 and module.groups == module.in_channels
            return ("conv", batch, in_channels, out_channels, self.sample_shape[1:], tuple(module.kernel_size),
                    tuple(module.stride), module.padding if isinstance(module.padding, str) else tuple(module.padding),
                    tuple(module.dilation), in_channels if depthwise else module.groups, module.bias is not None,
                    module.padding_mode)
        if self.kind == "linear":
            return ("linear", batch, in_channels, out_channels, self.sample_shape[:-1], module.bias is not None)
        return ("norm", batch, out_channels, out_channels, self.sample_shape[1:], type(module).__name__)


def build_layer(recipe: tuple, generator: torch.Generator) -> tuple[nn.Module, torch.Tensor]:
    """A fresh layer (eval mode, random weights) from a :meth:`_LayerSpec.recipe`, and a random input batch."""
    kind, batch, in_channels, out_channels, spatial = recipe[:5]
    if kind == "conv":
        kernel, stride, padding, dilation, groups, bias, padding_mode = recipe[5:]
        padding = padding if isinstance(padding, str) else tuple(padding)
        layer = _CONVS[len(spatial) - 1](in_channels, out_channels, tuple(kernel), tuple(stride), padding,
                                         tuple(dilation), groups, bias, padding_mode)
        shape = (batch, in_channels, *spatial)
    elif kind == "linear":
        layer = nn.Linear(in_channels, out_channels, recipe[5])
        shape = (batch, *spatial, in_channels)
    else:
        layer = _NORMS[recipe[5]](out_channels)
        shape = (batch, out_channels, *spatial)
    return layer.eval(), torch.randn(shape, generator=generator)


def time_recipes(recipes: list[tuple], *, threads: int | None, channels_last: bool, seconds: float,
                 min_repeats: int, device: str = "cpu", runtime: str = "torch") -> list[float]:
    """Seconds per sample of each recipe's layer: interleaved medians, in this process (in
    onnxruntime sessions with ``runtime="onnxruntime"``, where a norm costs 0: it is folded)."""
    generator = torch.Generator().manual_seed(0)
    device = torch.device(device)
    runners = {}
    for index, recipe in enumerate(recipes):
        layer, batch = build_layer(recipe, generator)
        if runtime == "onnxruntime":
            if recipe[0] == "norm":  # folded into the convolution before it: no time of its own
                continue
            try:
                runners[index] = _onnx_runner(layer, batch, threads)
                continue
            except Exception as error:  # noqa: BLE001 - the exporter and onnxruntime raise many types
                log.warning("layer %s cannot run in onnxruntime (%s); timing it in PyTorch", recipe[:5],
                            one_line(str(error))[:120])
        layer, batch = layer.to(device), batch.to(device)
        if channels_last and batch.dim() == 4:
            layer, batch = layer.to(memory_format=torch.channels_last), batch.contiguous(
                memory_format=torch.channels_last)
        runners[index] = _runner(layer, batch, device)
    previous_threads = torch.get_num_threads()
    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        stack.callback(torch.set_num_threads, previous_threads)
        if threads is not None:
            torch.set_num_threads(threads)
        results, _ = time_interleaved(runners, lambda _: None, (1,), None, 1, seconds, min_repeats, 200) if runners \
            else ([], None)
    medians = {index: result.median_ms / 1e3 for index, result in zip(runners, results)}
    return [medians.get(index, 0.0) / recipe[1] for index, recipe in enumerate(recipes)]


def _runner(layer: nn.Module, batch: torch.Tensor, device: torch.device):
    synchronize = device.type == "cuda"

    def run(_unused) -> None:
        layer(batch)
        if synchronize:
            torch.cuda.synchronize(device)
    return run


def _onnx_runner(layer: nn.Module, batch: torch.Tensor, threads: int | None):
    """A runner of ``layer`` exported alone to ONNX, in an onnxruntime session on the CPU."""
    import onnxruntime

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notes, once per layer
        torch.onnx.export(layer, (batch,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["y"], do_constant_folding=True)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = int(threads or torch.get_num_threads()), 1
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {"x": batch.numpy()}

    def run(_unused) -> None:
        session.run(None, feed)
    return run


def _time_in_child(recipes: list[tuple], options: dict) -> list[float] | None:
    """:func:`time_recipes` in a fresh Python process that keeps freed memory; None if it failed."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    payload = json.dumps({"recipes": recipes, **options})
    try:
        done = subprocess.run([sys.executable, "-m", "camphive.measure.layer_timing"], input=payload, text=True,
                              capture_output=True, env=environment, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        log.warning("timing layers in a child process failed (%s); timing them here", error)
        return None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning("timing layers in a child process failed (%s); timing them here", last)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


class LayerTimer:
    """Seconds per sample of the model's conv, linear and BatchNorm layers at any channel counts.

    ``example``: the model's inputs (one sample is enough; only their shapes are read).
    ``batch_size``: the batch the timings stand for, lowered for a layer whose call would
    exceed ``max_macs_per_call`` or move more than ``max_bytes_per_call`` of inputs and outputs
    (an ImageNet stem at batch 64 takes seconds; its per-sample time at batch 2 is much the same). ``threads``: torch's threads while timing (None: as now).
    ``channels_last``: 4-D layers and inputs in the NHWC layout. ``runtime``: "torch" (PyTorch on
    the model's device) or "onnxruntime" (CPU sessions of one-layer exports; see the module
    docstring). ``seconds``: about how long
    one :meth:`measure` takes, at least ``min_repeats`` interleaved rounds of every new shape.
    ``isolate`` (default: on the CPU) times in a child process (see the module docstring).
    """

    def __init__(self, model: nn.Module, example: tuple, *, batch_size: int = 64, threads: int | None = None,
                 channels_last: bool = False, seconds: float = 1.0, max_macs_per_call: float = 4e8,
                 max_bytes_per_call: float = 64e6, min_repeats: int = 5, isolate: bool | None = None,
                 runtime: str = "torch"):
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.batch_size, self.threads, self.channels_last = int(batch_size), threads, channels_last
        self.runtime = runtime
        self.seconds_budget, self.min_repeats = seconds, min_repeats
        self.max_macs_per_call, self.max_bytes_per_call = max_macs_per_call, max_bytes_per_call
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.isolate = self.device.type == "cpu" if isolate is None else isolate
        self.specs = _layer_specs(model, example)
        self.table: dict[tuple, float] = {}  # recipe -> seconds per sample
        self._timed_rate = [0.0, 0.0]  # seconds and MACs per sample of every conv/linear shape timed
        self.timed_shapes = 0
        self.timing_seconds = 0.0

    def batch_for(self, name: str) -> int:
        """The batch a layer is timed at: ``batch_size``, or less if one call would be too large
        (more than ``max_macs_per_call`` MACs, or inputs and outputs over ``max_bytes_per_call``)."""
        spec = self.specs[name]
        in_channels, out_channels = _in_channels(spec.module), _out_channels(spec.module)
        by_macs = self.max_macs_per_call / max(spec.macs(in_channels, out_channels), 1.0)
        by_bytes = self.max_bytes_per_call / max(spec.activation_bytes(in_channels, out_channels), 1.0)
        return int(max(1, min(self.batch_size, math.floor(by_macs), math.floor(by_bytes))))

    def measure(self, shapes: Iterable[tuple[str, int, int]]) -> None:
        """Time every ``(layer name, in channels, out channels)`` not in the table yet, interleaved."""
        new: dict[tuple, float | None] = {}
        for name, in_channels, out_channels in shapes:
            spec = self.specs.get(name)
            if spec is None or spec.kind == "other":
                continue
            recipe = spec.recipe(in_channels, out_channels, self.batch_for(name))
            if recipe not in self.table:
                new[recipe] = spec.macs(in_channels, out_channels) if spec.kind != "norm" else None
        if not new:
            return
        started = time.perf_counter()
        recipes = list(new)
        options = {"threads": self.threads or torch.get_num_threads(),  # a child starts with torch's default
                   "channels_last": self.channels_last, "seconds": self.seconds_budget, "min_repeats": self.min_repeats,
                   "runtime": self.runtime}
        seconds = _time_in_child(recipes, options) if self.isolate else None
        if seconds is None:
            seconds = time_recipes(recipes, device=str(self.device), **options)
        for recipe, value in zip(recipes, seconds):
            self.table[recipe] = value
            if new[recipe] is not None:
                self._timed_rate[0] += value
                self._timed_rate[1] += new[recipe]
        self.timed_shapes += len(recipes)
        self.timing_seconds += time.perf_counter() - started

    def timings(self) -> dict:
        """The table as plain lists and numbers (JSON), for :meth:`load_timings` in a later run."""
        return {"table": [[list(recipe), seconds] for recipe, seconds in self.table.items()],
                "rate": list(self._timed_rate), "runtime": self.runtime}

    def load_timings(self, timings: dict) -> None:
        """Take over the shapes timed by an earlier run (:meth:`timings`): they are not timed again
        (unless that run timed them in another runtime)."""
        if timings.get("runtime", "torch") != self.runtime:
            return
        for recipe, seconds in timings.get("table", []):
            self.table[_frozen(recipe)] = float(seconds)
        self._timed_rate = [float(value) for value in timings.get("rate", self._timed_rate)]

    def seconds(self, name: str, in_channels: int, out_channels: int) -> float:
        """Seconds per sample of layer ``name`` at these channel counts (:meth:`measure` them first)."""
        spec = self.specs[name]
        if spec.kind == "other":
            seconds, macs = self._timed_rate
            return spec.macs(in_channels, out_channels) * (seconds / macs if macs else 0.0)
        return self.table[spec.recipe(in_channels, out_channels, self.batch_for(name))]


def _frozen(value):
    """JSON lists back into the tuples a recipe is made of."""
    return tuple(_frozen(item) for item in value) if isinstance(value, (list, tuple)) else value


def _kind(module: nn.Module) -> str:
    if isinstance(module, _CONVS) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ in _NORMS and isinstance(module, tuple(_NORMS.values())):
        return "norm"
    return "other"


def _in_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return getattr(module, "in_channels", getattr(module, "num_features", 1))


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    return getattr(module, "out_channels", getattr(module, "num_features", 1))


@torch.no_grad()
def _layer_specs(model: nn.Module, example: tuple) -> dict[str, _LayerSpec]:
    """Every conv, linear and norm layer's rebuild recipe: its input shape, from one forward pass on
    one sample, and its MACs, from :func:`~camphive.measure.count_macs`."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            def hook(mod, args, name=name):
                if args and torch.is_tensor(args[0]) and name not in shapes:
                    shapes[name] = tuple(args[0].shape[1:])
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with eval_mode(model):
            model(*inputs_on_model_device(model, tuple(x[:1] for x in example)))
    finally:
        for handle in handles:
            handle.remove()
    macs = count_macs(model, tuple(x[:1] for x in example)).per_layer
    modules = dict(model.named_modules())
    specs = {}
    for name, shape in shapes.items():
        module = modules[name]
        per_channel = isinstance(module, nn.modules.batchnorm._BatchNorm) or (
            isinstance(module, nn.modules.conv._ConvNd) and 1 < module.groups == module.in_channels)
        specs[name] = _LayerSpec(_kind(module), module, shape, float(macs.get(name or "(model)", 0)),
                                 (_in_channels(module), _out_channels(module)), per_channel)
    return specs


def _child_main() -> None:
    """Entry of the child process: recipes as JSON on stdin, seconds per sample as JSON on stdout."""
    from camphive.measure.allocator import keep_freed_memory

    keep_freed_memory()
    request = json.loads(sys.stdin.read())
    recipes = [_frozen(recipe) for recipe in request.pop("recipes")]
    print(json.dumps(time_recipes(recipes, **request)))


if __name__ == "__main__":
    _child_main()
