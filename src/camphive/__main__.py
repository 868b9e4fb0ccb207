from camphive.cli import _entry

_entry()
