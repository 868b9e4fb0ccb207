"""Does unstructured sparsity pay on the CPU? File sizes, and sparse CSR against dense matrix products.

Sections (``--sections``):

* ``sizes``: small-cnn (1x28x28) and resnet20 (3x32x32), untrained, pruned by magnitude to
  ``--sparsity`` on a few random batches: the dense float32 checkpoint, camphive's checkpoint
  with masks, and the sparse file (``camphive.save_sparse``) with float32, float16 and
  bfloat16 values, each with its ratio to the dense checkpoint.
* ``csr``: pruned linear layers (``y = x Wᵀ + b``) and MobileNetV2's 1x1 convolutions (a
  GEMM over the pixels), dense (``nn.Linear`` / ``nn.Conv2d``) against torch's sparse CSR
  product through ``camphive.sparse_format.CSRLinear`` / ``CSRConv1x1`` (the layers
  ``to_sparse_csr`` puts in a model, so the CSR times include the transposes and, for
  convolutions at batch > 1, the layout copy back to NCHW), at sparsity 0.9 / 0.95 / 0.98
  (random masks), on 1 and 2 threads. The two are timed side by side (interleaved samples,
  alternating which goes first), medians of ``--samples``; each sample repeats the call until
  it lasts about a millisecond.

    PYTHONPATH=src python benchmarks/sparse_cpu.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("CAMPHIVE_CACHE", "/tmp/camphive-cache")
import torch  # noqa: E402
from common import publish  # noqa: E402  (puts src/ on the path)
from torch import nn  # noqa: E402

import camphive  # noqa: E402
from camphive import models  # noqa: E402
from camphive.checkpoints import save_checkpoint  # noqa: E402
from camphive.sparse_format import CSRConv1x1, CSRLinear, save_sparse  # noqa: E402

# (out features, in features) of the linears; (in channels, out channels, resolution) of the 1x1 convs.
LINEARS = [(512, 512), (1024, 1024), (4096, 1024)]
LINEAR_BATCHES = (1, 64)
CONVS = [(96, 576, 14), (576, 96, 14), (160, 960, 7), (960, 160, 7), (960, 320, 7)]
CONV_BATCHES = (1, 8)
SPARSITIES = (0.9, 0.95, 0.98)
SIZE_MODELS = [("small-cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))]


def random_weight(rows: int, columns: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """A ``rows x columns`` weight with a uniformly random ``sparsity`` fraction of exact zeros."""
    weight = torch.randn(rows, columns, generator=generator)
    pruned = torch.randperm(rows * columns, generator=generator)[: round(sparsity * rows * columns)]
    weight.view(-1)[pruned] = 0.0
    return weight


def paired_medians(first, second, samples: int) -> tuple[float, float]:
    """Median milliseconds per call of two functions timed in interleaved samples."""
    for function in (first, second):
        function()
    repeats = max(1, round(1e-3 / max(_one_call(first), _one_call(second), 1e-7)))
    times = ([], [])
    for sample in range(samples):
        order = (0, 1) if sample % 2 == 0 else (1, 0)
        for index in order:
            function = (first, second)[index]
            started = time.perf_counter()
            for _ in range(repeats):
                function()
            times[index].append((time.perf_counter() - started) / repeats * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def _one_call(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def csr_rows(samples: int, threads: tuple[int, ...]) -> list[dict]:
    """One row per (layer, batch, sparsity, threads): dense and CSR milliseconds, checked equal."""
    generator = torch.Generator().manual_seed(0)
    cases = [(f"linear {out_f}x{in_f}", batch, out_f, in_f, None)
             for out_f, in_f in LINEARS for batch in LINEAR_BATCHES]
    cases += [(f"1x1 conv {c_in}->{c_out} @{size}x{size}", batch, c_out, c_in, size)
              for c_in, c_out, size in CONVS for batch in CONV_BATCHES]
    rows = []
    with torch.inference_mode():
        for label, batch, out_f, in_f, size in cases:
            for sparsity in SPARSITIES:
                weight = random_weight(out_f, in_f, sparsity, generator)
                if size is None:
                    dense, inputs = nn.Linear(in_f, out_f), torch.randn(batch, in_f, generator=generator)
                    dense.weight.copy_(weight)
                    sparse = CSRLinear(dense)
                else:
                    dense, inputs = nn.Conv2d(in_f, out_f, 1), torch.randn(batch, in_f, size, size, generator=generator)
                    dense.weight.copy_(weight[:, :, None, None])
                    sparse = CSRConv1x1(dense)
                error = float((dense(inputs) - sparse(inputs)).abs().max())
                for count in threads:
                    torch.set_num_threads(count)
                    dense_ms, csr_ms = paired_medians(lambda: dense(inputs), lambda: sparse(inputs), samples)
                    rows.append({"layer": label, "batch": batch, "sparsity": sparsity, "threads": count,
                                 "dense_ms": dense_ms, "csr_ms": csr_ms, "max_abs_diff": error})
                    print(f"{label} b{batch} s{sparsity} t{count}: dense {dense_ms:.3f} ms, CSR {csr_ms:.3f} ms",
                          flush=True)
    return rows


def csr_table(rows: list[dict]) -> str:
    lines = ["| layer | batch | sparsity | threads | dense ms | CSR ms | CSR speed-up |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['layer']} | {row['batch']} | {row['sparsity']} | {row['threads']} | "
                     f"{row['dense_ms']:.3f} | {row['csr_ms']:.3f} | {row['dense_ms'] / row['csr_ms']:.2f}x |")
    worst = max(row["max_abs_diff"] for row in rows)
    return ("\n".join(lines) + f"\n\nLargest |dense - CSR| output difference over all rows: {worst:.2e}.\n\n"
            + summary(rows))


def summary(rows: list[dict]) -> str:
    """Where CSR won on one thread, and how many multi-thread rows a busy machine spoiled."""
    single = {(row["layer"], row["batch"], row["sparsity"]): row for row in rows if row["threads"] == 1}
    lines = []
    for sparsity in SPARSITIES:
        chosen = [row for key, row in single.items() if key[2] == sparsity]
        slower = [f"{row['layer']} batch {row['batch']} ({row['dense_ms'] / row['csr_ms']:.2f}x)"
                  for row in chosen if row["csr_ms"] >= row["dense_ms"]]
        lines.append(f"- one thread, sparsity {sparsity}: CSR faster in {len(chosen) - len(slower)} of {len(chosen)} "
                     f"rows" + (f"; not faster: {', '.join(slower)}" if slower else ""))
    multi = [row for row in rows if row["threads"] > 1 and (row["layer"], row["batch"], row["sparsity"]) in single]
    spoiled = [row for row in multi if max(row["dense_ms"], row["csr_ms"]) > 3 * max(
        single[(row["layer"], row["batch"], row["sparsity"])]["dense_ms"], 1e-9)]
    if multi:
        lines.append(f"- {len(spoiled)} of {len(multi)} multi-thread rows took over 3x the 1-thread dense time: "
                     "other processes held the cores, so those rows measure the machine, not the kernels")
    return "\n".join(lines)


def size_rows(sparsity: float) -> list[dict]:
    """Bytes of each file for each model pruned by magnitude to ``sparsity`` on random batches."""
    rows = []
    folder = tempfile.mkdtemp(prefix="sparse-sizes-")
    for name, shape in SIZE_MODELS:
        torch.manual_seed(0)
        model = models.create(name, num_classes=10, in_channels=shape[0])
        batches = [(torch.randn(32, *shape), torch.randint(0, 10, (32,))) for _ in range(4)]
        result = camphive.prune(model, batches, sparsity=sparsity, criterion="magnitude", spectrum_top_k=0)
        masked = save_checkpoint(os.path.join(folder, f"{name}-masks.safetensors"), model, result.masks)
        row = {"model": name, "sparsity": result.sparsity, "with_masks": os.path.getsize(masked)}
        for dtype in ("float32", "float16", "bfloat16"):
            written = save_sparse(model, os.path.join(folder, f"{name}-{dtype}.safetensors"), masks=result.masks,
                                  dtype=dtype)
            row["dense"], row[dtype] = written.dense_bytes, written.file_bytes
        rows.append(row)
    return rows


def size_table(rows: list[dict]) -> str:
    lines = ["| model | sparsity | dense float32 checkpoint | checkpoint with masks | sparse, float32 values | "
             "sparse, float16 values | sparse, bfloat16 values |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[key]:,} B ({row['dense'] / row[key]:.1f}x smaller)"
                 for key in ("float32", "float16", "bfloat16")]
        lines.append(f"| {row['model']} | {row['sparsity']:.4f} | {row['dense']:,} B | {row['with_masks']:,} B | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="sizes,csr", help="comma-separated: sizes, csr")
    parser.add_argument("--sparsity", type=float, default=0.95, help="sizes: the sparsity the models are pruned to")
    parser.add_argument("--samples", type=int, default=21, help="csr: interleaved samples per implementation")
    parser.add_argument("--threads", default="1,2", help="csr: thread counts, comma-separated")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    sections = set(args.sections.split(","))
    threads = torch.get_num_threads()
    if "sizes" in sections:
        torch.set_num_threads(1)
        body = (f"Untrained models pruned by magnitude to {args.sparsity} on four random batches of 32 (global "
                "selection, so layers differ in sparsity); sizes of the files written.\n\n"
                + size_table(size_rows(args.sparsity)))
        publish("Sparse files: size against the dense checkpoint", body, write=not args.no_write)
    if "csr" in sections:
        load_before = os.getloadavg()[0]
        rows = csr_rows(args.samples, tuple(int(count) for count in args.threads.split(",")))
        torch.set_num_threads(threads)  # the machine line names the default, not the last count timed
        load_after = os.getloadavg()[0]
        body = (f"Medians of {args.samples} interleaved samples (milliseconds per call); speed-up = dense / CSR, "
                f"above 1 when CSR is faster. Load average {load_before:.2f} before, {load_after:.2f} after.\n\n"
                + csr_table(rows))
        publish("Sparse CSR against dense on the CPU: pruned linears and 1x1 convolutions", body,
                write=not args.no_write)


if __name__ == "__main__":
    main()
