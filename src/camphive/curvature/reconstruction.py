"""Layer-wise reconstruction curvature: G = E[x x^T] over the inputs x of each layer.

For a layer with weight rows ``w_o`` (one per output unit) and inputs ``x`` (a Linear
layer's input features; a convolution's im2col patches, one per sample and output
position), the reconstruction loss ``1/2 E||(W - W') x||^2`` equals
``1/2 sum_o (w_o - w'_o)^T G (w_o - w'_o)``: G is its exact Hessian for every row.

Layout (matches the flattened weight, so no index juggling is needed downstream):

* ``weight_rows(layer)`` is ``W.reshape(out_features_or_channels, -1)``; entry ``j`` of a row
  multiplies entry ``j`` of the input vector ``x``. For a convolution weight
  ``(out, in/groups, kh, kw)`` that is the ``(in_channel, ki, kj)`` order of
  ``torch.nn.functional.unfold``.
* A grouped (e.g. depthwise) convolution has one G per group: output channel ``o`` belongs
  to group ``o // (out / groups)`` and reads only that group's input channels. Every
  :class:`LayerCovariance` therefore holds a stack ``(groups, fan_in, fan_in)`` with
  ``fan_in = in/groups * kh * kw``; ``groups == 1`` for Linear layers and plain convolutions.

G is averaged over all samples and positions of the calibration data, in one forward pass
with hooks (BatchNorm in eval mode; the model's modes and flags are restored): products in
the inputs' precision (at least float32), sums in float64 by default, stride-1 convolutions
without forming their im2col patches (:mod:`camphive.curvature.gram`). Layers whose fan-in exceeds ``max_fan_in`` keep a product
form instead: a uniform subsample of at most ``max_rows`` input rows ``X``, with
``G v = X^T (X v) / rows`` (the diagonal stays exact).

Under torchrun each process passes its shard of the calibration data; the sums of ``x x^T``
and the row counts are reduced over the processes, so every process holds the G of the union
(in product form the kept rows are gathered from all processes, in rank order).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from camphive import distributed as dist_tools
from camphive.curvature.gram import ROW_CHUNK, GramSums, padded_2d
from camphive.curvature.operators import LinearOperatorBase
from camphive.curvature.state import curvature_mode, parameter_device_dtype, prepare_batches
from camphive.errors import ConfigError
from camphive.layers import prunable_layers

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass
class LayerCovariance:
    """G of one layer. ``matrix``: ``(groups, fan_in, fan_in)`` or ``None`` in product form,
    where ``inputs`` ``(groups, rows, fan_in)`` holds the kept rows. ``diagonal``:
    ``(groups, fan_in)``, exact. ``damping``: ``(groups,)`` added to G's diagonal.
    ``num_samples``: input rows averaged (samples x positions); ``num_examples``: samples."""

    name: str
    groups: int
    fan_in: int
    out_per_group: int
    diagonal: torch.Tensor
    num_samples: int
    num_examples: int
    matrix: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    damping: torch.Tensor | None = None

    @property
    def is_explicit(self) -> bool:
        return self.matrix is not None

    def group_of_output(self, output_unit: int) -> int:
        return output_unit // self.out_per_group

    def damped(self, fraction: float = 0.01) -> LayerCovariance:
        """A copy with ``fraction`` x (mean diagonal of each group) added to that group's diagonal."""
        if fraction < 0:
            raise ConfigError(f"damping fraction {fraction} is negative; use a fraction >= 0 such as 0.01")
        damping = fraction * self.diagonal.mean(dim=1)
        if self.damping is not None:
            damping = damping + self.damping
        return replace(self, damping=damping)

    def dense(self) -> torch.Tensor:
        """``(groups, fan_in, fan_in)`` including damping (formed from the rows in product form)."""
        if self.matrix is not None:
            matrix = self.matrix
        else:
            matrix = self.inputs.transpose(1, 2) @ self.inputs / self.inputs.shape[1]
        if self.damping is not None:
            matrix = matrix + torch.diag_embed(self.damping[:, None].expand(-1, self.fan_in))
        return matrix

    def matvec(self, vectors: torch.Tensor) -> torch.Tensor:
        """``G_g v_g`` for every group: ``(groups, fan_in)`` or ``(groups, fan_in, k)`` in, same out."""
        squeeze = vectors.ndim == 2
        vectors = vectors.unsqueeze(-1) if squeeze else vectors
        vectors = vectors.to(self.diagonal.dtype)
        if self.matrix is not None:
            result = self.matrix @ vectors
        else:
            result = self.inputs.transpose(1, 2) @ (self.inputs @ vectors) / self.inputs.shape[1]
        if self.damping is not None:
            result = result + self.damping[:, None, None] * vectors
        return result.squeeze(-1) if squeeze else result

    def reconstruction_error(self, weight_delta: torch.Tensor) -> float:
        """``1/2 sum_o d_o^T G_{group(o)} d_o`` for a weight change shaped like the weight."""
        rows = weight_delta.reshape(self.groups, self.out_per_group, self.fan_in).to(self.diagonal.dtype)
        products = self.matvec(rows.transpose(1, 2))  # (groups, fan_in, out_per_group)
        return 0.5 * float((rows.transpose(1, 2) * products).sum())

    def as_operator(self, group: int | None = None) -> CovarianceOperator:
        """An operator for the eigen-solvers: one group's G, or all groups block-diagonally."""
        return CovarianceOperator(self, group)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "groups": self.groups,
            "fan_in": self.fan_in,
            "explicit": self.is_explicit,
            "num_samples": self.num_samples,
            "num_examples": self.num_examples,
            "kept_rows": None if self.inputs is None else int(self.inputs.shape[1]),
            "mean_diagonal": float(self.diagonal.mean()),
            "damping": None if self.damping is None else [float(value) for value in self.damping],
        }


class CovarianceOperator(LinearOperatorBase):
    """G (one group, or all groups as one block-diagonal matrix) on flat vectors."""

    def __init__(self, covariance: LayerCovariance, group: int | None = None) -> None:
        super().__init__()
        if group is not None and not 0 <= group < covariance.groups:
            raise ConfigError(f"group {group} of layer {covariance.name!r}, which has {covariance.groups} groups")
        self.covariance = covariance
        self.group = group
        self.dim = covariance.fan_in * (covariance.groups if group is None else 1)
        self.dtype = covariance.diagonal.dtype
        self.device = covariance.diagonal.device

    def _matmat(self, matrix: torch.Tensor) -> torch.Tensor:
        cov = self.covariance
        if self.group is None:
            return cov.matvec(matrix.reshape(cov.groups, cov.fan_in, -1)).reshape(self.dim, -1)
        padded = torch.zeros(cov.groups, cov.fan_in, matrix.shape[1], dtype=matrix.dtype, device=matrix.device)
        padded[self.group] = matrix
        return cov.matvec(padded)[self.group]  # products of zero blocks are wasted, but exact

    def _matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self._matmat(vector.unsqueeze(1)).squeeze(1)


def weight_rows(layer: nn.Module) -> torch.Tensor:
    """``W.reshape(out, -1)``: row ``o`` times an input row ``x`` of its group is output ``o``."""
    return layer.weight.reshape(layer.weight.shape[0], -1)


def layer_input_rows(layer: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The inputs ``x`` of ``layer`` as rows per group: ``(groups, rows, fan_in)``.

    Linear: ``(..., in)`` -> ``(1, rows, in)``. Conv1d/Conv2d: im2col patches of the padded
    input (padding mode respected), ``rows = samples x output positions``.
    """
    if isinstance(layer, nn.Linear):
        return inputs.reshape(1, -1, inputs.shape[-1])
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        inputs, kernel, stride, dilation = padded_2d(layer, inputs)
        patches = F.unfold(inputs, kernel, dilation=dilation, stride=stride)  # (N, C*kh*kw, L)
        groups = layer.groups
        fan_in = patches.shape[1] // groups
        rows = patches.reshape(patches.shape[0], groups, fan_in, -1).permute(1, 0, 3, 2)
        return rows.reshape(groups, -1, fan_in)
    raise ConfigError(
        f"reconstruction curvature supports Linear, Conv1d and Conv2d layers, not {type(layer).__name__}; "
        "leave that layer out: ignored_layers=[its name] in camphive.prune (layers=... when calling this directly)"
    )


def reconstruction_loss(layer: nn.Module, inputs: torch.Tensor, weight_delta: torch.Tensor) -> float:
    """Exact ``1/2 E||(W - W') x||^2``: the layer's own operation on ``inputs`` with weight
    ``W - W'`` (no bias), squared and summed over output units, averaged over samples and
    output positions. The reference that :class:`LayerCovariance` is tested against."""
    inputs = inputs.to(weight_delta.dtype)
    if isinstance(layer, nn.Linear):
        outputs = F.linear(inputs, weight_delta).reshape(-1, weight_delta.shape[0])
        return 0.5 * float((outputs**2).sum(dim=1).mean())
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        padded, _, stride, dilation = padded_2d(layer, inputs)
        kernel = weight_delta.unsqueeze(-2) if isinstance(layer, nn.Conv1d) else weight_delta
        outputs = F.conv2d(padded, kernel, stride=stride, dilation=dilation, groups=layer.groups)
        return 0.5 * float((outputs**2).sum(dim=1).mean())
    raise ConfigError(f"reconstruction_loss supports Linear, Conv1d and Conv2d, not {type(layer).__name__}")


class _Accumulator:
    """Forward pre-hook summing one layer's ``x x^T`` (explicit form) or keeping sampled rows (product form)."""

    def __init__(self, name: str, layer: nn.Module, dtype: torch.dtype, explicit: bool, rows_per_call: int, seed: int) -> None:
        self.name, self.layer, self.dtype, self.explicit = name, layer, dtype, explicit
        self.rows_per_call = rows_per_call
        self.generator = torch.Generator().manual_seed(seed)
        self.sums = GramSums(layer, dtype) if explicit else None
        self.gram = self.square_sum = None
        self.kept: list[torch.Tensor] = []
        self.rows = self.examples = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        inputs = args[0].detach()
        self.examples += int(inputs.shape[0])
        if self.explicit:
            self.sums.add(inputs)
            self.rows = self.sums.rows
            return
        rows = layer_input_rows(module, inputs)
        self.rows += int(rows.shape[1])
        for chunk in torch.split(rows, ROW_CHUNK, dim=1):
            squares = (chunk.to(self.dtype) ** 2).sum(dim=1)
            self.square_sum = squares if self.square_sum is None else self.square_sum + squares
        count = min(self.rows_per_call, rows.shape[1])
        chosen = torch.randperm(rows.shape[1], generator=self.generator)[:count].to(rows.device)
        self.kept.append(rows[:, chosen].to(self.dtype))

    def reduce_over_processes(self) -> None:
        """Sum the Gram matrices and counts over all processes; gather the kept rows (collectives)."""
        weight = self.layer.weight
        groups = int(getattr(self.layer, "groups", 1))
        fan_in = int(weight[0].numel())
        if self.explicit:
            self.gram = self.sums.total()
            if self.gram is None:  # this process saw no rows: contribute zeros
                self.gram = torch.zeros(groups, fan_in, fan_in, dtype=self.dtype, device=weight.device)
            (self.gram,) = dist_tools.all_reduce_tensors([self.gram])
        else:
            if self.square_sum is None:
                self.square_sum = torch.zeros(groups, fan_in, dtype=self.dtype, device=weight.device)
            (self.square_sum,) = dist_tools.all_reduce_tensors([self.square_sum])
            local = torch.cat(self.kept, dim=1) if self.kept else torch.zeros(groups, 0, fan_in, dtype=self.dtype, device=weight.device)
            self.kept = [dist_tools.all_gather_rows(local, dim=1)]
        self.rows, self.examples = (int(value) for value in dist_tools.all_reduce_numbers([self.rows, self.examples], dtype=torch.int64))

    def result(self) -> LayerCovariance:
        if self.rows == 0:
            raise ConfigError(f"layer {self.name!r} saw no inputs in the forward pass; it is not used by the model's forward")
        weight = self.layer.weight
        groups = int(getattr(self.layer, "groups", 1))
        matrix = None
        if self.explicit:
            matrix = self.gram if self.gram is not None else self.sums.total()
            self.sums = self.gram = None  # free the partial sums before the next layer assembles its own
            diagonal = matrix.diagonal(dim1=1, dim2=2) / self.rows
            matrix = matrix.div_(self.rows)
        else:
            diagonal = self.square_sum / self.rows
        return LayerCovariance(
            name=self.name,
            groups=groups,
            fan_in=int(weight[0].numel()),
            out_per_group=int(weight.shape[0]) // groups,
            diagonal=diagonal,
            num_samples=self.rows,
            num_examples=self.examples,
            matrix=matrix,
            inputs=None if self.explicit else torch.cat(self.kept, dim=1),
        )


def layer_input_covariances(
    model: nn.Module,
    data,
    layers: Sequence[str] | Mapping[str, nn.Module] | None = None,
    num_batches: int | None = None,
    max_fan_in: int = 8192,
    max_rows: int = 4096,
    dtype: torch.dtype = torch.float64,
    ignored_layers=None,
    batch_size: int = 128,
    seed: int = 0,
    distributed: bool | None = None,
) -> dict[str, LayerCovariance]:
    """G of every chosen layer (default: the prunable conv and linear layers), one forward pass per batch.

    Layers with ``fan_in > max_fan_in`` get the product form, keeping about ``max_rows``
    input rows drawn uniformly per batch (``seed``). ``distributed``: ``None`` reduces over the
    processes when a group runs (``data`` is then this process's shard), ``False`` does not.
    """
    reduce = dist_tools.resolve(distributed)
    chosen = _select_layers(model, layers, ignored_layers)
    device, model_dtype = parameter_device_dtype([layer.weight for layer in chosen.values()])
    batches = prepare_batches(data, num_batches, device, model_dtype, batch_size=batch_size)
    total_batches = dist_tools.all_reduce_int(len(batches)) if reduce else len(batches)
    rows_per_call = max(1, math.ceil(max_rows / total_batches))
    accumulators = {
        name: _Accumulator(name, layer, dtype, layer.weight[0].numel() <= max_fan_in, rows_per_call, seed + index)
        for index, (name, layer) in enumerate(chosen.items())
    }
    handles = [layer.register_forward_pre_hook(accumulators[name]) for name, layer in chosen.items()]
    try:
        with torch.no_grad(), curvature_mode(model, ()):
            for inputs, _ in batches:
                model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    if reduce:
        for accumulator in accumulators.values():
            accumulator.reduce_over_processes()
    return {name: accumulator.result() for name, accumulator in accumulators.items()}


def _select_layers(model: nn.Module, layers, ignored_layers) -> dict[str, nn.Module]:
    if layers is None:
        chosen = prunable_layers(model, ignored_layers)
    elif isinstance(layers, Mapping):
        chosen = dict(layers)
    else:
        modules = dict(model.named_modules())
        unknown = [name for name in layers if name not in modules]
        if unknown:
            raise ConfigError(f"layer {unknown[0]!r} is not a module of the model; use names from model.named_modules()")
        chosen = {name: modules[name] for name in layers}
    if not chosen:
        raise ConfigError(f"{type(model).__name__} has no conv or linear layers to take reconstruction curvature of")
    for name, layer in chosen.items():
        if not isinstance(layer, SUPPORTED):
            raise ConfigError(
                f"layer {name!r} is a {type(layer).__name__}; reconstruction curvature supports Linear, Conv1d and "
                f"Conv2d layers: leave it out with ignored_layers=[{name!r}] in camphive.prune (layers=... when "
                "calling this directly)"
            )
    return chosen
