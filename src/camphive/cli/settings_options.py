"""Command-line options generated from the typed pruning settings (one place per option: its field).

Each field of the settings classes (:class:`~camphive.pruning.core.settings.PruneSettings` and
its subclasses) becomes an option: ``--`` and the field's name with dashes, its value type from
the field's annotation (``int``, ``float`` when a float is allowed, else text), and its help and
--help panel from the field's ``metadata`` (``dataclasses.field(default=..., metadata={...})``):

- ``help``: what the option does, without its default;
- ``panel``: the --help panel that lists it (none: the plain "Options" panel);
- ``default``: what ``None`` resolves to, for a field whose default is ``None`` (text; ``""``
  shows none; absent: "resolved per criterion"); for an on/off field, ``True`` or ``False``.
  A field with another default shows that value;
- ``off_help``: the help of an on/off field's ``--no-NAME``;
- ``min``: the smallest integer the option takes (checked by the command-line parser);
- ``items``: the item type (``str``, ``int``) of a comma-separated list option.

A field added to a settings class is an option of every command built with all fields, with no
edit here. On the command line every generated option defaults to ``None``: one not given is not
passed on, and the settings resolve it (the default its help names), so an option of the other
mode is never passed by default. An on/off field (annotation ``bool``) is two options, --NAME
and --no-NAME, one row each, so that both names stay whole in an 80-column --help; see
:func:`switch`.
"""
from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Optional

import typer

from camphive.errors import ConfigError

RESOLVED_PER_CRITERION = "resolved per criterion"


def setting_fields(classes, *, exclude=(), only=None) -> dict[str, dataclasses.Field]:
    """The fields of the settings ``classes`` by name, in the order the classes declare them; a
    name several classes declare appears once, as the first one declares it."""
    fields = {}
    for cls in classes:
        for field in dataclasses.fields(cls):
            if field.name not in exclude and (only is None or field.name in only):
                fields.setdefault(field.name, field)
    return fields


def settings_options(fields: dict[str, dataclasses.Field], panels=(), notes=None):
    """Decorate a command whose last parameter is ``**settings``: that parameter becomes one option per
    field of ``fields`` (a parameter the command declares itself, of the same name, wins). The
    options are listed by panel in the order ``panels`` gives (others after them), the command's own
    options first within a panel. ``notes`` ({field name: text}) adds what the command does with a
    setting to its help. The command reads the values with :func:`settings_values`."""
    def decorate(command):
        signature = inspect.signature(command)
        declared = [param for param in signature.parameters.values() if param.kind is not param.VAR_KEYWORD]
        names = {param.name for param in declared}
        generated = [param for name, field in fields.items() if name not in names
                     for param in option_parameters(field, (notes or {}).get(name))]
        order = {panel: rank for rank, panel in enumerate(panels)}

        def rank(param):
            panel = getattr(param.default, "rich_help_panel", None)
            return -1 if panel is None else order.get(panel, len(order))

        parameters = [param.replace(kind=param.KEYWORD_ONLY) for param in sorted(declared + generated, key=rank)]
        command.__signature__ = signature.replace(parameters=parameters)  # what Typer reads the options from
        return command
    return decorate


def option_parameters(field: dataclasses.Field, note: str | None = None) -> list[inspect.Parameter]:
    """The command parameters (Typer options) of one settings field: one, or two for an on/off field.
    ``note`` follows the field's help."""
    meta, name = field.metadata, field.name
    described = meta.get("help", name.replace("_", " ").capitalize()).rstrip(".") + (f"; {note}" if note else "")
    panel, flag = meta.get("panel"), "--" + name.replace("_", "-")

    def parameter(param_name, default, annotation):
        return inspect.Parameter(param_name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    if _kinds(field) == ["bool"]:
        default = field.default if field.default is not None else meta.get("default")
        on_help = _sentence(described, " (default)" if default is True else
                            f" (default: {default})" if isinstance(default, str) else "")
        off_help = _sentence(meta.get("off_help", f"Turn {name.replace('_', ' ')} off"), " (default)" if default is False else "")
        return [parameter(name, typer.Option(None, flag, help=on_help, rich_help_panel=panel), Optional[bool]),
                parameter(f"no_{name}", typer.Option(False, f"--no-{flag[2:]}", help=off_help, rich_help_panel=panel),
                          bool)]
    default = _default_text(field)
    help_text = _sentence(described, f" (default: {default})" if default else "")
    extra = {"min": meta["min"]} if "min" in meta else {}
    option = typer.Option(None, help=help_text, rich_help_panel=panel, **extra)
    return [parameter(name, option, Optional[_value_type(field)])]


def settings_values(ctx: typer.Context, fields: dict[str, dataclasses.Field], values: dict, *,
                    defaults: bool = False) -> dict:
    """The settings among ``values`` (a command's ``**settings``) as the settings classes take them:
    on/off pairs resolved (:func:`switch`), comma-separated lists read, options not given left out
    (or, with ``defaults``, given their field's default)."""
    from camphive.jobs.compare_options import parse_list

    options = {}
    for name, field in fields.items():
        if name not in values:
            continue  # declared by the command itself, which passes it on
        value = values[name]
        if _kinds(field) == ["bool"]:
            value = switch(ctx, name, value, values[f"no_{name}"])
        elif value is not None and "items" in field.metadata:
            value = parse_list(value, field.metadata["items"], name.replace("_", "-"))
        if value is None and defaults and field.default is not dataclasses.MISSING:
            value = field.default
        if value is not None:
            options[name] = value
    return options


def switch(ctx: typer.Context, name: str, on: Optional[bool], off: bool) -> Optional[bool]:
    """The value of the switch ``name`` declared as the options --NAME (``on``) and --no-NAME (``off``).

    None when neither is set. When both are set, the one given on the command line wins over the
    one a config file gave; both on the command line contradict each other.
    """
    if not off:
        return on
    if not on:
        return False
    on_command_line = [getattr(ctx.get_parameter_source(key), "name", None) == "COMMANDLINE"
                       for key in (name, f"no_{name}")]
    if on_command_line[0] == on_command_line[1]:
        option = name.replace("_", "-")
        raise ConfigError(f"--{option} and --no-{option} contradict each other; give one of them")
    return on_command_line[0]


def _kinds(field: dataclasses.Field) -> list[str]:
    """The types a field's annotation names, but None: ``"int | None"`` (or ``int | None``) -> ``["int"]``."""
    if not isinstance(field.type, str):  # a class declared without ``from __future__ import annotations``
        members = typing.get_args(field.type) or (field.type,)
        return [getattr(member, "__name__", str(member)) for member in members if member is not type(None)]
    return [part.strip() for part in field.type.split("|") if part.strip() != "None"]


def _value_type(field: dataclasses.Field) -> type:
    kinds = _kinds(field)
    if "items" in field.metadata:
        return str  # a comma-separated list, read by settings_values
    if "float" in kinds:
        return float
    return int if kinds == ["int"] else str


def _default_text(field: dataclasses.Field) -> str:
    if field.default is None or field.default is dataclasses.MISSING:
        return field.metadata.get("default", RESOLVED_PER_CRITERION)
    if isinstance(field.default, (tuple, list)):
        return ",".join(str(item) for item in field.default)
    return str(field.default)


def _sentence(text: str, suffix: str) -> str:
    return f"{text.rstrip('.')}{suffix}."
