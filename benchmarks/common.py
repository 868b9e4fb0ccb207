"""Helpers shared by the benchmark scripts: machine description, cached dense models, RESULTS.md."""
from __future__ import annotations

import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from camphive import data, models  # noqa: E402
from camphive.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from camphive.runs import atomic_write_text  # noqa: E402
from camphive.training import evaluate, train  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, {device}")


def command_line() -> str:
    return "python " + shlex.join(sys.argv)


def append_results(title: str, body: str, path: Path = ROOT / "benchmarks" / "RESULTS.md") -> None:
    """Append a dated section to RESULTS.md, atomically (read, append, write, rename)."""
    existing = path.read_text() if path.is_file() else "# Benchmark results\n\nEvery table here was measured by a script in benchmarks/; each section says when, where and how.\n"
    section = (f"\n## {title}\n\n*{time.strftime('%Y-%m-%d %H:%M')}, {machine()}*\n\n"
               f"Command: `{command_line()}`\n\n{body.strip()}\n")
    atomic_write_text(path, existing.rstrip("\n") + "\n" + section)


def publish(title: str, body: str, write: bool = True) -> None:
    """Print a benchmark's tables and the machine; append them to RESULTS.md unless ``write`` is False."""
    print(body)
    print(machine())
    if write:
        append_results(title, body)


def run_cli_timed(arguments: list[str], env: dict | None = None) -> float:
    """Run ``python -m camphive ARGUMENTS`` as a user would; return the wall seconds (exit on failure)."""
    import subprocess

    command = [sys.executable, "-m", "camphive", *arguments]
    started = time.perf_counter()
    finished = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})})
    wall = time.perf_counter() - started
    if finished.returncode != 0:
        raise SystemExit(f"camphive {arguments[0]} failed with exit code {finished.returncode}")
    return wall


def report_for_results(run_folder: Path) -> str:
    """A run's ``report.md`` without its pictures (their paths are relative to the run folder)."""
    report = (run_folder / "report.md").read_text()
    report = "\n".join(line for line in report.splitlines() if not line.startswith("!["))
    report = report.replace("\n# ", "\n### ", 1) if not report.startswith("# ") else "### " + report[2:]
    return report + f"\n\nThe run folder ({run_folder}) also holds the plots and the full results.\n"


def cache_dir() -> Path:
    path = Path(os.environ.get("CAMPHIVE_CACHE", Path.home() / ".cache" / "camphive")) / "benchmarks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def dense_model(name: str, dataset: str, epochs: int, lr: float = 0.05, seed: int = 0, train_subset: int | None = None,
                log=print):
    """Train (or load from the cache) a dense model; returns (model, seconds per epoch or None)."""
    cached = cache_dir() / f"{name}-{dataset}-e{epochs}-lr{lr}-n{train_subset}-s{seed}.safetensors"
    if cached.is_file():
        stored = load_checkpoint(cached)
        return stored.model, stored.metadata.get("seconds_per_epoch")
    torch.manual_seed(seed)
    train_set = data.load(dataset, split="train")
    model = models.create(name, num_classes=train_set.num_classes, in_channels=train_set.input_shape[0])
    loader = data.loader(train_set, batch_size=128, train=True, seed=seed, subset=train_subset,
                         random_subset=train_subset is not None)
    started = time.perf_counter()
    train(model, loader, epochs, lr=lr, device="cpu", seed=seed)
    per_epoch = (time.perf_counter() - started) / max(epochs, 1)
    log(f"trained dense {name}: {per_epoch:.0f} s/epoch")
    save_checkpoint(cached, model, dataset=dataset, seconds_per_epoch=per_epoch,
                    input_shape=list(train_set.input_shape))
    return model, per_epoch


def test_batches(dataset: str, batch_size: int = 1000):
    return list(data.loader(data.load(dataset, split="test"), batch_size=batch_size))


def accuracy(model, batches) -> float:
    return evaluate(model, batches, device="cpu")["accuracy"]


def keep_freed_memory() -> str:
    """Stop glibc from returning large freed blocks to the OS after every forward pass.

    By default glibc serves big allocations (a batch-64 activation is several MB) with mmap and
    unmaps them on free, so every forward pays page faults that depend on the allocator's recent
    history rather than on the model: the same dense resnet20 timed 60 or 85 ms at batch 64 in two
    processes. Pinning the thresholds (what jemalloc/tcmalloc, common for CPU inference, do anyway)
    makes timings repeatable; it speeds up the dense model most, so speed-ups only get smaller.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return "default allocator (not glibc)"
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30):
        return "glibc malloc with mmap and trim thresholds pinned at 1 GiB (mallopt)"
    return "default glibc malloc (mallopt refused)"
