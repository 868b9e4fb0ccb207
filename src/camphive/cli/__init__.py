"""The ``camphive`` command line: thin, each command is one call of a job or the API.

Every command accepts ``--config FILE.yaml`` whose keys (option names, with ``-`` or ``_``)
fill in any option not given on the command line. Errors a user can fix print one line and
exit with status 2; no traceback.

- :mod:`~camphive.cli.common`: the app, ``--config`` and the options every command shares;
- :mod:`~camphive.cli.commands`: ``train``, ``evaluate``, ``demo``, ``spectrum``, ``export``;
- :mod:`~camphive.cli.pruning_commands`: ``prune`` and ``compare``, whose pruning options
  :mod:`~camphive.cli.settings_options` generates from the settings classes' fields;
- :mod:`~camphive.cli.entry`: :func:`main` and the console entry point (``camphive``,
  ``python -m camphive``).
"""
from camphive.cli import commands, pruning_commands  # noqa: F401 - importing them adds their commands to app
from camphive.cli.common import app
from camphive.cli.entry import Interrupted, _entry, main

__all__ = ["app", "main", "Interrupted", "_entry"]
