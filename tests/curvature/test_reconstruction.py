"""Reconstruction curvature G = E[x x^T] against explicit loops and the exact reconstruction loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from camphive.curvature.eigen import top_eigenpairs
from camphive.curvature.gram import GramSums, input_gram
from camphive.curvature.reconstruction import (
    layer_input_covariances,
    layer_input_rows,
    reconstruction_loss,
    weight_rows,
)
from camphive.errors import ConfigError

from .cases import image_batches, make_cnn

LAYERS = [
    nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
    nn.Conv2d(4, 6, (3, 2), padding=(1, 0), dilation=(1, 2), groups=2, bias=False),
    nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),  # depthwise
    nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect", bias=False),
    nn.Conv1d(4, 6, 3, stride=2, padding=2, padding_mode="circular", bias=False),
    nn.Linear(7, 5, bias=False),
]


def layer_input(layer: nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(3, 2, 7, generator=generator, dtype=torch.float64)
    if isinstance(layer, nn.Conv1d):
        return torch.randn(3, 4, 9, generator=generator, dtype=torch.float64)
    return torch.randn(3, 4, 7, 6, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: repr(layer)[:40])
def test_weight_rows_times_patches_equal_the_layer_output(layer):
    generator = torch.Generator().manual_seed(0)
    layer = layer.double()
    inputs = layer_input(layer, generator)
    rows = layer_input_rows(layer, inputs)  # (groups, samples*positions, fan_in)
    weights = weight_rows(layer).detach()
    groups = rows.shape[0]
    per_group = weights.shape[0] // groups
    products = torch.cat([rows[g] @ weights[g * per_group : (g + 1) * per_group].T for g in range(groups)], dim=1)
    outputs = layer(inputs).detach()
    expected = outputs.reshape(-1, weights.shape[0]) if isinstance(layer, nn.Linear) else outputs.flatten(2).transpose(1, 2).reshape(-1, weights.shape[0])
    assert torch.allclose(products, expected, rtol=1e-12, atol=1e-12)


def explicit_patches(layer: nn.Conv2d, inputs: torch.Tensor, group: int) -> list[torch.Tensor]:
    """Every input patch of one group, by slicing the zero-padded input sample by sample."""
    per_group = layer.in_channels // layer.groups
    padded = F.pad(inputs, (layer.padding[1], layer.padding[1], layer.padding[0], layer.padding[0]))
    (kh, kw), (sh, sw) = layer.kernel_size, layer.stride
    patches = []
    for sample in padded:
        channels = sample[group * per_group : (group + 1) * per_group]
        for i in range(0, channels.shape[1] - kh + 1, sh):
            for j in range(0, channels.shape[2] - kw + 1, sw):
                patches.append(channels[:, i : i + kh, j : j + kw].reshape(-1))
    return patches


def captured_inputs(model: nn.Module, batches, names):
    """Inputs of each named layer over all batches (eval mode), concatenated over samples."""
    seen = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach())) for name in names]
    model.eval()
    with torch.no_grad():
        for inputs, _ in batches:
            model(inputs)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(values) for name, values in seen.items()}


@pytest.fixture(scope="module")
def cnn_covariances():
    model = make_cnn()
    batches = image_batches(sizes=(3, 5, 2))
    return model, batches, layer_input_covariances(model, batches)


def test_covariance_equals_an_explicit_loop(cnn_covariances):
    model, batches, covariances = cnn_covariances
    assert list(covariances) == ["conv1", "depthwise", "pointwise", "fc"]
    inputs = captured_inputs(model, batches, list(covariances))
    for name in ("conv1", "depthwise", "pointwise"):
        layer = getattr(model, name)
        covariance = covariances[name]
        assert covariance.matrix.shape == (layer.groups, covariance.fan_in, covariance.fan_in)
        for group in range(layer.groups):
            patches = torch.stack(explicit_patches(layer, inputs[name], group))
            expected = sum(torch.outer(x, x) for x in patches) / len(patches)
            assert torch.allclose(covariance.matrix[group], expected, rtol=1e-12, atol=1e-14)
            assert covariance.num_samples == len(patches)
    features = inputs["fc"]
    assert torch.allclose(covariances["fc"].matrix[0], features.T @ features / len(features), rtol=1e-12, atol=1e-14)
    assert covariances["fc"].num_samples == covariances["fc"].num_examples == 10


@pytest.mark.parametrize("name", ["conv1", "depthwise", "pointwise", "fc"])
def test_quadratic_form_equals_the_reconstruction_loss(cnn_covariances, name):
    model, batches, covariances = cnn_covariances
    layer = getattr(model, name)
    inputs = captured_inputs(model, batches, [name])[name]
    generator = torch.Generator().manual_seed(1)
    delta = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float64)
    exact = reconstruction_loss(layer, inputs, delta)
    assert covariances[name].reconstruction_error(delta) == pytest.approx(exact, rel=1e-12)
    # pruning one weight: the loss change is 1/2 w^2 G_jj, the OBD-like layer saliency
    pruned = torch.zeros_like(delta)
    pruned.view(pruned.shape[0], -1)[0, 1] = layer.weight.detach().view(pruned.shape[0], -1)[0, 1]
    assert covariances[name].reconstruction_error(pruned) == pytest.approx(reconstruction_loss(layer, inputs, pruned), rel=1e-12)


def test_product_form_matches_the_explicit_matrix(cnn_covariances):
    model, batches, covariances = cnn_covariances
    product = layer_input_covariances(model, batches, max_fan_in=0, max_rows=10_000)
    for name, covariance in product.items():
        assert not covariance.is_explicit and covariance.inputs.shape[1] == covariance.num_samples
        assert torch.allclose(covariance.dense(), covariances[name].matrix, rtol=1e-12, atol=1e-14)
        assert torch.allclose(covariance.diagonal, covariances[name].diagonal, rtol=1e-12)
    subsampled = layer_input_covariances(model, batches, max_fan_in=0, max_rows=30)["conv1"]
    assert subsampled.inputs.shape[1] == 30  # ceil(30 / 3 batches) = 10 rows kept per batch
    assert torch.allclose(subsampled.diagonal, covariances["conv1"].diagonal, rtol=1e-12)  # still exact


def test_damping_operator_and_eigenpairs(cnn_covariances):
    _, _, covariances = cnn_covariances
    depthwise = covariances["depthwise"]
    damped = depthwise.damped(0.01)
    assert torch.allclose(damped.damping, 0.01 * depthwise.matrix.diagonal(dim1=1, dim2=2).mean(dim=1))
    expected = depthwise.matrix + torch.diag_embed(damped.damping[:, None].expand(-1, depthwise.fan_in))
    assert torch.allclose(damped.dense(), expected)
    vectors = torch.randn(4, depthwise.fan_in, dtype=torch.float64)
    assert torch.allclose(damped.matvec(vectors), (expected @ vectors.unsqueeze(-1)).squeeze(-1))
    operator = damped.as_operator()
    assert torch.allclose(operator.to_dense(), torch.block_diag(*expected))
    result = top_eigenpairs(damped.as_operator(group=2), k=2, tol=1e-10)
    values = torch.linalg.eigvalsh(expected[2]).flip(0)[:2]
    assert torch.allclose(result.eigenvalues, values, rtol=1e-8)
    assert depthwise.group_of_output(3) == 3 and covariances["conv1"].group_of_output(3) == 0


def test_model_state_is_restored_and_float32_models_accumulate_in_float64():
    model = make_cnn(dtype=torch.float32)
    model.train()
    buffers = {name: tensor.clone() for name, tensor in model.named_buffers()}
    covariances = layer_input_covariances(model, image_batches(dtype=torch.float32), layers=["conv1", "fc"])
    assert list(covariances) == ["conv1", "fc"] and covariances["fc"].matrix.dtype == torch.float64
    assert all(module.training for module in model.modules())
    assert all(tensor.requires_grad and tensor.grad is None for tensor in model.parameters())
    assert all(torch.equal(tensor, buffers[name]) for name, tensor in model.named_buffers())


def test_unsupported_or_unknown_layers_raise_config_error():
    model = nn.Sequential(nn.ConvTranspose2d(3, 2, 3), nn.Flatten(), nn.Linear(98, 3)).double()
    with pytest.raises(ConfigError, match="ConvTranspose2d"):
        layer_input_covariances(model, image_batches())
    with pytest.raises(ConfigError, match="not a module"):
        layer_input_covariances(model, image_batches(), layers=["missing"])
    assert list(layer_input_covariances(model, image_batches(), ignored_layers=["0"])) == ["2"]


# Fast sums of x x^T (camphive.curvature.gram): every path against the im2col rows in float64.
GRAM_LAYERS = LAYERS + [
    nn.Conv2d(4, 5, 3, padding=2, dilation=2, bias=False),  # dilated, stride 1: shifted windows
    nn.Conv2d(4, 5, (2, 4), padding="same", bias=False),  # even kernel: uneven zero padding
    nn.Conv2d(4, 5, 5, padding=1, bias=False),  # windows overlap little on a 7x6 input
    nn.Conv2d(4, 5, 3, padding=1, padding_mode="replicate", bias=False),  # nonzero border lines
    nn.Conv2d(4, 5, 1, bias=False),
    nn.Conv1d(4, 6, 3, padding=1, bias=False),
]


def reference_gram(layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    rows = layer_input_rows(layer, inputs.double())
    return rows.transpose(1, 2) @ rows


@pytest.mark.parametrize("layer", GRAM_LAYERS, ids=lambda layer: repr(layer)[:60])
def test_input_gram_equals_the_patches_gram_in_float64(layer):
    inputs = layer_input(layer.double(), torch.Generator().manual_seed(2))
    gram, rows = input_gram(layer, inputs)
    expected = reference_gram(layer, inputs)
    assert rows == layer_input_rows(layer, inputs).shape[1]
    assert gram.dtype == torch.float64 and torch.allclose(gram, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", GRAM_LAYERS, ids=lambda layer: repr(layer)[:60])
def test_float32_products_stay_within_1e_5_of_float64(layer):
    """Products in float32, sums in float64: |error| <= 1e-5 sqrt(S_ii S_jj), S over the whole input."""
    generator = torch.Generator().manual_seed(3)
    shape = {nn.Linear: (64, 7), nn.Conv1d: (16, 4, 300)}.get(type(layer), (16, 4, 40, 36))
    inputs = torch.relu(torch.randn(*shape, generator=generator)) * torch.rand(shape[1], *[1] * (len(shape) - 2))
    gram, _ = input_gram(layer.float(), inputs)
    expected = reference_gram(layer, inputs)
    channels = inputs.shape[-1] if isinstance(layer, nn.Linear) else inputs.shape[1]
    whole = (inputs.double() ** 2).movedim(-1 if isinstance(layer, nn.Linear) else 1, 0).reshape(channels, -1).sum(1)
    groups, fan_in = expected.shape[0], expected.shape[-1]
    scale = whole.reshape(groups, -1).repeat_interleave(fan_in * groups // channels, dim=1)  # (groups, fan_in)
    bound = 1e-5 * (scale[:, :, None] * scale[:, None, :]).sqrt()
    assert gram.dtype == torch.float64 and bool(((gram - expected).abs() <= bound).all())


def test_sums_over_batches_of_different_sizes_and_exact_nonnegative_diagonal():
    layer = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(2, 3, 9, 8, generator=generator), torch.randn(3, 3, 6, 7, generator=generator)]
    batches[0][:, 1, :-1] = 0  # channel 1 lives on the last row only: the top taps never see it (sums cancel)
    sums = GramSums(layer)
    for inputs in batches:
        sums.add(inputs)
    expected = sum(reference_gram(layer, inputs) for inputs in batches)
    assert sums.rows == 2 * 9 * 8 + 3 * 6 * 7
    assert torch.allclose(sums.total(), expected, rtol=1e-6, atol=1e-5)
    diagonal = sums.total().diagonal(dim1=1, dim2=2)
    assert bool((diagonal >= 0).all()) and torch.allclose(diagonal, expected.diagonal(dim1=1, dim2=2), rtol=1e-6)
    single = GramSums(layer)
    single.add(batches[0])
    dead = reference_gram(layer, batches[0]).diagonal(dim1=1, dim2=2)[0] == 0  # (channel 1, top taps)
    assert int(dead.sum()) == 3 and bool((single.total()[:, dead] == 0).all())
    assert bool((single.total()[:, :, dead] == 0).all())
