"""Run the pruned and the unpruned model side by side, node by node of their ``torch.fx`` graphs, over the
calibration batches together, so that the refit (:mod:`~camphive.pruning.unstructured.refit`) reads each layer's
inputs and targets from one forward pass of each model instead of one pass per layer.

Both models are traced (modules without children as opaque calls); every batch keeps the values of the graph's
nodes that a later node still reads (the *frontier*), and each node is evaluated for every batch before the next
one. When a node calls a layer to refit, the pruned model's inputs to it (every layer before it refitted already)
and the unpruned model's outputs of it are at hand for all batches: the layer is refitted, then evaluated.

Memory: the frontier of all batches is held at once. :func:`frontier_profile` measures it per sample from two
samples, and :func:`plan_pass` fits it into a budget: where all batches do not fit, the first layers (whose
activations are the large ones) are refitted on as many batches as fit, and the pass takes in the other batches,
each run on its own up to that point, at the first node from which all of them fit. Either way each model runs
one forward over every batch.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import fx, nn

from camphive.conv_batchnorm import ChildlessModulesAsLeaves


class LockstepGraphs:
    """The traced graphs of ``model`` and ``reference`` (same architecture, possibly fewer channels)."""

    def __init__(self, model: nn.Module, reference: nn.Module) -> None:
        self.roots = (model, reference)
        self.graphs = tuple(ChildlessModulesAsLeaves().trace(root) for root in self.roots)
        shapes = [[(node.op, node.target) for node in graph.nodes] for graph in self.graphs]
        if shapes[0] != shapes[1]:
            raise ValueError("the two models trace to different graphs")
        self.nodes = list(zip(*(graph.nodes for graph in self.graphs)))
        if sum(node.op == "placeholder" for node, _ in self.nodes) != 1:
            raise ValueError("the model takes more than one input")
        # per model: node -> its index (the same in both graphs)
        self.positions = tuple({node: index for index, node in enumerate(graph.nodes)} for graph in self.graphs)
        self.last_use = {}  # node index -> indices of the nodes whose values are no longer needed after it
        for index, (node, _) in enumerate(self.nodes):
            used_until = max((self.positions[0][user] for user in node.users), default=index)
            self.last_use.setdefault(used_until, []).append(index)

    def run(self, batches, on_layer: Callable[[str, list, list], None], is_refitted: Callable[[str], bool],
            plan: tuple[int, int] | None = None) -> None:
        """Evaluate both graphs over ``batches`` node by node; before a module call that ``is_refitted`` names,
        ``on_layer(name, pruned inputs per batch, reference outputs per batch)`` (it refits the layer).

        ``plan`` (``(first, switch)``, see :func:`plan_pass`): only the first ``first`` batches go through the
        nodes before index ``switch``; the others are run up to it one at a time and join there."""
        first, switch = plan or (len(batches), 0)
        frontier = [[{} for _ in batches[:first]] for _ in self.roots]  # per model, per batch: node index -> value
        for index, pair in enumerate(self.nodes):
            node = pair[0]
            if node.op == "output":
                break
            if index == switch and first < len(batches):
                for which in range(len(self.roots)):
                    frontier[which] += [self._run_until(which, switch, batch) for batch in batches[first:]]
                first = len(batches)
            joined = batches[:first]
            if node.op == "call_module" and is_refitted(node.target):
                targets = self.evaluate(1, pair[1], index, frontier[1], joined)
                inputs = [self._arguments(0, node, values)[0][0] for values in frontier[0]]
                on_layer(node.target, inputs, targets)
            else:
                self.evaluate(1, pair[1], index, frontier[1], joined)
            self.evaluate(0, node, index, frontier[0], joined)
            self._forget(index, [values for per_model in frontier for values in per_model])

    def _run_until(self, which: int, stop: int, batch) -> dict:
        """The frontier of model ``which`` on one ``batch`` before node index ``stop``."""
        values = {}
        for index in range(stop):
            self.evaluate(which, self.nodes[index][which], index, [values], [batch])
            self._forget(index, [values])
        return values

    def _forget(self, index: int, frontiers: list[dict]) -> None:
        """Drop the values no node after ``index`` reads."""
        for done in self.last_use.get(index, []):
            for values in frontiers:
                values.pop(done, None)

    def _arguments(self, which: int, node: fx.Node, values: dict) -> tuple[tuple, dict]:
        load = functools.partial(_load, values=values, position=self.positions[which])
        return fx.node.map_arg(node.args, load), fx.node.map_arg(node.kwargs, load)

    def evaluate(self, which: int, node: fx.Node, index: int, per_batch: list[dict], batches) -> list:
        """Evaluate ``node`` of model ``which`` for every batch, store and return the values."""
        root = self.roots[which]
        results = []
        for values, (inputs, _) in zip(per_batch, batches):
            if node.op == "placeholder":
                device = next(root.parameters()).device
                result = inputs.to(device)
            elif node.op == "get_attr":
                result = functools.reduce(getattr, node.target.split("."), root)
            else:
                args, kwargs = self._arguments(which, node, values)
                if node.op == "call_module":
                    result = root.get_submodule(node.target)(*args, **kwargs)
                elif node.op == "call_method":
                    result = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:
                    result = node.target(*args, **kwargs)
            values[index] = result
            results.append(result)
        return results


def _load(node: fx.Node, values: dict, position: dict):
    return values[position[node]]


def frontier_profile(graphs: LockstepGraphs, batches, probe_samples: int = 2) -> list[float]:
    """Bytes per sample that the frontiers of both models hold while each node is evaluated: the unpruned model's,
    measured on the first ``probe_samples`` samples, times two (the pruned model's is no larger)."""
    profile, live = [], {}
    inputs = batches[0][0][:probe_samples]
    for index, (_, node) in enumerate(graphs.nodes):
        if node.op == "output":
            break
        graphs.evaluate(1, node, index, [live], [(inputs, None)])
        profile.append(2 * sum(_tensor_bytes(value) for value in live.values()) / max(int(inputs.shape[0]), 1))
        graphs._forget(index, [live])
    return profile


def frontier_bytes(graphs: LockstepGraphs, batches, probe_samples: int = 2) -> int:
    """Bytes the frontiers of both models would hold at their peak over all ``batches`` at once."""
    samples = sum(int(batch[0].shape[0]) for batch in batches)
    return int(max(frontier_profile(graphs, batches, probe_samples), default=0) * samples)


def plan_pass(profile: list[float], batches, budget: float) -> tuple[int, int]:
    """``(first, switch)`` for :meth:`LockstepGraphs.run`: from node index ``switch`` on, the frontier of all
    ``batches`` fits in ``budget`` bytes; before it, that of the first ``first`` batches (at least one)."""
    sizes = [int(batch[0].shape[0]) for batch in batches]
    switch = len(profile)
    while switch > 0 and profile[switch - 1] * sum(sizes) <= budget:
        switch -= 1
    if switch == 0:
        return len(batches), 0
    peak, first = max(profile[:switch]), 1
    while first < len(batches) and peak * sum(sizes[:first + 1]) <= budget:
        first += 1
    return first, switch


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size() if not isinstance(value, nn.Parameter) else 0
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    return 0
