"""Where a run spends its time and memory: wall seconds and peak resident memory per named stage.

Usage::

    profile = StageProfile()
    with profile.stage("calibration statistics"):
        with profile.stage("forward"):        # nested: recorded as "calibration statistics/forward"
            ...
    profile.to_dict()  # {"stages": {"calibration statistics": {"seconds": ..., "peak_rss_bytes": ...}, ...}, ...}

Stages nest: a stage opened inside another is recorded under the path ``"outer/inner"``, and an
outer stage's time and peak include its inner stages. A path entered again (one stage per pruning
cycle, say) accumulates: seconds add up, ``calls`` counts the entries, the peak is the largest.

Peak memory is the process's resident set size (RSS, bytes). A background thread samples it
every ``interval`` seconds (default 0.02) while at least one stage is open, and each stage also
samples on entry and exit, so a stage shorter than the interval still has a value. Sampling can
miss a spike shorter than the interval; ``resource.getrusage``'s ``ru_maxrss`` (the process's
high-water mark, exact) is the cross-check: when it rose during a stage, the stage set a new
process peak, which is then exactly ``ru_maxrss`` at its exit and is taken as the stage's peak
(``peak_source: "maxrss"``). A stage that stayed below an earlier process peak keeps the sampled
value (``peak_source: "sampled"``).

Cost: ``StageProfile(enabled=False)`` (or :data:`DISABLED`) makes ``stage`` a no-op context;
an enabled profile starts its thread only while a stage is open and reads ``/proc/self/statm``
(a few microseconds) per sample. Stages must be opened and closed by one thread (the caller's).
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

try:
    import resource
except ImportError:  # not on Windows: no high-water mark cross-check there
    resource = None

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# ru_maxrss is in kibibytes on Linux, in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024


def current_rss_bytes() -> int | None:
    """The resident set size of this process now, in bytes (None where /proc is not available)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def max_rss_bytes() -> int | None:
    """The process's resident high-water mark so far (``getrusage`` ``ru_maxrss``), in bytes."""
    if resource is None:
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * _MAXRSS_UNIT


@dataclass
class StageRecord:
    """Totals of one stage path. ``seconds``: wall time summed over ``calls`` entries;
    ``peak_rss_bytes``: the largest RSS seen while it was open (None when unmeasurable)."""

    seconds: float = 0.0
    calls: int = 0
    peak_rss_bytes: int | None = None
    peak_source: str = "sampled"

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "calls": self.calls, "peak_rss_bytes": self.peak_rss_bytes,
                "peak_source": self.peak_source}


class _OpenStage:
    """A stage being timed: its path, start time, and the largest RSS sampled since it opened."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.started = time.perf_counter()
        self.maxrss_at_entry = max_rss_bytes()
        self.peak: int | None = None

    def observe(self, rss: int | None) -> None:
        if rss is not None and (self.peak is None or rss > self.peak):
            self.peak = rss


class StageProfile:
    """Wall seconds and peak RSS per named, nestable stage; see the module docstring."""

    def __init__(self, enabled: bool = True, interval: float = 0.02) -> None:
        self.enabled = enabled
        self.interval = interval
        self.records: dict[str, StageRecord] = {}
        self._open: list[_OpenStage] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as stage ``name`` (nested in any stage already open)."""
        if not self.enabled:
            yield
            return
        self._enter(name)
        try:
            yield
        finally:
            self._exit()

    def _enter(self, name: str) -> None:
        parent = self._open[-1].path + "/" if self._open else ""
        opened = _OpenStage(parent + name)
        opened.observe(current_rss_bytes())
        with self._lock:
            self._open.append(opened)
        if self._thread is None:
            self._start_sampler()

    def _exit(self) -> None:
        rss = current_rss_bytes()
        with self._lock:
            opened = self._open.pop()
            opened.observe(rss)
            for outer in self._open:  # the exit sample belongs to the enclosing stages too
                outer.observe(rss)
        seconds = time.perf_counter() - opened.started
        peak, source = opened.peak, "sampled"
        maxrss = max_rss_bytes()
        if maxrss is not None and opened.maxrss_at_entry is not None and maxrss > opened.maxrss_at_entry:
            peak, source = maxrss, "maxrss"  # this stage raised the process peak: exact value known
        record = self.records.setdefault(opened.path, StageRecord())
        record.seconds += seconds
        record.calls += 1
        if peak is not None and (record.peak_rss_bytes is None or peak >= record.peak_rss_bytes):
            record.peak_rss_bytes, record.peak_source = peak, source
        if not self._open:
            self._stop_sampler()

    def _start_sampler(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="camphive-rss-sampler", daemon=True)
        self._thread.start()

    def _stop_sampler(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._thread = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            rss = current_rss_bytes()
            with self._lock:
                for opened in self._open:
                    opened.observe(rss)

    def seconds(self, path: str) -> float:
        """Total wall seconds of a stage path (0.0 if it never ran)."""
        record = self.records.get(path)
        return 0.0 if record is None else record.seconds

    def to_dict(self) -> dict:
        """``{"stages": {path: record}, "interval_s", "process_maxrss_bytes"}``, stages in first-entry order."""
        return {
            "stages": {path: record.to_dict() for path, record in self.records.items()},
            "interval_s": self.interval,
            "process_maxrss_bytes": max_rss_bytes(),
        }


DISABLED = StageProfile(enabled=False)
"""A profile whose ``stage`` does nothing: the default for code that may or may not be profiled."""
