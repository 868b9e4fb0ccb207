"""Tiny shared cases for the pruning tests."""
import torch
from torch import nn


def explicit_least_squares(weights, matrices, pruned, kept) -> torch.Tensor:
    """The least-squares merge by one explicit solve per unit: ``W_S += H_SS^-1 H_SP w_P``, then ``W_P = 0``."""
    expected = weights.clone()
    for r in range(weights.shape[0]):
        S, P = kept[r].nonzero().flatten(), pruned[r].nonzero().flatten()
        if len(S) and len(P):
            expected[r, S] += torch.linalg.solve(matrices[r][S][:, S], matrices[r][S][:, P] @ weights[r, P])
        expected[r, P] = 0
    return expected


def gaussian_covariance(dim: int, seed: int = 0, samples: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, dim, generator=generator, dtype=torch.float64)
    inputs[:, 1] += 0.8 * inputs[:, 0]  # correlated inputs make merges matter
    return inputs.T @ inputs / samples


def tiny_cnn(classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, classes),
    )


def image_batches(classes: int = 3, batches: int = 3, size: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, size, size, generator=generator), torch.randint(0, classes, (16,), generator=generator))
            for _ in range(batches)]
