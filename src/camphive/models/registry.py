"""The name -> architecture registry behind ``camphive.models.create``.

A factory is any callable ``factory(num_classes=..., in_channels=..., **options)`` that
returns an ``nn.Module``. Names are matched ignoring case, ``-``, ``_`` and spaces, so
``ResNet18_ImageNet``, ``resnet18-imagenet`` and ``resnet18imagenet`` are one model.
Every created model carries ``model.camphive_arch``: a JSON-able dict with the canonical
name, ``num_classes``, ``in_channels`` and every option, enough to rebuild it with
``from_arch``.
"""
from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import nn

from camphive.errors import ConfigError

ModelFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about one architecture."""

    name: str
    factory: ModelFactory
    description: str = ""
    aliases: tuple[str, ...] = ()
    default_input: tuple[int, int, int] | None = None  # (C, H, W) it was designed for
    options: dict[str, Any] = field(default_factory=dict)  # option -> default

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "aliases": list(self.aliases),
            "default_input": list(self.default_input) if self.default_input else None,
            "options": {k: _jsonable_or_repr(v) for k, v in self.options.items()},
        }


_SPECS: dict[str, ModelSpec] = {}  # canonical name -> spec, in registration order
_LOOKUP: dict[str, str] = {}  # normalised name or alias -> canonical name

#: Read-only live view ``{canonical name: ModelSpec}`` of every registered architecture.
MODELS: Mapping[str, ModelSpec] = MappingProxyType(_SPECS)


def normalize_name(name: str) -> str:
    """Lower-case and drop ``-``, ``_`` and spaces: the key names are matched by."""
    return re.sub(r"[-_\s]", "", str(name).lower())


def register(
    name: str,
    factory: ModelFactory,
    *,
    description: str = "",
    aliases: tuple[str, ...] | list[str] = (),
    default_input: tuple[int, int, int] | None = None,
    overwrite: bool = False,
) -> ModelSpec:
    """Add an architecture so ``create(name)`` (and the CLI) can build it.

    ``factory`` must accept ``num_classes`` and ``in_channels`` as keyword arguments;
    its other keyword arguments become the model's options. Re-registering a taken
    name raises ``ConfigError`` unless ``overwrite=True``.
    """
    if not callable(factory):
        raise ConfigError(f"model factory for {name!r} must be callable, got {type(factory).__name__}")
    if not normalize_name(name):
        raise ConfigError(f"model name must contain letters or digits, got {name!r}")
    accepted, takes_any = _keyword_parameters(factory)
    missing = [arg for arg in ("num_classes", "in_channels") if arg not in accepted]
    if missing and not takes_any:
        raise ConfigError(
            f"model factory for {name!r} must accept keyword arguments num_classes and "
            f"in_channels; it lacks {', '.join(missing)}"
        )
    canonical = name.lower()
    keys = [normalize_name(name)] + [normalize_name(alias) for alias in aliases]
    taken = {key: _LOOKUP[key] for key in keys if key in _LOOKUP}
    if taken and not overwrite:
        raise ConfigError(
            f"model name {name!r} clashes with registered {sorted(set(taken.values()))}; "
            "pick another name or pass overwrite=True"
        )
    for old in set(taken.values()):
        _unregister(old)
    options = {
        key: default for key, default in accepted.items()
        if key not in ("num_classes", "in_channels")
    }
    spec = ModelSpec(canonical, factory, description, tuple(aliases), default_input, options)
    _SPECS[canonical] = spec
    for key in keys:
        _LOOKUP[key] = canonical
    return spec


def describe(name: str) -> ModelSpec:
    """The registry entry for ``name`` (any accepted spelling)."""
    return _SPECS[_canonical(name)]


def create(name: str, num_classes: int = 10, in_channels: int = 3, **options: Any) -> nn.Module:
    """Build a freshly initialised model by name.

    ``num_classes`` sets the size of the last Linear layer, ``in_channels`` the input
    channels of the first conv (1 for Fashion-MNIST, 3 for CIFAR/ImageNet). Options are
    the factory's keyword arguments (see ``describe(name).options``). The result has
    ``model.camphive_arch`` = ``{"name", "num_classes", "in_channels", **options}``.
    """
    spec = describe(name)
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be a positive integer, got {value!r}")
    _, takes_any = _keyword_parameters(spec.factory)
    unknown = sorted(set(options) - set(spec.options))
    if unknown and not takes_any:
        raise ConfigError(
            f"model {spec.name!r} has no option {', '.join(unknown)}; "
            f"its options are {sorted(spec.options) or 'none'}"
        )
    resolved = {**spec.options, **options}
    arch = {"name": spec.name, "num_classes": num_classes, "in_channels": in_channels}
    for key, value in resolved.items():
        if value is inspect.Parameter.empty:
            continue  # a required option the caller left out: the factory will say so
        if key not in options and not _is_jsonable(value):
            continue  # a non-JSON default (e.g. a class): rebuilt from the same default
        if not _is_jsonable(value):
            raise ConfigError(
                f"option {key}={value!r} of model {spec.name!r} is not JSON-able; "
                "pass numbers, strings, booleans or lists so checkpoints can rebuild the model"
            )
        arch[key] = value
    model = spec.factory(num_classes=num_classes, in_channels=in_channels, **options)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model factory for {spec.name!r} returned {type(model).__name__}, not an nn.Module"
        )
    model.camphive_arch = json.loads(json.dumps(arch))  # plain lists/dicts, no tuples
    return model


def from_arch(arch: Mapping[str, Any]) -> nn.Module:
    """Rebuild a fresh model from a ``model.camphive_arch`` dict (e.g. from a checkpoint)."""
    if "name" not in arch:
        raise ConfigError(f"architecture record needs a 'name' key, got keys {sorted(arch)}")
    arguments = dict(arch)
    return create(arguments.pop("name"), **arguments)


def _canonical(name: str) -> str:
    key = normalize_name(name)
    if key not in _LOOKUP:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(_SPECS)} "
            "(add your own with camphive.models.register)"
        )
    return _LOOKUP[key]


def _unregister(canonical: str) -> None:
    _SPECS.pop(canonical, None)
    for key in [key for key, value in _LOOKUP.items() if value == canonical]:
        del _LOOKUP[key]


def _keyword_parameters(factory: ModelFactory) -> tuple[dict[str, Any], bool]:
    """``({keyword name: default or Parameter.empty}, accepts **kwargs)``."""
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # builtins without signatures: trust the caller
        return {}, True
    keywords = {
        p.name: p.default for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    return keywords, takes_any


def _is_jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _jsonable_or_repr(value: Any) -> Any:
    if value is inspect.Parameter.empty:
        return None
    return value if _is_jsonable(value) else repr(value)
