"""Slow, explicit references for the layer-wise OBS solvers' tests (float64, explicit solves)."""
import torch


def layer_problem(out_units: int, fan_in: int, seed: int = 0, samples: int = 200):
    """A weight ``(out_units, fan_in)`` and a correlated ``G = E[x x^T]`` (correlation makes updates matter)."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.eye(fan_in, dtype=torch.float64) + 0.5 * torch.randn(fan_in, fan_in, generator=generator,
                                                                         dtype=torch.float64) / fan_in**0.5
    inputs = torch.randn(samples, fan_in, generator=generator, dtype=torch.float64) @ mixing
    weight = torch.randn(out_units, fan_in, generator=generator, dtype=torch.float64)
    return weight, inputs.T @ inputs / samples


def damped(gram: torch.Tensor, damping: float = 0.01) -> torch.Tensor:
    return gram + damping * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)


def closed_form_obs(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Per row: ``w_S + H_SS^-1 H_SP w_P`` on the kept set S, zero on the pruned set P."""
    result = torch.zeros_like(weight)
    for row in range(weight.shape[0]):
        kept_cols, pruned_cols = kept[row].nonzero().flatten(), (~kept[row]).nonzero().flatten()
        if kept_cols.numel() == 0:
            continue
        coupling = hessian[kept_cols][:, pruned_cols] @ weight[row, pruned_cols]
        result[row, kept_cols] = weight[row, kept_cols] + torch.linalg.solve(hessian[kept_cols][:, kept_cols], coupling)
    return result


def reconstruction_errors(new_weight: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``(out_units,)``: ``(w' - w)^T H (w' - w)`` per row."""
    change = new_weight - weight
    return ((change @ hessian) * change).sum(1)
