"""Does 2:4 semi-structured sparsity pay on the GPU? Dense against sparse tensor cores for 2:4 linears and 1x1 convs.

Needs a CUDA GPU of compute capability 8.0 or later; anywhere else it prints one line saying
so, exits 0 and writes nothing to RESULTS.md. Weights are pruned 2:4 by magnitude (in each
group of 4 consecutive input features or channels the 2 smallest are zeroed: camphive's
``pattern="2:4"`` layout) and converted by ``camphive.semi_structured.to_semi_structured``, so
the sparse times are those of the modules it puts in a model. float16 throughout.

Sections (``--sections``):

* ``linear``: ``nn.Linear`` layers (``--linears``, out x in, with bias) at batches
  ``--linear-batches``: the layer (cuBLAS) against ``SemiStructuredLinear``.
* ``convs``: the 1x1 convolutions of ``--models`` (untrained ImageNet models, 1000 classes) at
  ``--resolution`` with NHWC (``channels_last``) inputs at batches ``--batches``, each distinct
  (in, out, H, W) once with how many layers share it: ``nn.Conv2d`` (cuDNN) against the same GEMM
  with the dense weight (``F.linear`` over the NHWC pixels: ``SemiStructuredConv1x1``'s code with
  an uncompressed weight) and against ``SemiStructuredConv1x1``; then, per model and batch, the
  1x1 convolutions' total time dense and with the convertible ones sparse.
* ``models``: each whole model, dense against ``to_semi_structured(model)``, same inputs.

Each row's implementations are timed side by side (interleaved samples, alternating order,
CUDA synchronised around each sample), medians of ``--samples``; a sample repeats the call
until it lasts about ``--sample-ms``. ``rel. error`` is ``max |sparse - dense| / max |dense|``
over the outputs (float16 accumulation order differs).

    PYTHONPATH=src python benchmarks/sparse_gpu.py
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

os.environ.setdefault("CAMPHIVE_CACHE", "/tmp/camphive-cache")
import torch  # noqa: E402
from common import publish  # noqa: E402  (puts src/ on the path)
from torch import nn  # noqa: E402

from camphive import models  # noqa: E402
from camphive.semi_structured import MIN_CAPABILITY, SemiStructuredConv1x1, to_semi_structured  # noqa: E402

NEEDS_GPU = ("benchmarks/sparse_gpu.py needs a CUDA GPU of compute capability 8.0 or later; {}: nothing measured, "
             "nothing written")
LINEARS = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in)
LINEAR_BATCHES = (1, 8, 32, 64, 128, 256)
MODELS = ("mobilenetv2-imagenet", "resnet50-imagenet")
BATCHES = (32, 64)


def gpu_problem() -> str | None:
    """Why this machine cannot run the benchmark (None when it can)."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU here"
    capability = torch.cuda.get_device_capability()
    if tuple(capability) < MIN_CAPABILITY:
        return f"{torch.cuda.get_device_name()} has compute capability {capability[0]}.{capability[1]}"
    return None


def prune_2_4(weight: torch.Tensor) -> None:
    """Zero, in place, the 2 smallest-magnitude of every 4 consecutive inputs of each unit (at each kernel position)."""
    out, channels = weight.shape[:2]
    groups = weight.detach().reshape(out, channels // 4, 4, -1).clone()
    smallest = groups.abs().argsort(dim=2)[:, :, :2]
    groups.scatter_(2, smallest, 0.0)
    weight.data.copy_(groups.reshape(weight.shape))


def is_pointwise(module: nn.Module) -> bool:
    return type(module) is nn.Conv2d and (module.kernel_size, module.stride, module.padding, module.groups) == (
        (1, 1), (1, 1), (0, 0), 1)


def pruned_model(name: str, device, dtype) -> nn.Module:
    """An untrained ImageNet model with every linear and 1x1 convolution pruned 2:4 (where its fan-in allows)."""
    torch.manual_seed(0)
    model = models.create(name, num_classes=1000).eval()
    with torch.no_grad():
        for module in model.modules():
            if (type(module) is nn.Linear or is_pointwise(module)) and module.weight.shape[1] % 4 == 0:
                prune_2_4(module.weight)
    return model.to(device=device, dtype=dtype, memory_format=torch.channels_last)


def interleaved_medians(functions, samples: int, sample_s: float, synchronize) -> list[float]:
    """Median milliseconds per call of each function, timed in interleaved samples (alternating order)."""
    for function in functions:  # warm-up: kernels chosen, plans built
        function()
    one_call = max(_timed(function, 1, synchronize) for function in functions)
    repeats = max(1, min(10_000, round(sample_s / max(one_call, 1e-7))))
    times = [[] for _ in functions]
    indices = list(range(len(functions)))
    for sample in range(samples):
        for index in indices if sample % 2 == 0 else indices[::-1]:
            times[index].append(_timed(functions[index], repeats, synchronize) / repeats * 1e3)
    return [statistics.median(values) for values in times]


def _timed(function, repeats: int, synchronize) -> float:
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize()
    return time.perf_counter() - started


def relative_error(sparse: torch.Tensor, dense: torch.Tensor) -> float:
    return float((sparse.float() - dense.float()).abs().max() / dense.float().abs().max().clamp_min(1e-12))


def convert_one(layer: nn.Module, backend: str) -> tuple[nn.Module | None, str]:
    """``(the converted copy of layer or None, why not)`` through to_semi_structured."""
    holder = nn.Sequential(copy.deepcopy(layer))
    result = to_semi_structured(holder, backend=backend)
    return (holder[0], "") if result.converted else (None, result.dense.get("0", "not converted"))


def linear_rows(args, device, dtype, synchronize) -> list[dict]:
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        for out_features, in_features in args.linears:
            torch.manual_seed(0)
            dense = nn.Linear(in_features, out_features).eval()
            prune_2_4(dense.weight)
            dense = dense.to(device=device, dtype=dtype)
            sparse, reason = convert_one(dense, args.backend)
            for batch in args.linear_batches:
                inputs = torch.randn(batch, in_features, generator=generator, device=device, dtype=dtype)
                row = {"layer": f"linear {out_features}x{in_features}", "shape": f"batch {batch}", "reason": reason}
                if sparse is None:
                    [row["dense_ms"]] = interleaved_medians([lambda: dense(inputs)], args.samples, args.sample_s,
                                                            synchronize)
                else:
                    row["dense_ms"], row["sparse_ms"] = interleaved_medians(
                        [lambda: dense(inputs), lambda: sparse(inputs)], args.samples, args.sample_s, synchronize)
                    row["error"] = relative_error(sparse(inputs), dense(inputs))
                rows.append(row)
                print(_progress(row), flush=True)
    return rows


def pointwise_shapes(model: nn.Module, inputs: torch.Tensor) -> dict[tuple, list[str]]:
    """``{(in, out, H, W): [layer names]}`` of the model's 1x1 convolutions at these inputs."""
    shapes, handles = {}, []
    for name, module in model.named_modules():
        if is_pointwise(module):
            def record(module, args, _output, name=name):
                _, channels, height, width = args[0].shape
                shapes.setdefault((channels, module.out_channels, height, width), []).append(name)
            handles.append(module.register_forward_hook(record))
    with torch.inference_mode():
        model(inputs)
    for handle in handles:
        handle.remove()
    return shapes


def conv_rows(args, device, dtype, synchronize) -> list[dict]:
    rows = []
    for model_name in args.models:
        model = pruned_model(model_name, device, dtype)
        for batch in args.batches:
            images = torch.randn(batch, 3, args.resolution, args.resolution, device=device, dtype=dtype)
            images = images.contiguous(memory_format=torch.channels_last)
            for (channels, _, height, width), names in pointwise_shapes(model, images).items():
                layer = model.get_submodule(names[0])
                inputs = torch.randn(batch, channels, height, width, device=device, dtype=dtype).contiguous(
                    memory_format=torch.channels_last)
                rows.append(conv_row(args, model_name, names, layer, inputs, synchronize))
                print(_progress(rows[-1]), flush=True)
    return rows


def conv_row(args, model_name: str, names: list[str], layer: nn.Conv2d, inputs: torch.Tensor, synchronize) -> dict:
    batch, channels, height, width = inputs.shape
    gemm = SemiStructuredConv1x1(layer, layer.weight.detach().reshape(layer.out_channels, -1).contiguous())
    sparse, reason = convert_one(layer, args.backend)
    row = {"model": model_name, "layer": names[0] + (f" (+{len(names) - 1} alike)" if len(names) > 1 else ""),
           "count": len(names), "batch": batch, "reason": reason,
           "shape": f"{channels}->{layer.out_channels} @{height}x{width}, batch {batch}"}
    functions = [lambda: layer(inputs), lambda: gemm(inputs)] + ([lambda: sparse(inputs)] if sparse else [])
    with torch.inference_mode():
        times = interleaved_medians(functions, args.samples, args.sample_s, synchronize)
        row["dense_ms"], row["gemm_ms"] = times[:2]
        if sparse is not None:
            row["sparse_ms"], row["error"] = times[2], relative_error(sparse(inputs), layer(inputs))
    return row


def model_rows(args, device, dtype, synchronize) -> list[dict]:
    rows = []
    for model_name in args.models:
        dense = pruned_model(model_name, device, dtype)
        sparse = copy.deepcopy(dense)
        result = to_semi_structured(sparse, backend=args.backend)
        for batch in args.batches:
            images = torch.randn(batch, 3, args.resolution, args.resolution, device=device, dtype=dtype)
            images = images.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                dense_ms, sparse_ms = interleaved_medians([lambda: dense(images), lambda: sparse(images)],
                                                          args.samples, args.sample_s, synchronize)
                error = relative_error(sparse(images), dense(images))
            rows.append({"layer": f"{model_name} (whole model)", "batch": batch,
                         "shape": f"{len(result.converted)} layers converted, {len(result.dense)} dense; batch {batch}",
                         "dense_ms": dense_ms, "sparse_ms": sparse_ms, "error": error, "reason": ""})
            print(_progress(rows[-1]), flush=True)
    return rows


def _progress(row: dict) -> str:
    sparse = f"{row['sparse_ms']:.4f} ms" if "sparse_ms" in row else f"left dense ({row['reason']})"
    return f"{row['layer']} {row['shape']}: dense {row['dense_ms']:.4f} ms, 2:4 {sparse}"


def table(rows: list[dict], gemm: bool = False) -> str:
    """Markdown: layer, shape, dense ms, (dense GEMM ms,) sparse ms, speed-up, relative error."""
    head = "| layer | shape | dense ms |" + (" dense GEMM ms |" if gemm else "") + " 2:4 sparse ms | speed-up |"
    head += (" speed-up vs GEMM |" if gemm else "") + " rel. error |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        cells = [row["layer"], row["shape"], f"{row['dense_ms']:.4f}"] + ([f"{row['gemm_ms']:.4f}"] if gemm else [])
        if "sparse_ms" in row:
            cells += [f"{row['sparse_ms']:.4f}", f"{row['dense_ms'] / row['sparse_ms']:.2f}x"]
            cells += [f"{row['gemm_ms'] / row['sparse_ms']:.2f}x"] if gemm else []
            cells.append(f"{row['error']:.1e}")
        else:
            cells += [f"left dense: {row['reason']}", "-"] + (["-"] if gemm else []) + ["-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conv_totals(rows: list[dict]) -> str:
    """Per model and batch: the 1x1 convolutions' total time, all dense against the convertible ones sparse."""
    lines = []
    for model_name, batch in dict.fromkeys((row["model"], row["batch"]) for row in rows):
        chosen = [row for row in rows if (row["model"], row["batch"]) == (model_name, batch)]
        dense = sum(row["count"] * row["dense_ms"] for row in chosen)
        mixed = sum(row["count"] * row.get("sparse_ms", row["dense_ms"]) for row in chosen)
        converted = sum(row["count"] for row in chosen if "sparse_ms" in row)
        lines.append(f"- {model_name}, batch {batch}: {converted} of {sum(row['count'] for row in chosen)} 1x1 "
                     f"convolutions convertible; their total {dense:.3f} ms dense, {mixed:.3f} ms with those sparse "
                     f"({dense / mixed:.2f}x)")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="linear,convs,models", help="comma-separated: linear, convs, models")
    parser.add_argument("--linears", default=",".join(f"{o}x{i}" for o, i in LINEARS), help="out x in, comma-separated")
    parser.add_argument("--linear-batches", default=",".join(map(str, LINEAR_BATCHES)))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="convs and models")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--backend", default="auto", choices=("auto", "cusparselt", "cutlass"))
    parser.add_argument("--samples", type=int, default=21, help="interleaved samples per implementation")
    parser.add_argument("--sample-ms", type=float, default=5.0, help="about how long one sample lasts")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    args.linears = [tuple(int(size) for size in shape.split("x")) for shape in args.linears.split(",")]
    args.linear_batches = [int(batch) for batch in args.linear_batches.split(",")]
    args.models = args.models.split(",")
    args.batches = [int(batch) for batch in args.batches.split(",")]
    args.sample_s = args.sample_ms / 1e3
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    problem = gpu_problem()
    if problem is not None:
        print(NEEDS_GPU.format(problem))
        return
    warnings.filterwarnings("ignore", message="The PyTorch API of SparseSemiStructuredTensor is in prototype")
    device, dtype, synchronize, sections = torch.device("cuda"), torch.float16, torch.cuda.synchronize, set(
        args.sections.split(","))
    note = (f"float16, backend {args.backend}, medians of {args.samples} interleaved samples (ms per call); "
            "speed-up = dense / 2:4, above 1 when 2:4 is faster.")
    if "linear" in sections:
        rows = linear_rows(args, device, dtype, synchronize)
        publish("2:4 semi-structured sparse against dense on the GPU: linear layers", note + "\n\n" + table(rows),
                write=not args.no_write)
    if "convs" in sections:
        rows = conv_rows(args, device, dtype, synchronize)
        body = (note + f" NHWC inputs at {args.resolution}x{args.resolution}; dense = nn.Conv2d (cuDNN), dense GEMM = "
                "F.linear over the pixels with the uncompressed weight.\n\n" + table(rows, gemm=True) + "\n\n"
                + conv_totals(rows))
        publish("2:4 semi-structured sparse against dense on the GPU: 1x1 convolutions (NHWC)", body,
                write=not args.no_write)
    if "models" in sections:
        rows = model_rows(args, device, dtype, synchronize)
        body = note + f" NHWC inputs at {args.resolution}x{args.resolution}.\n\n" + table(rows)
        publish("2:4 semi-structured sparse against dense on the GPU: whole models", body, write=not args.no_write)


if __name__ == "__main__":
    main()
