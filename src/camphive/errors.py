"""User-facing errors.

Every problem a user can fix (a wrong path, name, shape or value) is raised as a
:class:`CamphiveError` whose message is one line: what is wrong, the value seen, and the
fix. The CLI prints that line and exits non-zero without a traceback; API callers can
catch the class, its subclasses, or the builtin each also derives from (``ValueError`` for
settings, data and checkpoints; ``FloatingPointError`` for numerical failures).
"""
from __future__ import annotations


class CamphiveError(Exception):
    """Base class for errors whose message is meant for the user, one line."""

    exit_code = 2


class ConfigError(CamphiveError, ValueError):
    """An option, name or value is not valid."""


class DataError(CamphiveError, ValueError):
    """A dataset is missing, malformed, or does not fit the model (a ``ValueError`` too)."""


class CheckpointError(CamphiveError, ValueError):
    """A checkpoint cannot be read or does not fit what was asked (a ``ValueError`` too)."""


class NumericalError(CamphiveError, FloatingPointError):
    """NaN or inf appeared in weights, losses or curvature products."""


def one_line(message: str) -> str:
    """Collapse a message to a single line (error output must not span lines)."""
    return " ".join(str(message).split())
