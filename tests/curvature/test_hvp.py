"""HessianOperator against dense Hessians from torch.autograd.functional.hessian."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from camphive.curvature.hvp import HessianOperator
from camphive.errors import ConfigError, NumericalError

from .cases import (
    dense_gradient,
    dense_hessian,
    image_batches,
    make_cnn,
    make_mlp,
    relative_error,
    vector_batches,
    weight_names,
)

SETTINGS = [("double_backward", True), ("double_backward", False), ("forward_over_reverse", False)]


@pytest.fixture(scope="module")
def cnn_case():
    model = make_cnn()
    batches = image_batches()
    names = weight_names(model)
    return model, batches, names, dense_hessian(model, batches, names)


@pytest.fixture(scope="module")
def mlp_case():
    model = make_mlp()
    batches = vector_batches()
    names = weight_names(model)
    return model, batches, names, dense_hessian(model, batches, names)


@pytest.mark.parametrize("method,cache", SETTINGS)
@pytest.mark.parametrize("case", ["mlp_case", "cnn_case"])
def test_matvec_equals_dense_hessian(case, method, cache, request):
    model, batches, names, hessian = request.getfixturevalue(case)
    operator = HessianOperator(model, batches, method=method, cache_graph=cache)
    assert operator.params == names and operator.dim == hessian.shape[0]
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):  # the second product runs on the cached graph
        vector = torch.randn(operator.dim, generator=generator, dtype=torch.float64)
        assert relative_error(operator.matvec(vector), hessian @ vector) <= 1e-8
    assert operator.num_matvecs == 2
    assert (operator.cached_bytes > 0) == cache


@pytest.mark.parametrize("method,cache", SETTINGS)
def test_matmat_and_to_dense_equal_dense_hessian(cnn_case, method, cache):
    model, batches, _, hessian = cnn_case
    operator = HessianOperator(model, batches, method=method, cache_graph=cache)
    block = torch.randn(operator.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    assert relative_error(operator.matmat(block), hessian @ block) <= 1e-8
    assert operator.num_matvecs == 3
    assert relative_error(operator.to_dense(), hessian) <= 1e-8


def test_products_are_symmetric(cnn_case):
    model, batches, _, _ = cnn_case
    operator = HessianOperator(model, batches)
    generator = torch.Generator().manual_seed(5)
    u, v = (torch.randn(operator.dim, generator=generator, dtype=torch.float64) for _ in range(2))
    assert torch.dot(u, operator.matvec(v)).item() == pytest.approx(torch.dot(v, operator.matvec(u)).item(), rel=1e-10)


@pytest.mark.parametrize("method,cache", SETTINGS)
def test_layer_blocks_equal_dense_block_diagonal(cnn_case, method, cache):
    model, batches, names, hessian = cnn_case
    operator = HessianOperator(model, batches, block="layer", method=method, cache_graph=cache)
    block_diagonal = torch.zeros_like(hessian)
    start = 0
    for tensor in (dict(model.named_parameters())[name] for name in names):
        stop = start + tensor.numel()
        block_diagonal[start:stop, start:stop] = hessian[start:stop, start:stop]
        start = stop
    vector = torch.randn(operator.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    assert relative_error(operator.matvec(vector), block_diagonal @ vector) <= 1e-8
    full = HessianOperator(model, batches, method=method, cache_graph=cache)
    assert relative_error(full.as_block_diagonal().matvec(vector), block_diagonal @ vector) <= 1e-8


def test_block_operators_and_restriction_equal_dense_sub_blocks(cnn_case):
    model, batches, names, hessian = cnn_case
    operator = HessianOperator(model, batches)
    sizes = [dict(model.named_parameters())[name].numel() for name in names]
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    blocks = operator.block_operators()
    assert list(blocks) == names
    for index, block in enumerate(blocks.values()):
        assert block.dim == sizes[index]
        expected = hessian[starts[index] : starts[index + 1], starts[index] : starts[index + 1]]
        assert relative_error(block.to_dense(), expected) <= 1e-8
    pair = operator.restricted_to([names[1], names[3]])
    rows = list(range(starts[1], starts[2])) + list(range(starts[3], starts[4]))
    assert relative_error(pair.to_dense(), hessian[rows][:, rows]) <= 1e-8


def test_restriction_without_cache_builds_its_own_graph(cnn_case):
    model, batches, names, hessian = cnn_case
    block = HessianOperator(model, batches, cache_graph=False).restricted_to([names[2]])
    size = dict(model.named_parameters())[names[2]].numel()
    start = sum(dict(model.named_parameters())[name].numel() for name in names[:2])
    assert relative_error(block.to_dense(), hessian[start : start + size, start : start + size]) <= 1e-8


def test_gradient_and_scipy_operator(cnn_case):
    model, batches, names, hessian = cnn_case
    operator = HessianOperator(model, batches)
    assert relative_error(operator.gradient(), dense_gradient(model, batches, names)) <= 1e-10
    linear = operator.as_linear_operator()
    vector = torch.randn(operator.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert relative_error(torch.from_numpy(linear.matvec(vector.numpy())), hessian @ vector) <= 1e-8


def test_params_by_name_and_by_dict(cnn_case):
    model, batches, names, hessian = cnn_case
    named = dict(model.named_parameters())
    by_name = HessianOperator(model, batches, params=[names[0]])
    by_dict = HessianOperator(model, batches, params={names[0]: named[names[0]]})
    size = named[names[0]].numel()
    for operator in (by_name, by_dict):
        assert relative_error(operator.to_dense(), hessian[:size, :size]) <= 1e-8
    bias = HessianOperator(model, batches, params=["pointwise.bias", "bn1.weight"])
    assert bias.dim == 8 and bias.params == ["pointwise.bias", "bn1.weight"]
    with pytest.raises(ConfigError, match="not in the model"):
        HessianOperator(model, batches, params=["nope.weight"])
    with pytest.raises(ConfigError, match="not the model parameter"):
        HessianOperator(model, batches, params={names[0]: torch.nn.Parameter(named[names[0]].clone())})


def test_model_state_is_restored():
    model = make_cnn()
    model.train()
    model.bn2.eval()
    model.bn1.weight.requires_grad_(False)
    buffers = {name: tensor.clone() for name, tensor in model.named_buffers()}
    weights = {name: tensor.detach().clone() for name, tensor in model.named_parameters()}
    training = {name: module.training for name, module in model.named_modules()}
    requires = {name: tensor.requires_grad for name, tensor in model.named_parameters()}
    for method, cache in SETTINGS:
        operator = HessianOperator(model, image_batches(), method=method, cache_graph=cache, block="layer")
        operator.matvec(torch.ones(operator.dim, dtype=torch.float64))
        operator.gradient()
    assert {name: module.training for name, module in model.named_modules()} == training
    assert {name: tensor.requires_grad for name, tensor in model.named_parameters()} == requires
    assert all(tensor.grad is None for tensor in model.parameters())
    for name, tensor in model.named_buffers():
        assert torch.equal(tensor, buffers[name]), name
    for name, tensor in model.named_parameters():
        assert torch.equal(tensor.detach(), weights[name]), name


def test_dropout_and_batchnorm_are_in_eval_mode_during_products(mlp_case):
    model, batches, names, hessian = mlp_case
    model.train()  # dropout on in training mode: products must still equal the eval-mode Hessian
    operator = HessianOperator(model, batches)
    vector = torch.randn(operator.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    assert relative_error(operator.matvec(vector), hessian @ vector) <= 1e-8
    assert model.training


def test_cached_graph_is_rebuilt_after_the_model_changes():
    model = make_cnn()
    batches = image_batches()
    names = weight_names(model)
    operator = HessianOperator(model, batches, cache_graph=True)
    vector = torch.randn(operator.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    operator.matvec(vector)
    model.conv1.weight.data[0] = 0.0  # an edit that bypasses autograd's version counters
    assert relative_error(operator.matvec(vector), dense_hessian(model, batches, names) @ vector) <= 1e-8


def test_auto_cache_respects_the_memory_budget(cnn_case):
    model, batches, _, hessian = cnn_case
    none_fit = HessianOperator(model, batches, cache_graph="auto", memory_budget=0)
    all_fit = HessianOperator(model, batches, cache_graph="auto")
    vector = torch.ones(none_fit.dim, dtype=torch.float64)
    for operator in (none_fit, all_fit):
        assert relative_error(operator.matvec(vector), hessian @ vector) <= 1e-8
    assert none_fit.cached_bytes == 0 and all_fit._engine.cached_batches == len(batches)
    all_fit.clear_cache()
    assert all_fit.cached_bytes == 0


def test_graph_size_estimate_equals_the_saved_tensor_count(cnn_case):
    from camphive.curvature.pearlmutter import _SavedBytesMeter
    from camphive.curvature.state import curvature_mode

    model, batches, _, _ = cnn_case
    operator = HessianOperator(model, batches, cache_graph=True)
    operator.matvec(torch.ones(operator.dim, dtype=torch.float64))
    engine = operator._engine
    with curvature_mode(model, engine.params):
        for index, (inputs, targets) in enumerate(batches):
            with _SavedBytesMeter(model, inputs) as meter:
                torch.autograd.grad(F.cross_entropy(model(inputs), targets), engine.params, create_graph=True)
            assert engine._graph_bytes[index] == meter.bytes > 0


def test_data_loader_and_custom_loss_and_float32():
    torch.manual_seed(0)
    inputs, targets = torch.randn(10, 5), torch.randint(0, 3, (10,))
    model32 = make_mlp(dtype=torch.float32)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=4)
    operator32 = HessianOperator(model32, loader, loss_fn=lambda out, y: F.cross_entropy(out, y))
    model64 = make_mlp(dtype=torch.float64)
    batches64 = [(inputs[i : i + 4].double(), targets[i : i + 4]) for i in range(0, 10, 4)]
    hessian = dense_hessian(model64, batches64, weight_names(model64))
    assert operator32.dtype == torch.float32
    assert relative_error(operator32.to_dense().double(), hessian) <= 1e-5


def test_non_finite_weight_or_vector_raises_numerical_error():
    model = make_cnn()
    operator = HessianOperator(model, image_batches())
    bad = torch.ones(operator.dim, dtype=torch.float64)
    bad[-1] = float("nan")  # the last entry belongs to fc.weight
    with pytest.raises(NumericalError, match="parameter .conv1.weight. on calibration batch 0"):
        operator.matvec(bad)
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match="batch 0"):
        HessianOperator(model, image_batches()).matvec(torch.ones(operator.dim, dtype=torch.float64))


def test_invalid_options_and_shapes(cnn_case):
    model, batches, _, _ = cnn_case
    with pytest.raises(ConfigError):
        HessianOperator(model, batches, method="finite_differences")
    with pytest.raises(ConfigError):
        HessianOperator(model, batches, block="row")
    with pytest.raises(ConfigError):
        HessianOperator(model, batches, method="forward_over_reverse", cache_graph=True)
    operator = HessianOperator(model, batches)
    with pytest.raises(ConfigError, match="shape"):
        operator.matvec(torch.ones(operator.dim + 1, dtype=torch.float64))
