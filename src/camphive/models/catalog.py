"""Registers the built-in architectures (imported once by ``camphive.models``)."""
from __future__ import annotations

from functools import partial

from camphive.models.mobilenetv2 import mobilenetv2_cifar, mobilenetv2_imagenet
from camphive.models.registry import register
from camphive.models.resnet_cifar import CIFAR_DEPTHS, cifar_resnet, resnet18_cifar
from camphive.models.resnet_imagenet import IMAGENET_LAYOUTS, imagenet_resnet
from camphive.models.small import small_cnn


def register_builtin_models() -> None:
    register(
        "small-cnn", small_cnn, aliases=("small",), default_input=(1, 28, 28),
        description="3 conv-BN-ReLU-pool stages + 2 linear layers, 0.39M params (Fashion-MNIST)",
    )
    for depth in CIFAR_DEPTHS:
        register(
            f"resnet{depth}", partial(cifar_resnet, depth), default_input=(3, 32, 32),
            description=f"CIFAR ResNet-{depth} (He et al. 2016), 16/32/64 channels, "
            "projection shortcuts",
        )
    register(
        "resnet18", resnet18_cifar, aliases=("resnet18-cifar",), default_input=(3, 32, 32),
        description="ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 images",
    )
    for depth, (block, _) in IMAGENET_LAYOUTS.items():
        register(
            f"resnet{depth}-imagenet", partial(imagenet_resnet, depth),
            default_input=(3, 224, 224),
            description=f"ImageNet ResNet-{depth} (7x7 stride-2 stem + max-pool, {block.__name__} blocks; "
            "torchvision's layer names and shapes)",
        )
    register(
        "mobilenetv2", mobilenetv2_cifar, aliases=("mobilenetv2-cifar",),
        default_input=(3, 32, 32),
        description="MobileNetV2 with stride-1 stem and 24-channel stage, for 32x32 images",
    )
    register(
        "mobilenetv2-imagenet", mobilenetv2_imagenet, default_input=(3, 224, 224),
        description="MobileNetV2 with the paper's ImageNet strides",
    )
