"""Helpers shared by the benchmark scripts: machine description, cached dense models, RESULTS.md and its history."""
from __future__ import annotations

import contextlib
import os
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from camphive import data, models  # noqa: E402
from camphive.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from camphive.measure.allocator import keep_freed_memory  # noqa: E402,F401  (the benchmarks pin it)
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


RESULTS_PATH = ROOT / "benchmarks" / "RESULTS.md"
RESULTS_HEADER = """# Benchmark results

The current figures of every benchmark in `benchmarks/`: one section per benchmark and setup,
the newest run of it, each with its date, machine and command. Older runs that a newer run of
the same benchmark and setup replaced are kept, verbatim, in `benchmarks/history/<date of the
run>.md`.
"""


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M")


def _split_sections(text: str) -> tuple[str, list[str]]:
    """``(preamble, sections)``: each section runs from its ``## `` line to the next (code fences respected)."""
    preamble, sections, current, fenced = [], [], None, False
    for line in text.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if line.startswith("## ") and not fenced:
            current = [line]
            sections.append(current)
        elif current is None:
            preamble.append(line)
        else:
            current.append(line)
    return "".join(preamble), ["".join(section) for section in sections]


def _section_title(section: str) -> str:
    return section.split("\n", 1)[0][3:].strip()


def _section_command(section: str) -> tuple[str, ...] | None:
    """The command a section records (its ``Command: `...``` line), without the interpreter, environment
    variables and the script's folder: ``python benchmarks/x.py --a 1`` and ``python x.py --a 1`` match."""
    for line in section.splitlines():
        if not re.match(r"\s*(?:- )?command\b", line, re.IGNORECASE):
            continue
        for quoted in re.findall(r"`([^`]+)`", line):
            if "python" in quoted or ".py" in quoted:
                return _normalized_command(quoted)
    return None


def _normalized_command(command: str) -> tuple[str, ...]:
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # PYTHONPATH=src ...
    if words and Path(words[0]).name.startswith("python"):
        words = words[1:]
    if words:
        words[0] = Path(words[0]).name
    return tuple(words)


def _section_date(section: str) -> str:
    """The run's date (``YYYY-MM-DD``, from its title or the line under it); today's if it has none."""
    found = re.search(r"\d{4}-\d{2}-\d{2}", "\n".join(section.splitlines()[:3]))
    return found.group(0) if found else _now()[:10]


def _section_time(section: str) -> str | None:
    found = re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}", "\n".join(section.splitlines()[:3]))
    return found.group(0) if found else None


def _superseded(sections: list[str], title: str, command: tuple[str, ...]) -> int | None:
    """Index of the section a new run (``title``, ``command``) replaces, or None for a new section.

    The section with the same title and command; failing that, the only section with that
    title, when the file holds one. A title that holds several sections (one benchmark run
    with different setups, e.g. structured.py's --sections) keeps them all unless the command
    matches one: a run replaces only the run of the same setup. Sections that record no
    command (readings written by hand) are never replaced.
    """
    same_title = [index for index, section in enumerate(sections)
                  if _section_title(section) == title and _section_command(section) is not None]
    for index in reversed(same_title):
        if _section_command(sections[index]) == command:
            return index
    return same_title[0] if len(same_title) == 1 else None


def _history_header(date: str) -> str:
    return (f"# Benchmark results of {date}, superseded\n\n"
            f"Runs of {date} that a newer run of the same benchmark and setup replaced in `benchmarks/RESULTS.md`, "
            "kept verbatim, in the order they were run.\n")


def _add_to_history(history: Path, section: str) -> None:
    """Insert ``section`` into ``history/<its date>.md``, in time order among the runs already there."""
    date = _section_date(section)
    target = history / f"{date}.md"
    preamble, sections = _split_sections(target.read_text()) if target.is_file() else (_history_header(date), [])
    moment = _section_time(section)
    position = len(sections)
    if moment is not None:
        later = [index for index, old in enumerate(sections) if (_section_time(old) or "") > moment]
        position = later[0] if later else len(sections)
    sections.insert(position, section)
    history.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, _join(preamble, sections))


def _join(preamble: str, sections: list[str]) -> str:
    parts = [preamble.rstrip("\n")] + [section.strip("\n") for section in sections]
    return "\n\n".join(part for part in parts if part) + "\n"


@contextlib.contextmanager
def _locked(folder: Path):
    """Serialise writers of the same results file (other benchmarks may finish at the same moment)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        os.close(descriptor)


def append_results(title: str, body: str, path: Path = RESULTS_PATH, history: Path | None = None) -> None:
    """Write a benchmark's tables to RESULTS.md as the current section ``## title``, with date, machine and command.

    The run replaces the section it supersedes (see :func:`_superseded`: the same title and
    command, or the only section with that title), which moves verbatim to
    ``history/<date of that run>.md`` (``history`` defaults to ``path``'s folder's
    ``history/``); otherwise it becomes a new section, after the others with its title or at
    the end. Both files are written atomically, history first, under a lock on ``path``'s
    folder, so concurrent benchmarks neither lose nor duplicate sections.
    """
    path = Path(path)
    history = Path(history) if history is not None else path.parent / "history"
    command = command_line()
    section = (f"## {title}\n\n*{_now()}, {machine()}*\n\n"
               f"Command: `{command}`\n\n{body.strip()}\n")
    with _locked(path.parent):
        preamble, sections = _split_sections(path.read_text()) if path.is_file() else (RESULTS_HEADER, [])
        replaced = _superseded(sections, title, _normalized_command(command))
        if replaced is not None:
            _add_to_history(history, sections[replaced])
            sections[replaced] = section
        else:
            same_title = [index for index, old in enumerate(sections) if _section_title(old) == title]
            sections.insert(same_title[-1] + 1 if same_title else len(sections), section)
        atomic_write_text(path, _join(preamble, sections))


def publish(title: str, body: str, write: bool = True) -> None:
    """Print a benchmark's tables and the machine; write them to RESULTS.md unless ``write`` is False."""
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
