"""Run folders and atomic writes.

Every file camphive writes goes through :func:`atomic_write_bytes`: the bytes go to a
temporary file in the same folder, are flushed to disk, and then renamed over the target,
so a crash, a kill or a full disk leaves either the old file or the new one, never half.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from camphive.errors import CamphiveError, ConfigError


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
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        raise CamphiveError(f"cannot write {path}: {error.strerror}; the previous file is intact") from error
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


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
    """

    path: Path
    writer: bool = True

    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False, resume: bool = False) -> "RunFolder":
        """Make the folder. An existing non-empty folder is refused unless ``overwrite`` or ``resume``.

        Under torchrun rank 0 makes (or refuses) it and every process gets the same answer.
        """
        from camphive import distributed

        made = distributed.on_rank_zero(lambda: cls._make(Path(path), overwrite, resume))
        return cls(made.path, writer=distributed.is_main_process())

    @classmethod
    def _make(cls, path: Path, overwrite: bool, resume: bool) -> "RunFolder":
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output path {path} exists and is not a folder; choose another --out")
        if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
            raise ConfigError(f"output folder {path} already exists and is not empty; pass --overwrite or choose another --out")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CamphiveError(f"cannot create output folder {path}: {error.strerror}; choose a writable --out") from error
        return cls(path)

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
            handler = logging.FileHandler(self.file("log.txt"), encoding="utf-8")
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
