"""benchmarks/sparse_gpu.py: without a capable GPU it says so in one line and writes nothing; its rows and tables,
run on the CPU through the dense stand-in (no figure here is a measurement)."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from camphive import semi_structured

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def dense_stand_in(monkeypatch):
    """to_semi_structured on the CPU: no GPU check, CPU float32 weights allowed, the 'compression' keeps the weight."""
    monkeypatch.setattr(semi_structured, "_require_gpu", lambda model: None)
    monkeypatch.setattr(semi_structured, "_device_reason", lambda weight: None)
    monkeypatch.setattr(semi_structured, "_compress", lambda matrix, backend: matrix)
    monkeypatch.setattr(semi_structured, "SUPPORTED_DTYPES", (torch.float32,))


def load_benchmark(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("sparse_gpu", ROOT / "benchmarks" / "sparse_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_without_a_capable_gpu_says_so_and_writes_nothing():
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes()
    finished = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sparse_gpu.py")], capture_output=True,
                              text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.splitlines() == [
        "benchmarks/sparse_gpu.py needs a CUDA GPU of compute capability 8.0 or later; torch sees no CUDA GPU here: "
        "nothing measured, nothing written"]
    assert results.read_bytes() == before


def test_benchmark_rows_and_tables_on_the_cpu_with_the_dense_stand_in(dense_stand_in, monkeypatch):
    """The benchmark's plumbing (shapes, conversion, tables) with float32 on the CPU; no figure here is a measurement."""
    benchmark = load_benchmark(monkeypatch)
    args = benchmark.parse_args(["--linears", "32x64,24x64", "--linear-batches", "1,3", "--models",
                                 "mobilenetv2-imagenet", "--batches", "1", "--resolution", "32", "--samples", "1",
                                 "--sample-ms", "0.01", "--backend", "cutlass"])
    device, dtype, no_sync = torch.device("cpu"), torch.float32, lambda: None
    linear = benchmark.linear_rows(args, device, dtype, no_sync)
    assert [row["layer"] for row in linear] == ["linear 32x64"] * 2 + ["linear 24x64"] * 2
    assert linear[0]["error"] < 1e-6 and "sparse_ms" not in linear[2] and "out a multiple of 32" in linear[2]["reason"]
    convs = benchmark.conv_rows(args, device, dtype, no_sync)
    mobilenet = benchmark.pruned_model("mobilenetv2-imagenet", device, dtype)
    assert sum(row["count"] for row in convs) == sum(benchmark.is_pointwise(m) for m in mobilenet.modules())
    assert all(row["error"] < 1e-5 for row in convs if "sparse_ms" in row)
    assert any("sparse_ms" not in row for row in convs)  # 24-channel layers stay dense
    text = benchmark.table(convs, gemm=True) + benchmark.conv_totals(convs) + benchmark.table(linear)
    assert "left dense: weight 24x64" in text and "mobilenetv2-imagenet, batch 1:" in text
    models = benchmark.model_rows(args, device, dtype, no_sync)
    assert models[0]["error"] < 1e-4 and "layers converted" in models[0]["shape"]
