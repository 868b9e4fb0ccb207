"""Typed pruning settings: frozen dataclasses that check themselves once, on construction.

:class:`PruneSettings` holds what both modes take; :class:`~camphive.pruning.unstructured.settings.
UnstructuredSettings` and :class:`~camphive.pruning.structured.settings.StructuredSettings` add
their own. ``None`` in an option means "the measured default for this criterion", resolved here,
so a settings object always says exactly what a run does (``to_dict()`` is the run's config).
Every rule about a valid value lives in the settings class that owns the option: a newcomer
finds where an option is checked and used by following its name. A field's ``metadata`` is its
``camphive prune`` option's help and --help panel: the command line is generated from the fields
(:mod:`camphive.cli.settings_options` says which metadata keys it reads).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from camphive.errors import ConfigError
from camphive.layers import layer_list


@dataclass(frozen=True)
class PruneSettings:
    """What every pruning run takes, whatever its mode.

    ``criterion``: a name ("camp-hive", "magnitude", ...) or a
    :class:`~camphive.pruning.criteria.Criterion` instance of your own. ``cycles``: pruning
    rounds, curvature re-estimated in each. ``merge``/``pairing``: how removed weights or
    channels are folded into kept ones. ``damping``: relative to the mean curvature diagonal.
    ``recalibrate_bn``: re-estimate BatchNorm statistics on the calibration batches after each
    cycle. ``score``, ``curvature``, ``loss_weighting``, ``first_order_weight``: CAMP-HiVe's
    weight scores. ``num_batches`` limits the calibration batches read; ``seed`` fixes every
    random choice. ``refit``: after the last cycle, refit every conv and linear layer's kept weights (and
    bias; unstructured: masks fixed) to the unpruned model's output of that layer (structured: of the
    output channels it kept), layer after layer in the order the model runs them, any criterion
    (:mod:`~camphive.pruning.unstructured.refit`; on by default for camp-hive, off for the other criteria, which
    keep their published form: it costs one forward pass of the pruned and the unpruned model plus each layer's
    statistics, or about L/2 passes of each for L layers where the models do not trace with torch.fx).
    """

    criterion: object = dataclasses.field(default="camp-hive", metadata={
        "help": "camp-hive, magnitude, random, taylor, obd, hutchinson, wanda; unstructured also sparsegpt, obc; "
                "structured also tp-magnitude, tp-taylor, tp-hessian", "panel": "Pruning"})
    cycles: int | None = dataclasses.field(default=None, metadata={
        "help": "Pruning rounds, curvature re-estimated in each",
        "default": "1; camp-hive unstructured without the refit: 3",
        "min": 1, "panel": "Pruning"})
    merge: str | None = dataclasses.field(default=None, metadata={
        "help": "Unstructured: curvature, half, none or least_squares; structured: least_squares, pair or none",
        "default": "least_squares for camp-hive, none for baselines", "panel": "CAMP-HiVe"})
    pairing: str | None = dataclasses.field(default=None, metadata={
        "help": "cyclic or coupled", "default": "coupled", "panel": "CAMP-HiVe"})
    damping: float = dataclasses.field(default=0.01, metadata={
        "help": "Curvature damping, a fraction of the mean diagonal", "panel": "CAMP-HiVe"})
    recalibrate_bn: bool | None = dataclasses.field(default=None, metadata={
        "help": "Re-estimate BatchNorm statistics on the calibration images after each cycle", "default": True,
        "off_help": "Keep the BatchNorm statistics", "panel": "Pruning"})
    ignored_layers: object = dataclasses.field(default=None, metadata={
        "help": "Comma-separated module names to leave unpruned", "default": "", "items": str, "panel": "Pruning"})
    refit: bool | None = dataclasses.field(default=None, metadata={
        "help": "After the last cycle, refit each layer's kept weights (and bias) to the unpruned model's outputs, "
                "layer after layer: one more forward pass of both models and each layer's statistics "
                "(about L/2 passes of each for L layers where the models do not trace with torch.fx)",
        "default": "on for camp-hive, off for the other criteria", "off_help": "No refit", "panel": "Pruning"})
    num_batches: int | None = None
    seed: int = 0
    score: str | None = dataclasses.field(default=None, metadata={
        "help": "Weight score: diagonal, obs, diag_lowrank or hv_product", "default": "diagonal", "panel": "CAMP-HiVe"})
    curvature: str | None = dataclasses.field(default=None, metadata={
        "help": "reconstruction (layer Gram) or loss (Hessian eigenpairs)", "default": "reconstruction",
        "panel": "CAMP-HiVe"})
    loss_weighting: str | None = dataclasses.field(default=None, metadata={
        "help": "none, unit, layer or batchnorm", "default": "batchnorm for reconstruction diagonal/obs scores, else none",
        "panel": "CAMP-HiVe"})
    first_order_weight: float = dataclasses.field(default=0.0, metadata={
        "help": "Adds this multiple of |gradient x weight| (first-order Taylor) to the weight scores",
        "panel": "CAMP-HiVe"})

    mode = "any"

    def __post_init__(self) -> None:
        check_types(self)
        if self.cycles is not None and self.cycles < 1:
            raise ConfigError(f"cycles must be >= 1 (or None for the default), got {self.cycles}")
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise ConfigError(f"damping must be a finite number >= 0 (a fraction of the mean diagonal), got {self.damping}")
        if self.num_batches is not None and self.num_batches < 1:
            raise ConfigError(f"num_batches must be >= 1, got {self.num_batches}")
        if self.recalibrate_bn is None:
            self._set("recalibrate_bn", True)  # measured best for every criterion
        if self.ignored_layers is not None:  # one name given on its own is one layer, not its letters
            self._set("ignored_layers", tuple(layer_list(self.ignored_layers)))

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        """The resolved settings as plain values (a criterion object appears by its name)."""
        result = {}
        for name in self.option_names():
            value = getattr(self, name)
            if name == "criterion" and not isinstance(value, str):
                value = getattr(value, "name", type(value).__name__)
            elif name == "ignored_layers" and value is not None:
                value = [item if isinstance(item, str) else type(item).__name__ for item in value]
            result[name] = value
        return {"mode": self.mode, **result}


def check_choice(option: str, value, choices, where: str = "") -> None:
    """One line naming the option, the value and the choices."""
    if value not in choices:
        raise ConfigError(f"unknown {option} {value!r}{where}; use one of {', '.join(choices)}")


_SIMPLE_TYPES = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,), "str": (str,),
                 "dict": (dict,)}
_EXAMPLES = {"int": 2, "float": 0.01, "bool": "true", "str": "name", "dict": "{key: value}"}


def check_types(settings) -> None:
    """A value of a type the field's annotation (``int | None``, ``float | int``, ...) does not name."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        kinds = [part.strip() for part in str(field.type).split("|") if part.strip() != "None"]
        if value is None or not kinds or any(kind not in _SIMPLE_TYPES for kind in kinds):
            continue  # None means "default"; other annotations (objects, tuples) are checked by their owner
        allowed = tuple(kind for annotation in kinds for kind in _SIMPLE_TYPES[annotation])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ConfigError(f"option {field.name}={value!r} must be {' or '.join(kinds)}, e.g. "
                              f"{field.name}={_EXAMPLES[kinds[0]]}")
