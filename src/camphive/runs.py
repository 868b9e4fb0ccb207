"""Run folders and atomic writes.

Every file camphive writes goes through :func:`atomic_write_bytes`: the bytes go to a
temporary file in the same folder, are flushed to disk, and then renamed over the target,
so a crash, a kill or a full disk leaves either the old file or the new one, never half.

A job that fails before it has produced anything worth keeping leaves no trace: see
:meth:`RunFolder.discarded_on_error`.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from camphive.errors import CamphiveError, ConfigError

LOG_FILE = "log.txt"


def atomic_write_bytes(path: str | Path, data: bytes, *, every_process: bool = False) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    A failure leaves the previous file intact. Under torchrun only rank 0 writes (the other
    processes hold the same results and return the path without touching the disk), unless
    ``every_process``.
    """
    path = Path(path)
    if not every_process:
        from camphive.distributed.group import is_main_process

        if not is_main_process():
            return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise CamphiveError(f"cannot write {path}: {error.strerror}; choose a writable --out folder") from error
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        # mkstemp makes the file 0600; give it the mode open() would, before anyone can see it.
        os.chmod(temporary, _mode_for(path))
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise CamphiveError(f"cannot write {path}: {error.strerror}; the previous file is intact") from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _mode_for(path: Path) -> int:
    """The permission bits ``open(path, "wb")`` would leave: an existing file's own, else 0o666 less the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where the system allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)  # elsewhere: set and restore at once (a thread creating a file meanwhile may see 022)
    os.umask(current)
    return current


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data) -> Path:
    """Strict JSON (what other tools can read): numbers that are not finite are written as ``null``."""
    return atomic_write_text(path, json.dumps(strict_json_data(data), indent=2, default=_json_default, allow_nan=False) + "\n")


def strict_json_data(value):
    """``value`` with NaN and infinite floats (at any depth of dicts, lists, tuples) turned into None,
    objects with ``to_dict``/``tolist`` into plain data: what strict JSON can hold."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_data(item) for item in value]
    if hasattr(value, "to_dict") or hasattr(value, "tolist"):
        return strict_json_data(_json_default(value))
    return value


def _json_default(value):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


@dataclass
class RunFolder:
    """A folder holding one run: ``config.yaml``, ``metrics.json``, ``log.txt``, checkpoints.

    Under torchrun only rank 0 writes: the folder is made there, and on every other process
    ``writer`` is False and ``write_config``, ``write_json`` and the logger do nothing (jobs
    check ``writer`` before saving checkpoints).

    ``made`` (the folders this call created, outermost first), ``existing`` (the paths,
    relative to the folder, that were there before; None on resume) and ``backup`` (hard
    links to the files an ``overwrite`` found there) let :meth:`discard` take back exactly
    what this call did.
    """

    path: Path
    writer: bool = True
    made: tuple[Path, ...] = field(default=(), repr=False)
    existing: frozenset[str] | None = field(default=None, repr=False)
    backup: Path | None = field(default=None, repr=False)
    kept: bool = field(default=False, repr=False)

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False, resume: bool = False) -> "RunFolder":
        """Make the folder. An existing non-empty folder is refused unless ``overwrite`` or ``resume``.

        Under torchrun rank 0 makes (or refuses) it and every process gets the same answer.
        """
        from camphive import distributed

        made = distributed.on_rank_zero(lambda: cls._make(Path(path), overwrite, resume))
        return cls(made.path, writer=distributed.is_main_process(), made=made.made, existing=made.existing,
                   backup=made.backup)

    @classmethod
    def _make(cls, path: Path, overwrite: bool, resume: bool) -> "RunFolder":
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output path {path} exists and is not a folder; choose another --out")
        if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
            raise ConfigError(f"output folder {path} already exists and is not empty; pass --overwrite or choose another --out")
        missing = [folder for folder in (path, *path.parents) if not folder.exists()]
        existing = None if resume else _relative_paths(path) if path.is_dir() else frozenset()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CamphiveError(f"cannot create output folder {path}: {error.strerror}; choose a writable --out") from error
        backup = _link_backup(path, existing) if existing else None
        return cls(path, made=tuple(reversed(missing)), existing=existing, backup=backup)

    def keep(self) -> None:
        """Mark the run as holding something worth keeping (a checkpoint, resumable state):
        from now on :meth:`discard` leaves the folder alone, and an ``overwrite`` replaces the
        old run for good: its files this run has not rewritten yet are removed too (the log
        excepted), so that a later ``--resume`` can never pick up the old run's state."""
        if not self.kept and self.writer and self.backup is not None:
            for relative in self.existing or ():
                old, current = self.backup / relative, self.path / relative
                if relative != LOG_FILE and old.is_file() and current.is_file() and os.path.samefile(old, current):
                    current.unlink()
            shutil.rmtree(self.backup, ignore_errors=True)
        self.kept = True

    def discard(self) -> None:
        """Take back what this call wrote: files and folders that were not there before it, then
        the folders it created, if now empty.

        Does nothing after :meth:`keep`, on resume, and on processes other than rank 0. Files
        that existed before the call (an ``--overwrite`` of an older run) are never removed;
        those it replaced are put back (a file it appended to, ``log.txt``, keeps the lines).
        """
        if not self.writer or self.kept or self.existing is None:
            return
        self.close()
        if self.backup is not None:
            _restore_backup(self.backup, self.path)
        for folder, subfolders, files in os.walk(self.path, topdown=False):
            for name in [*files, *subfolders]:
                entry = Path(folder, name)
                if entry.relative_to(self.path).as_posix() in self.existing:
                    continue
                try:
                    if entry.is_dir() and not entry.is_symlink():
                        entry.rmdir()  # empty by now, unless it holds files that existed before
                    else:
                        entry.unlink()
                except OSError:
                    pass  # best effort: the error that made the job fail is the one to report
        for folder in reversed(self.made):
            try:
                folder.rmdir()
            except OSError:
                break

    @contextmanager
    def discarded_on_error(self):
        """``with run.discarded_on_error(): ...``: if the body fails before :meth:`keep` was
        called, :meth:`discard` what it wrote (a failed run leaves no half-written folder that
        blocks the corrected command); if it succeeds, keep the run."""
        try:
            yield self
        except BaseException:
            self.discard()
            raise
        self.keep()

    def file(self, name: str) -> Path:
        return self.path / name

    def write_config(self, config: dict) -> Path:
        if not self.writer:
            return self.file("config.yaml")
        return atomic_write_text(self.file("config.yaml"), yaml.safe_dump(_plain(config), sort_keys=False))

    def write_json(self, name: str, data) -> Path:
        if not self.writer:
            return self.file(name)
        return atomic_write_json(self.file(name), data)

    def read_json(self, name: str):
        return json.loads(self.file(name).read_text())

    def logger(self) -> logging.Logger:
        """A logger appending to ``log.txt`` in this folder (one per folder; silent when not the writer)."""
        if not self.writer:
            silent = logging.getLogger("camphive.run.silent")
            if not silent.handlers:
                silent.addHandler(logging.NullHandler())
                silent.propagate = False
            return silent
        logger = logging.getLogger(f"camphive.run.{self.path.resolve()}")
        if not logger.handlers:
            handler = logging.FileHandler(self.file(LOG_FILE), encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False
        return logger

    def close(self) -> None:
        logger = logging.getLogger(f"camphive.run.{self.path.resolve()}")
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)


_BACKUP_PREFIX = ".camphive-replaced-"


def _link_backup(folder: Path, existing: frozenset[str]) -> Path | None:
    """Hard links (no copies) to every file in ``folder`` in a hidden folder beside them, so that
    files an overwriting run replaces can be put back if it fails. None where links are not
    possible (the run then overwrites without a way back, as before)."""
    backup = None
    try:
        backup = Path(tempfile.mkdtemp(prefix=_BACKUP_PREFIX, dir=folder))
        for relative in existing:
            source = folder / relative
            if relative.startswith(_BACKUP_PREFIX) or source.is_dir() and not source.is_symlink():
                continue
            (backup / relative).parent.mkdir(parents=True, exist_ok=True)
            os.link(source, backup / relative, follow_symlinks=False)
    except OSError:
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return None
    return backup


def _restore_backup(backup: Path, folder: Path) -> None:
    for parent, subfolders, files in os.walk(backup):
        for name in [*files, *(name for name in subfolders if os.path.islink(os.path.join(parent, name)))]:
            relative = Path(parent, name).relative_to(backup)
            try:
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                os.replace(backup / relative, folder / relative)
            except OSError:
                pass  # best effort: the error that made the job fail is the one to report
    shutil.rmtree(backup, ignore_errors=True)


def _relative_paths(folder: Path) -> frozenset[str]:
    """Every path under ``folder`` (files, folders, links; links not followed), relative to it."""
    found = set()
    for parent, subfolders, files in os.walk(folder):
        found.update(Path(parent, name).relative_to(folder).as_posix() for name in [*subfolders, *files])
    return frozenset(found)


def _plain(value):
    """Turn configs into YAML-safe plain data (paths to strings, tuples to lists)."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool):
        return value
    for kind in (int, float, str):  # subclasses (numpy scalars, torch's version string) become plain
        if isinstance(value, kind):
            return kind(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return str(value)


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
