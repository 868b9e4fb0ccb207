"""Empirical Fisher diagonal against per-sample gradients taken one sample at a time."""
import pytest
import torch
import torch.nn.functional as F

from camphive.curvature.fisher import empirical_fisher_diagonal
from tests.curvature.cases import TinyResidualCNN


def _batches(seed: int = 0, sizes=(5, 3)):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 6, 6, generator=generator), torch.randint(0, 3, (size,), generator=generator))
            for size in sizes]


def _reference(model, batches, names):
    """Mean over samples of squared per-sample gradients, by plain autograd, BN in eval mode."""
    model.eval()
    params = dict(model.named_parameters())
    totals = {name: torch.zeros_like(params[name], dtype=torch.float64) for name in names}
    count = 0
    for inputs, targets in batches:
        for sample, target in zip(inputs, targets):
            loss = F.cross_entropy(model(sample[None].to(params[names[0]].dtype)), target[None])
            gradients = torch.autograd.grad(loss, [params[name] for name in names])
            for name, gradient in zip(names, gradients):
                totals[name] += gradient.double() ** 2
            count += 1
    return {name: total / count for name, total in totals.items()}


@pytest.mark.parametrize("chunk_size", [1, 2, 32])
def test_fisher_diagonal_is_the_mean_of_squared_sample_gradients(chunk_size):
    torch.manual_seed(0)
    model = TinyResidualCNN().double()
    model.bn1.running_mean.uniform_(-0.5, 0.5)  # BN statistics that are not the defaults, used in eval mode
    model.bn1.running_var.uniform_(0.5, 2.0)
    model.train()
    batches = _batches()
    names = ["conv1.weight", "depthwise.weight", "fc.weight", "fc.bias"]
    params = {name: parameter for name, parameter in model.named_parameters() if name in names}
    fisher = empirical_fisher_diagonal(model, batches, params, chunk_size=chunk_size)  # float32 data, float64 model
    assert model.training  # the model's mode is restored
    expected = _reference(model, batches, names)
    for name in names:
        assert fisher[name].dtype == torch.float64 and fisher[name].shape == params[name].shape
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-10, atol=1e-12)
