"""The spectrum report against dense eigenvalues of the tiny network's Hessian."""
from __future__ import annotations

import json

import pytest
import torch

from camphive.curvature import plot_convergence, spectrum
from camphive.curvature.spectrum import check_spectrum_request
from camphive.errors import ConfigError

from .cases import dense_hessian, image_batches, make_cnn, weight_names


def test_spectrum_matches_dense_global_and_block_eigenvalues(tmp_path):
    model = make_cnn()
    batches = image_batches()
    names = weight_names(model)
    hessian = dense_hessian(model, batches, names)
    result = spectrum(model, batches, top_k=3, layer_top_k=2, trace_probes=8, tol=1e-9, max_iter=150)
    values = torch.linalg.eigvalsh(hessian)
    expected = values[values.abs().argsort(descending=True)][:3]
    assert torch.allclose(result.global_eigen.eigenvalues, expected, rtol=1e-6)
    start = 0
    for name in names:
        size = dict(model.named_parameters())[name].numel()
        block = torch.linalg.eigvalsh(hessian[start : start + size, start : start + size])
        block = block[block.abs().argsort(descending=True)][: min(2, size)]
        assert torch.allclose(result.layers[name].eigenvalues, block, rtol=1e-6), name
        start += size
    assert result.trace.num_probes == 8
    used = result.global_eigen.num_matvecs + sum(r.num_matvecs for r in result.layers.values()) + 8
    assert result.num_matvecs == used
    summary = json.loads(json.dumps(result.to_dict()))
    assert summary["dim"] == hessian.shape[0] and set(summary["layers"]) == set(names)
    plot_convergence(result, tmp_path / "convergence.png")
    assert (tmp_path / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spectrum_without_layers_or_trace():
    result = spectrum(make_cnn(), image_batches(), top_k=1, per_layer=False, trace_probes=0)
    assert result.layers == {} and result.trace is None
    assert result.num_matvecs == result.global_eigen.num_matvecs


def test_trace_estimate_is_close_to_the_dense_trace():
    model = make_cnn()
    batches = image_batches()
    trace = float(dense_hessian(model, batches, weight_names(model)).trace())
    estimate = spectrum(model, batches, top_k=1, per_layer=False, trace_probes=64).trace
    assert abs(estimate.trace - trace) < 4 * estimate.standard_error
    assert estimate.trace == pytest.approx(trace, rel=0.5)


def test_counts_the_solver_cannot_deliver_are_one_line_config_errors_before_any_product():
    model = make_cnn()
    sizes = {name: dict(model.named_parameters())[name].numel() for name in weight_names(model)}
    dim = sum(sizes.values())
    # No data at all: the request is judged from the model's parameters alone.
    with pytest.raises(ConfigError, match=rf"top_k={dim + 1} eigenvalues asked of a Hessian of dimension {dim}.*top_k <= {dim}"):
        check_spectrum_request(model, top_k=dim + 1)
    with pytest.raises(ConfigError, match=r"max_iter=2 products cannot give top_k=3 .*pass max_iter >= 3") as error:
        check_spectrum_request(model, top_k=3, max_iter=2)
    assert "\n" not in str(error.value)
    smallest = min(sizes.values())
    with pytest.raises(ConfigError, match=rf"cannot give layer_top_k={smallest + 1} .*smaller layer_top_k"):
        check_spectrum_request(model, top_k=1, max_iter=smallest, layer_top_k=smallest + 1)
    check_spectrum_request(model, top_k=1, max_iter=smallest, layer_top_k=smallest + 1, per_layer=False)
    check_spectrum_request(model, top_k=3, max_iter=2, method="power")  # max_iter counts per eigenpair there
    # spectrum() itself refuses the same, with the data given.
    with pytest.raises(ConfigError, match=rf"dimension {dim}"):
        spectrum(model, image_batches(), top_k=dim + 1, trace_probes=0)
    with pytest.raises(ConfigError, match=r"pass max_iter >= 3"):
        spectrum(model, image_batches(), top_k=3, max_iter=2, trace_probes=0)


def test_an_unconverged_spectrum_keeps_finite_estimates_warns_and_is_strict_json():
    result = spectrum(make_cnn(), image_batches(), top_k=3, max_iter=3, tol=1e-12, trace_probes=1)
    assert len(result.global_eigen.eigenvalues) == 3 and torch.isfinite(result.global_eigen.eigenvalues).all()
    assert result.warnings[0].startswith("global: Lanczos stopped after max_iter=3")
    assert any(line.startswith("layer ") for line in result.warnings)
    summary = json.loads(json.dumps(result.to_dict(), allow_nan=False))  # raises on NaN
    assert summary["trace"]["standard_error"] is None  # one probe: no spread to estimate
    assert summary["warnings"] == result.warnings
    converged = spectrum(make_cnn(), image_batches(), top_k=1, per_layer=False, trace_probes=0, tol=1e-6, max_iter=150)
    assert converged.warnings == [] and converged.to_dict()["warnings"] == []
