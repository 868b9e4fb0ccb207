"""The one progress helper: rich bars on a terminal, silence elsewhere."""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

_enabled: bool | None = None


def set_enabled(enabled: bool | None) -> None:
    """Force progress output on or off; ``None`` means: on only when stderr is a terminal."""
    global _enabled
    _enabled = enabled


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return sys.stderr.isatty()


def track(iterable: Iterable, description: str = "", total: int | None = None) -> Iterator:
    """Iterate with a progress bar when enabled."""
    if not enabled():
        yield from iterable
        return
    from rich.progress import track as rich_track

    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    yield from rich_track(iterable, description=description, total=total, transient=True, console=_console())


@contextmanager
def status(message: str):
    """Show a spinner with ``message`` while the block runs (when enabled)."""
    if not enabled():
        yield
        return
    with _console().status(message):
        yield


def _console():
    from rich.console import Console

    return Console(stderr=True)
