"""The spectrum report: top eigenvalues of the loss Hessian, globally and per layer, and its trace.

This is what ``camphive spectrum`` calls. Per-layer eigenvalues are those of the diagonal
blocks ``H_ii`` (one block per parameter tensor), computed with the same cached graphs as
the global ones; the trace is Hutchinson's estimate with Rademacher probes.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field

from torch import nn

from camphive.curvature.eigen import DEFAULT_EIGEN_METHOD, EigenResult, min_max_iter, top_eigenpairs
from camphive.curvature.hutchinson import TraceEstimate, hutchinson_trace
from camphive.curvature.hvp import DEFAULT_HVP_METHOD, HessianOperator, _select_parameters
from camphive.errors import ConfigError
from camphive.runs import atomic_write_bytes, strict_json_data


@dataclass
class SpectrumResult:
    """``global_eigen``: top eigenpairs of the whole Hessian; ``layers``: ``{parameter name:
    top eigenpairs of its diagonal block}``; ``trace``: Hutchinson's estimate (or None).
    ``num_matvecs``: Hessian-vector products in all (a block product counts as one);
    ``warnings``: one line per eigen-solve that stopped before converging (see ``message``)."""

    dim: int
    params: list[str]
    num_samples: int
    global_eigen: EigenResult
    layers: dict[str, EigenResult]
    trace: TraceEstimate | None
    num_matvecs: int
    wall_time_s: float
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready, strictly: numbers that are not finite (the standard error of a one-probe
        trace, an unknown residual) are ``None``, since JSON has no NaN."""
        return strict_json_data({
            "dim": self.dim,
            "params": list(self.params),
            "num_samples": self.num_samples,
            "settings": dict(self.settings),
            "global": self.global_eigen.to_dict(),
            "layers": {name: result.to_dict() for name, result in self.layers.items()},
            "trace": None if self.trace is None else self.trace.to_dict(),
            "num_matvecs": self.num_matvecs,
            "wall_time_s": self.wall_time_s,
            "warnings": self.warnings,
        })

    @property
    def warnings(self) -> list[str]:
        solves = [("global", self.global_eigen)] + [(f"layer {name}", result) for name, result in self.layers.items()]
        return [f"{where}: {result.message}" for where, result in solves if not result.all_converged]


def spectrum(
    model: nn.Module,
    data,
    top_k: int = 5,
    method: str = DEFAULT_EIGEN_METHOD,
    per_layer: bool = True,
    layer_top_k: int = 1,
    trace_probes: int = 16,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    loss_fn=None,
    params=None,
    num_batches: int | None = None,
    hvp_method: str = DEFAULT_HVP_METHOD,
    cache_graph: bool | str = "auto",
    ignored_layers=None,
) -> SpectrumResult:
    """Top ``top_k`` Hessian eigenvalues (by magnitude, sign kept), the top ``layer_top_k`` of
    each layer's block when ``per_layer``, and the trace from ``trace_probes`` probes (0: skip).

    Checked before any Hessian-vector product, as one-line :class:`ConfigError`: ``top_k`` must
    not exceed the Hessian's dimension (the number of parameters analysed), and with Lanczos
    ``max_iter`` (products in all) must be at least the number of eigenpairs asked, since each
    product adds one Ritz value (:func:`~camphive.curvature.eigen.min_max_iter`); ``max_iter``
    is a cost limit, so it is never raised silently. ``layer_top_k`` is capped at each block's
    size (a layer's bias may hold fewer numbers). Eigen-solves that stop before ``tol`` is met
    keep their estimates, flagged in ``converged`` and listed in ``warnings``.
    """
    if top_k < 1 or layer_top_k < 1 or trace_probes < 0:
        raise ConfigError(f"top_k={top_k}, layer_top_k={layer_top_k}, trace_probes={trace_probes}; counts must be positive (probes >= 0)")
    start = time.perf_counter()
    with HessianOperator(
        model, data, loss_fn=loss_fn, params=params, num_batches=num_batches, method=hvp_method,
        cache_graph=cache_graph, ignored_layers=ignored_layers,
    ) as operator:
        sizes = [shape.numel() for shape in operator.shapes]
        _check_counts(sizes, top_k, layer_top_k if per_layer else 0, method, max_iter)
        global_eigen = top_eigenpairs(operator, k=top_k, method=method, tol=tol, max_iter=max_iter, seed=seed)
        layers = {}
        used = global_eigen.num_matvecs
        if per_layer:
            for name, block in operator.block_operators().items():
                layers[name] = top_eigenpairs(block, k=min(layer_top_k, block.dim), method=method, tol=tol, max_iter=max_iter, seed=seed)
                used += layers[name].num_matvecs
        trace = hutchinson_trace(operator, num_probes=trace_probes, seed=seed) if trace_probes else None
        used += trace.num_matvecs if trace else 0
        settings = {
            "top_k": top_k, "method": method, "per_layer": per_layer, "layer_top_k": layer_top_k,
            "trace_probes": trace_probes, "tol": tol, "max_iter": max_iter, "seed": seed,
            "hvp_method": hvp_method, "cache_graph": cache_graph, "num_batches": operator.num_batches,
            "cached_bytes": operator.cached_bytes,
        }
        return SpectrumResult(
            dim=operator.dim, params=list(operator.params), num_samples=operator.num_samples,
            global_eigen=global_eigen, layers=layers, trace=trace, num_matvecs=used,
            wall_time_s=time.perf_counter() - start, settings=settings,
        )


def check_spectrum_request(
    model: nn.Module,
    top_k: int = 5,
    *,
    method: str = DEFAULT_EIGEN_METHOD,
    max_iter: int = 100,
    per_layer: bool = True,
    layer_top_k: int = 1,
    params=None,
    ignored_layers=None,
) -> None:
    """Raise the :class:`ConfigError` that :func:`spectrum` would raise for these counts, without
    data or any product: lets a job refuse them before it creates its run folder."""
    if top_k < 1 or layer_top_k < 1:
        raise ConfigError(f"top_k={top_k}, layer_top_k={layer_top_k}; counts must be positive")
    sizes = [tensor.numel() for tensor in _select_parameters(model, params, ignored_layers).values()]
    _check_counts(sizes, top_k, layer_top_k if per_layer else 0, method, max_iter)


def _check_counts(sizes: list[int], top_k: int, layer_top_k: int, method: str, max_iter: int) -> None:
    """Refuse eigenpair counts the solver cannot deliver; ``sizes``: numbers per parameter tensor."""
    dim = sum(sizes)
    if top_k > dim:
        raise ConfigError(
            f"top_k={top_k} eigenvalues asked of a Hessian of dimension {dim} (the parameters analysed); "
            f"pass top_k <= {dim}"
        )
    largest_block_k = max((min(layer_top_k, size) for size in sizes), default=0)
    needed = min_max_iter(method, max(top_k, largest_block_k))
    if max_iter < needed:
        which, asked = ("top_k", top_k) if top_k >= largest_block_k else ("layer_top_k", layer_top_k)
        raise ConfigError(
            f"max_iter={max_iter} products cannot give {which}={asked} eigenvalues with {method} (one per product); "
            f"pass max_iter >= {needed} (converged values usually take several times that) or a smaller {which}"
        )


def plot_convergence(result: SpectrumResult | EigenResult, path) -> None:
    """Write a PNG: each eigenvalue estimate against the products used (left), and its
    relative distance to the final value on a log scale (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eigen = result.global_eigen if isinstance(result, SpectrumResult) else result
    figure, (values_axis, error_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for index, (values, counts) in enumerate(zip(eigen.history, eigen.history_matvecs)):
        if not values:
            continue
        final = values[-1]
        label = f"$\\lambda_{{{index + 1}}}$ = {final:.4g}"
        values_axis.plot(counts, values, marker=".", label=label)
        errors = [abs(value - final) / max(abs(final), 1e-300) for value in values[:-1]]
        if errors:
            error_axis.semilogy(counts[:-1], [max(error, 1e-16) for error in errors], marker=".", label=label)
    values_axis.set_xlabel("Hessian-vector products")
    values_axis.set_ylabel("eigenvalue estimate")
    error_axis.set_xlabel("Hessian-vector products")
    error_axis.set_ylabel("relative distance to final estimate")
    values_axis.set_title(f"{eigen.method}: {eigen.num_matvecs} products")
    for axis in (values_axis, error_axis):
        axis.grid(True, alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
