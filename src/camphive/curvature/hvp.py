"""The loss Hessian of a model as a linear operator on a flat parameter vector.

``HessianOperator(model, data)`` is ``H = d^2/d theta^2 (1/N) sum_samples loss`` over the
calibration batches (each batch's mean loss weighted by its size), with respect to the
chosen parameters ``theta`` (default: the prunable conv and linear weights), flattened in
order (see :mod:`camphive.curvature.flat`). Products are exact (Pearlmutter), computed with
BatchNorm and dropout in eval mode; the model is given back as it was after every call.

Cost, measured on the CPU (benchmarks/curvature.py): with ``method="double_backward"`` and
the first-backward graph of each batch cached (``cache_graph``), a product costs only the
second backward; without the cache, a forward and two backwards. ``matmat`` shares each
batch's first backward across its columns.

Under torchrun (see :mod:`camphive.distributed`) each process holds a shard of the calibration
batches and every product, gradient and loss is reduced over the processes weighted by their
sample counts, so each process sees exactly the operator of the union of the shards: the
eigen-solvers and Hutchinson (same seeds everywhere) then agree on every process.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from camphive import distributed as dist_tools
from camphive.curvature.flat import flatten_tensors, split_flat
from camphive.curvature.operators import BlockDiagonalOperator, LinearOperatorBase
from camphive.curvature.pearlmutter import DoubleBackwardEngine, ForwardOverReverseEngine, LossFunction
from camphive.curvature.state import curvature_mode, parameter_device_dtype, prepare_batches
from camphive.errors import ConfigError
from camphive.layers import prunable_parameters

HVP_METHODS = ("double_backward", "forward_over_reverse")
# By measurement (benchmarks/RESULTS.md, "Curvature"): the cached double backward is the cheapest.
DEFAULT_HVP_METHOD = "double_backward"
BLOCKS = (None, "global", "layer")


class HessianOperator(LinearOperatorBase):
    """Exact Hessian-vector products of the mean calibration loss.

    Args:
        model: any ``nn.Module``; its device and dtype are those of the chosen parameters.
        data: calibration data: a ``DataLoader``, a ``Dataset`` or a list of ``(inputs, targets)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar mean loss``; default cross-entropy.
        params: parameter names (list) or ``{name: parameter}`` of the model; default: the
            prunable conv and linear weights (``camphive.layers.prunable_parameters``).
        num_batches: read only the first ``num_batches`` batches of ``data``.
        block: ``None``/``"global"``: the full Hessian; ``"layer"``: its block diagonal, one
            block per parameter tensor. Exact block-diagonal products cannot come from one
            second backward (it always mixes blocks), so each product runs, per batch, the
            first backward once (none when cached) and then one second backward per block,
            ``d/d theta_i (g_i . v_i)``; autograd walks only the graph between ``g_i`` and
            ``theta_i`` (the layers from ``i`` to the loss), so in a chain of L layers a
            block-diagonal product costs about L/2 full products. :meth:`block_operators`
            gives the blocks one by one (per-layer spectra) at the same per-block cost.
        method: ``"double_backward"`` (default, fastest measured) or ``"forward_over_reverse"``.
        cache_graph: keep each batch's first-backward graph between products (double backward
            only): ``True``, ``False`` or ``"auto"`` (while it fits in ``memory_budget`` bytes,
            default half the free device memory). Dropped when the model changes, or by
            :meth:`clear_cache` / leaving a ``with`` block.
        distributed: ``None`` (default): when a process group runs, ``data`` is this process's
            shard and results are reduced over the processes (every process must then make the
            same calls); ``False``: this process's data alone; ``True``: require a group.

    Attributes: ``dim``, ``params`` (names in order), ``shapes``, ``num_matvecs`` (vectors
    multiplied), ``matvec_seconds`` (time spent in products), ``num_samples`` (all processes).
    """

    def __init__(
        self,
        model: nn.Module,
        data,
        *,
        loss_fn: LossFunction | None = None,
        params: Sequence[str] | Mapping[str, torch.Tensor] | None = None,
        num_batches: int | None = None,
        block: str | None = None,
        method: str = DEFAULT_HVP_METHOD,
        cache_graph: bool | str = "auto",
        memory_budget: float | None = None,
        ignored_layers=None,
        batch_size: int = 128,
        distributed: bool | None = None,
        _engine=None,
        _total_samples: int | None = None,
    ) -> None:
        super().__init__()
        if method not in HVP_METHODS:
            raise ConfigError(f"unknown HVP method {method!r}; use one of {', '.join(HVP_METHODS)}")
        if block not in BLOCKS:
            raise ConfigError(f"unknown block {block!r}; use None (or 'global') for the full Hessian or 'layer'")
        if cache_graph not in (True, False, "auto"):
            raise ConfigError(f"cache_graph={cache_graph!r}; use True, False or 'auto'")
        if cache_graph is True and method != "double_backward":
            raise ConfigError("cache_graph=True needs method='double_backward'; forward-over-reverse keeps no graph")
        self.model = model
        self.loss_fn = loss_fn or F.cross_entropy
        chosen = _select_parameters(model, params, ignored_layers)
        self.params = list(chosen)
        self.shapes = [tensor.shape for tensor in chosen.values()]
        self.dim = sum(tensor.numel() for tensor in chosen.values())
        self.device, self.dtype = parameter_device_dtype(chosen.values())
        self.block = "layer" if block == "layer" else None
        self.method = method
        self.cache_graph = cache_graph if method == "double_backward" else False
        self.matvec_seconds = 0.0
        if _engine is None:
            batches = prepare_batches(data, num_batches, self.device, self.dtype, batch_size=batch_size)
            _engine = self._make_engine(list(chosen), list(chosen.values()), batches, memory_budget)
        self._engine = _engine
        self.distributed = dist_tools.resolve(distributed)
        self.local_samples = sum(int(inputs.shape[0]) for inputs, _ in _engine.batches)
        if _total_samples is None:
            _total_samples = dist_tools.all_reduce_int(self.local_samples) if self.distributed else self.local_samples
        self._total_samples = _total_samples
        position = {name: index for index, name in enumerate(_engine.names)}
        self._indices = [position[name] for name in self.params]

    def _make_engine(self, names, tensors, batches, memory_budget):
        if self.method == "double_backward":
            return DoubleBackwardEngine(self.model, names, tensors, batches, self.loss_fn, self.cache_graph, memory_budget)
        return ForwardOverReverseEngine(self.model, names, tensors, batches, self.loss_fn)

    @property
    def num_samples(self) -> int:
        """Calibration samples the operator averages over (on all processes when distributed)."""
        return self._total_samples

    @property
    def num_batches(self) -> int:
        """Calibration batches of this process."""
        return len(self._engine.batches)

    def _reduced(self, local_mean: torch.Tensor) -> torch.Tensor:
        """This process's mean over its samples -> the mean over all processes' samples."""
        if not self.distributed:
            return local_mean
        return dist_tools.reduce_mean_(local_mean.contiguous(), self.local_samples, self._total_samples)

    @property
    def cached_bytes(self) -> int:
        """Bytes held by cached graphs (0 when nothing is cached)."""
        return getattr(self._engine, "cached_bytes", 0)

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self._products(vector.unsqueeze(0))[0]

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        return self._products(matrix.T).T

    def _products(self, rows: torch.Tensor) -> torch.Tensor:
        """``(k, dim)`` vectors -> ``(k, dim)`` products, one shared first backward per batch."""
        start = time.perf_counter()
        vector_sets = [split_flat(row, self.shapes) for row in rows]
        results = self._engine.hvp(self._indices, vector_sets, per_block=self.block == "layer")
        products = self._reduced(torch.stack([flatten_tensors(pieces) for pieces in results]))
        self.matvec_seconds += time.perf_counter() - start
        return products

    def gradient(self) -> torch.Tensor:
        """Flat gradient of the mean calibration loss (a forward and a backward per batch)."""
        return self._reduced(flatten_tensors(self._engine.gradient(self._indices)))

    def loss(self) -> float:
        """The mean calibration loss (eval mode)."""
        total = 0.0
        with torch.no_grad(), curvature_mode(self.model, ()):
            for index, (inputs, _) in enumerate(self._engine.batches):
                total += float(self._engine._scaled_loss(index, self.model(inputs)))
        if self.distributed:
            total = dist_tools.all_reduce_numbers([total * self.local_samples / self._total_samples])[0]
        return total

    def restricted_to(self, names: Sequence[str]) -> HessianOperator:
        """The Hessian block of the parameters ``names`` (``H_SS``), a full (not block) operator.

        Shares the calibration batches, and the cached graphs when this operator caches, so
        the block's products only run the part of the second backward that reaches it.
        """
        names = list(names)
        unknown = [name for name in names if name not in self.params]
        if unknown or not names:
            raise ConfigError(f"restricted_to: {unknown or names!r} not among this operator's parameters; use names from .params")
        share = self.method == "forward_over_reverse" or self.cache_graph is not False
        engine = self._engine if share else self._make_engine(
            names, [self._engine.params[self._engine.names.index(name)] for name in names], self._engine.batches, None
        )
        chosen = {name: self._engine.params[self._engine.names.index(name)] for name in names}
        return HessianOperator(
            self.model, None, loss_fn=self.loss_fn, params=chosen, method=self.method,
            cache_graph=self.cache_graph, distributed=self.distributed, _engine=engine, _total_samples=self._total_samples,
        )

    def block_operators(self) -> dict[str, HessianOperator]:
        """One operator per parameter tensor: the diagonal blocks ``H_ii`` (per-layer spectra)."""
        return {name: self.restricted_to([name]) for name in self.params}

    def as_block_diagonal(self) -> BlockDiagonalOperator:
        """The block-diagonal operator assembled from :meth:`block_operators` (same as ``block='layer'``)."""
        return BlockDiagonalOperator(list(self.block_operators().values()))

    def clear_cache(self) -> None:
        """Free the cached graphs (they are rebuilt on the next product)."""
        if hasattr(self._engine, "clear"):
            self._engine.clear()

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc) -> None:
        self.clear_cache()

    def __repr__(self) -> str:
        return (
            f"HessianOperator(dim={self.dim}, params={len(self.params)}, batches={self.num_batches}, "
            f"samples={self.num_samples}, distributed={self.distributed}, method={self.method!r}, block={self.block!r}, "
            f"cache_graph={self.cache_graph!r})"
        )


def _select_parameters(model: nn.Module, params, ignored_layers) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    if params is None:
        chosen = dict(prunable_parameters(model, ignored_layers))
        if not chosen:
            raise ConfigError(
                f"{type(model).__name__} has no conv or linear weights to take curvature of; pass params=[names]"
            )
        return chosen
    if isinstance(params, Mapping):
        chosen = dict(params)
        for name, tensor in chosen.items():
            if named.get(name) is not tensor:
                raise ConfigError(
                    f"params[{name!r}] is not the model parameter of that name; pass "
                    "{name: parameter} pairs from model.named_parameters()"
                )
    else:
        if isinstance(params, str):
            params = [params]
        unknown = [name for name in params if name not in named]
        if unknown:
            raise ConfigError(
                f"parameter {unknown[0]!r} is not in the model; use names from model.named_parameters(), "
                f"e.g. {list(named)[:3]}"
            )
        chosen = {name: named[name] for name in params}
    if not chosen:
        raise ConfigError("params is empty; name at least one parameter or pass None for the prunable weights")
    if len(chosen) != len({id(tensor) for tensor in chosen.values()}):
        raise ConfigError("params names the same tensor twice (tied weights?); list each tensor once")
    floating = [name for name, tensor in chosen.items() if not tensor.is_floating_point()]
    if floating:
        raise ConfigError(f"parameter {floating[0]!r} is not floating point; curvature needs float32 or float64")
    return chosen
