"""Model architectures by name, and loading of structurally pruned weights.

>>> from camphive import models
>>> net = models.create("resnet56", num_classes=100)
>>> net.camphive_arch["name"]
'resnet56'

Any ``nn.Module`` works with the rest of camphive; ``register`` only makes a custom
architecture reachable by name (for the CLI and for checkpoints that record
``model.camphive_arch``).
"""
from camphive.models.catalog import register_builtin_models
from camphive.models.rebuild import rebuild_to_state_dict_shapes
from camphive.models.registry import (
    MODELS,
    ModelSpec,
    create,
    describe,
    from_arch,
    normalize_name,
    register,
)

register_builtin_models()

__all__ = [
    "MODELS",
    "ModelSpec",
    "create",
    "describe",
    "from_arch",
    "normalize_name",
    "rebuild_to_state_dict_shapes",
    "register",
]
