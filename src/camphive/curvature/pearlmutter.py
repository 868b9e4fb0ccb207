"""Exact Hessian-vector products of the mean loss (Pearlmutter's trick), two ways.

Both engines compute, for the chosen parameters ``theta_S`` (a subset of the engine's
parameters) and vectors ``v_S``::

    H_SS v_S = sum_b (n_b / N) * d/d theta_S [ grad_S L_b(theta) . v_S ]

where ``L_b`` is the mean loss on calibration batch ``b`` (``n_b`` samples, ``N`` in all).
The derivative is taken with respect to the *parameters*; ``v`` is a constant.

* :class:`DoubleBackwardEngine`: reverse-over-reverse. The first backward is run with
  ``create_graph=True``; ``H v`` is then the vector-Jacobian product of the gradient with
  ``v`` (one more backward). That first graph can be kept per batch (``cache_graph``), so
  that every later product costs only the second backward.
* :class:`ForwardOverReverseEngine`: ``torch.func.jvp`` of ``torch.func.grad`` on a
  ``functional_call`` of the model; nothing is cached.

Non-finite losses or products raise :class:`NumericalError` naming the batch and parameter.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn

from camphive.batches import Batch
from camphive.curvature.state import ModelSnapshot, curvature_mode
from camphive.errors import ConfigError, NumericalError, one_line

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
VectorSet = list[torch.Tensor]  # one tensor per chosen parameter, shaped like it


class _EngineBase:
    def __init__(self, model: nn.Module, names: list[str], params: list[torch.Tensor], batches: list[Batch], loss_fn: LossFunction) -> None:
        self.model = model
        self.names = names
        self.params = params
        self.batches = batches
        self.loss_fn = loss_fn
        total = sum(int(inputs.shape[0]) for inputs, _ in batches)
        self.batch_weights = [int(inputs.shape[0]) / total for inputs, _ in batches]

    def _scaled_loss(self, index: int, outputs: torch.Tensor) -> torch.Tensor:
        """``(n_b / N) * L_b``: summing these over batches gives the mean loss over all samples."""
        loss = self.loss_fn(outputs, self.batches[index][1])
        if loss.ndim != 0:
            raise ConfigError(
                f"the loss function returned a tensor of shape {tuple(loss.shape)}; it must return the "
                "mean loss over the batch as a scalar (e.g. reduction='mean')"
            )
        if not torch.isfinite(loss.detach()):
            raise NumericalError(
                f"the loss is {loss.item()} on calibration batch {index} of {len(self.batches)}; "
                "check the model weights and inputs for NaN/inf before computing curvature"
            )
        return loss * self.batch_weights[index]

    def _check_finite(self, pieces: Sequence[torch.Tensor], indices: Sequence[int], batch: int, what: str) -> None:
        flags = torch.stack([torch.isfinite(piece).all() for piece in pieces])
        if bool(flags.all()):
            return
        bad = [self.names[indices[position]] for position in range(len(pieces)) if not bool(flags[position])]
        raise NumericalError(one_line(
            f"{what} is not finite for parameter {bad[0]!r} on calibration batch {batch} of {len(self.batches)} "
            f"({len(bad)} parameter(s) affected); check the weights, the inputs and the vector for NaN/inf"
        ))

    def gradient(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """Gradient of the mean loss for the parameters ``indices`` (no graph kept)."""
        chosen = [self.params[i] for i in indices]
        totals = [torch.zeros_like(parameter) for parameter in chosen]
        with curvature_mode(self.model, chosen):
            for index, (inputs, _) in enumerate(self.batches):
                loss = self._scaled_loss(index, self.model(inputs))
                grads = torch.autograd.grad(loss, chosen, allow_unused=True, materialize_grads=True)
                self._check_finite(grads, indices, index, "the gradient")
                for total, grad in zip(totals, grads):
                    total.add_(grad)
        return totals


class DoubleBackwardEngine(_EngineBase):
    """Reverse-over-reverse products, optionally keeping each batch's first-backward graph.

    ``cache_graph``: ``True`` keeps every batch's graph, ``False`` none, ``"auto"`` keeps
    batches while the tensors their graphs save fit in ``memory_budget`` bytes (``None``:
    half the free memory of the device). The graphs are dropped whenever the model's
    weights or buffers change, and by :meth:`clear`.
    """

    def __init__(self, model, names, params, batches, loss_fn, cache_graph: bool | str = "auto", memory_budget: float | None = None) -> None:
        super().__init__(model, names, params, batches, loss_fn)
        self.cache_graph = cache_graph
        self.memory_budget = memory_budget
        self._graphs: dict[int, tuple[torch.Tensor, ...]] = {}
        self._graph_bytes: dict[int, int] = {}
        self._size_estimates: dict[int, int] = {}
        self._snapshot: ModelSnapshot | None = None
        self._budget_bytes: float | None = None

    @property
    def cached_batches(self) -> int:
        return len(self._graphs)

    @property
    def cached_bytes(self) -> int:
        """Estimated bytes of tensors saved by the cached graphs (parameters and inputs not counted)."""
        return sum(self._graph_bytes.values())

    def clear(self) -> None:
        self._graphs.clear()
        self._graph_bytes.clear()
        self._snapshot = None

    def hvp(self, indices: Sequence[int], vector_sets: Sequence[VectorSet], per_block: bool = False) -> list[VectorSet]:
        """``H_SS v`` for each vector set (block-diagonal ``H_ii v_i`` with ``per_block``).

        All vector sets share each batch's first backward, so ``k`` vectors cost one first
        backward per batch (none when cached) plus ``k`` second backwards.
        """
        chosen = [self.params[i] for i in indices]
        results = [[torch.zeros_like(parameter) for parameter in chosen] for _ in vector_sets]
        with curvature_mode(self.model, self.params):
            if self._snapshot is not None and not self._snapshot.unchanged(self.model):
                self.clear()
            for batch in range(len(self.batches)):
                grads, cached = self._first_backward(batch)
                outputs = [grads[i] for i in indices]
                last = len(vector_sets) - 1
                for number, vectors in enumerate(vector_sets):
                    retain = cached or number < last
                    pieces = self._second_backward(outputs, chosen, vectors, retain, per_block)
                    self._check_finite(pieces, indices, batch, "the Hessian-vector product")
                    for total, piece in zip(results[number], pieces):
                        total.add_(piece)
                del grads, outputs
        return results

    def _second_backward(self, outputs, chosen, vectors, retain: bool, per_block: bool) -> list[torch.Tensor]:
        if not per_block:
            return _vector_jacobian(outputs, chosen, vectors, retain)
        pieces = []
        for position, (output, parameter, vector) in enumerate(zip(outputs, chosen, vectors)):
            keep = retain or position < len(outputs) - 1
            pieces.extend(_vector_jacobian([output], [parameter], [vector], keep))
        return pieces

    def _first_backward(self, batch: int) -> tuple[tuple[torch.Tensor, ...], bool]:
        """The batch's gradient with its graph, from the cache or freshly (cached if it fits)."""
        if batch in self._graphs:
            return self._graphs[batch], True
        inputs, _ = self.batches[batch]
        cache = self.cache_graph is True or (
            self.cache_graph == "auto" and self._estimated_bytes(batch) <= self._room_left()
        )
        grads = self._graph_gradient(batch, inputs)
        if cache:
            if self._snapshot is None:
                self._snapshot = ModelSnapshot(self.model)
            self._graphs[batch] = grads
            self._graph_bytes[batch] = self._estimated_bytes(batch)
        return grads, cache

    def _estimated_bytes(self, batch: int) -> int:
        """Bytes the batch's graph saves, extrapolated from graphs of its first 1 and 2 samples.

        Counting saved tensors with hooks on the full batch would be exact, but graphs built
        under saved-tensor hooks run their second backward several times slower; with BatchNorm
        in eval mode the saved activations grow linearly in the number of samples.
        """
        if batch not in self._size_estimates:
            inputs, targets = self.batches[batch]
            counts = [1, 2] if inputs.shape[0] >= 2 else [1]
            sizes = []
            try:
                for count in counts:
                    with _SavedBytesMeter(self.model, inputs) as meter:
                        loss = self.loss_fn(self.model(inputs[:count]), targets[:count])
                        torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                    sizes.append(meter.bytes)
            except (RuntimeError, ValueError, IndexError):
                # a model or loss that cannot run on one sample: no estimate, so "auto" does not cache
                self._size_estimates[batch] = float("inf") if self.cache_graph == "auto" else 0
                return self._size_estimates[batch]
            per_sample = sizes[-1] - sizes[0] if len(sizes) == 2 else sizes[0]
            fixed = sizes[0] - per_sample
            self._size_estimates[batch] = max(int(fixed + per_sample * inputs.shape[0]), 0)
        return self._size_estimates[batch]

    def _graph_gradient(self, batch: int, inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss = self._scaled_loss(batch, self.model(inputs))
        return torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True, materialize_grads=True)

    def _room_left(self) -> float:
        if self._budget_bytes is None:
            self._budget_bytes = float(self.memory_budget) if self.memory_budget is not None else _default_budget(self.params[0].device)
        return self._budget_bytes - self.cached_bytes


def _vector_jacobian(outputs, inputs, vectors, retain: bool) -> list[torch.Tensor]:
    """``sum_j v_j . d outputs_j / d inputs``; outputs that are constants contribute zero."""
    live = [(output, vector) for output, vector in zip(outputs, vectors) if output.requires_grad]
    if not live:
        return [torch.zeros_like(tensor) for tensor in inputs]
    grads = torch.autograd.grad(
        [output for output, _ in live],
        inputs,
        grad_outputs=[vector for _, vector in live],
        retain_graph=retain,
        allow_unused=True,
        materialize_grads=True,
    )
    return [grad.detach() for grad in grads]


class ForwardOverReverseEngine(_EngineBase):
    """``torch.func.jvp`` of ``torch.func.grad`` of the loss of a ``functional_call``.

    Several vectors go through ``torch.func.vmap`` over the tangents (one batched pass);
    a model whose operations ``vmap`` cannot batch falls back to one pass per vector.
    """

    def hvp(self, indices: Sequence[int], vector_sets: Sequence[VectorSet], per_block: bool = False) -> list[VectorSet]:
        groups = [[i] for i in indices] if per_block else [list(indices)]
        results = [[torch.zeros_like(self.params[i]) for i in indices] for _ in vector_sets]
        with curvature_mode(self.model, ()), warnings.catch_warnings():
            # torch's own jvp decompositions still call torch.jit.script on first use
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=DeprecationWarning)
            for batch in range(len(self.batches)):
                start = 0
                for group in groups:
                    stacked = [torch.stack([vectors[start + j] for vectors in vector_sets]) for j in range(len(group))]
                    pieces = self._jvp_of_grad(batch, group, stacked)
                    for number in range(len(vector_sets)):
                        self._check_finite([piece[number] for piece in pieces], group, batch, "the Hessian-vector product")
                        for total, piece in zip(results[number][start : start + len(group)], pieces):
                            total.add_(piece[number])
                    start += len(group)
        return results

    def _jvp_of_grad(self, batch: int, group: list[int], tangents: VectorSet) -> list[torch.Tensor]:
        """Products for ``k`` tangents stacked on a leading dimension: ``(k, *shape)`` per parameter."""
        from torch.func import functional_call, grad, jvp, vmap

        inputs, _ = self.batches[batch]
        group_names = [self.names[i] for i in group]
        primals = {name: self.params[i].detach() for name, i in zip(group_names, group)}

        def loss_of(chosen: dict[str, torch.Tensor]) -> torch.Tensor:
            return self._scaled_loss(batch, functional_call(self.model, chosen, (inputs,), strict=False))

        def product(*vectors: torch.Tensor) -> list[torch.Tensor]:
            _, out = jvp(grad(loss_of), (primals,), (dict(zip(group_names, vectors)),))
            return [out[name] for name in group_names]

        count = tangents[0].shape[0]
        if count > 1 and self._vmap_works:
            try:
                return [piece.detach() for piece in vmap(product)(*tangents)]
            except (RuntimeError, NotImplementedError):
                self._vmap_works = False
        columns = [product(*(tangent[k] for tangent in tangents)) for k in range(count)]
        return [torch.stack([column[j] for column in columns]).detach() for j in range(len(group))]

    _vmap_works = True


class _SavedBytesMeter:
    """Counts the bytes of tensors autograd saves while active (model weights and inputs excluded).

    The pack hook returns a detached alias: autograd re-attaches the history on unpack, and
    no reference cycle keeps the graph alive after it is dropped.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor) -> None:
        known = (*model.parameters(), *model.buffers(), inputs)
        self._seen = {_storage_key(tensor) for tensor in known}
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._seen:
            self._seen.add(key)
            self.bytes += tensor.untyped_storage().nbytes()
        return tensor.detach()

    def __enter__(self) -> _SavedBytesMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return (str(tensor.device), tensor.untyped_storage().data_ptr())


def _default_budget(device: torch.device) -> float:
    """Half the memory that is free now on ``device`` (CUDA: ``mem_get_info``; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.5 * free
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return 0.5 * int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return 0.5 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2.0 * 1024**3
