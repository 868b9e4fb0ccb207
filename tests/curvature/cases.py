"""Tiny models, data and exact references shared by the curvature tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from camphive.curvature.flat import flatten_tensors, split_flat


class TinyMLP(nn.Module):
    def __init__(self, inputs: int = 5, hidden: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, hidden)
        self.fc2 = nn.Linear(hidden, classes)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


class TinyResidualCNN(nn.Module):
    """Conv + BN, a depthwise conv in a residual branch, a 1x1 conv and a linear head."""

    def __init__(self, channels: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        branch = self.pointwise(F.softplus(self.bn2(self.depthwise(h))))
        h = h + branch
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def make_cnn(dtype=torch.float64, seed: int = 0) -> TinyResidualCNN:
    torch.manual_seed(seed)
    model = TinyResidualCNN().to(dtype)
    with torch.no_grad():  # non-trivial running statistics, so eval-mode BN is not the identity
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return model


def make_mlp(dtype=torch.float64, seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP().to(dtype)


def image_batches(sizes=(3, 5, 2), dtype=torch.float64, seed: int = 1, classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, 5, 5, generator=generator, dtype=dtype), torch.randint(0, classes, (n,), generator=generator))
        for n in sizes
    ]


def vector_batches(sizes=(4, 7, 1), dtype=torch.float64, seed: int = 1, classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 5, generator=generator, dtype=dtype), torch.randint(0, classes, (n,), generator=generator))
        for n in sizes
    ]


def weight_names(model: nn.Module) -> list[str]:
    return [name for name, tensor in model.named_parameters() if name.endswith("weight") and tensor.ndim > 1]


def mean_loss_of(model: nn.Module, batches, names: list[str]):
    """The mean cross-entropy over all samples as a function of the flat chosen parameters."""
    named = dict(model.named_parameters())
    shapes = [named[name].shape for name in names]
    total = sum(inputs.shape[0] for inputs, _ in batches)

    def loss(flat: torch.Tensor) -> torch.Tensor:
        replaced = dict(zip(names, split_flat(flat, shapes)))
        summed = sum(
            F.cross_entropy(functional_call(model, replaced, (inputs,)), targets, reduction="sum")
            for inputs, targets in batches
        )
        return summed / total

    return loss, flatten_tensors([named[name].detach() for name in names])


def dense_hessian(model: nn.Module, batches, names: list[str]) -> torch.Tensor:
    """Reference Hessian of the mean loss (eval mode) from ``torch.autograd.functional.hessian``."""
    was_training = model.training
    model.eval()
    try:
        loss, flat = mean_loss_of(model, batches, names)
        return torch.autograd.functional.hessian(loss, flat)
    finally:
        model.train(was_training)


def dense_gradient(model: nn.Module, batches, names: list[str]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        loss, flat = mean_loss_of(model, batches, names)
        flat = flat.clone().requires_grad_(True)
        return torch.autograd.grad(loss(flat), flat)[0]
    finally:
        model.train(was_training)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())
