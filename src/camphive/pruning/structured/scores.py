"""Channel scores: how much each channel of a group matters, higher = keep.

Two families share one interface so that every criterion runs through the same structured
pipeline:

* the project's per-weight criteria (CAMP-HiVe, magnitude, random, Taylor, OBD,
  Hutchinson; :mod:`camphive.pruning.criteria.base`): a channel's score is the sum of the
  per-weight scores of every weight of the group that belongs to it (producer filters,
  depthwise filters, consumer input columns);
* Torch-Pruning's own group importances (``tp-magnitude``: group L2 norm, ``tp-taylor``:
  |w g|, ``tp-hessian``: w^2 times the mean squared per-sample gradient), each with its
  default group reduction (mean) and normalization (by the group mean), called on the
  group exactly as Torch-Pruning's pruners do.

Gradients for the Torch-Pruning criteria are taken with BatchNorm in eval mode on the
calibration batches, like the curvature of the project's criteria. Torch-Pruning 1.6's
``HessianImportance.accumulate_grad`` keeps only the last sample (it looks parameters up
by name in a dict keyed by parameter), so the squared per-sample gradients are averaged
here (:func:`camphive.curvature.fisher.empirical_fisher_diagonal`) and handed to it as the
gradients it would have averaged.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from camphive import distributed
from camphive.curvature.fisher import empirical_fisher_diagonal
from camphive.errors import ConfigError
from camphive.modules import eval_mode
from camphive.pruning.structured.groups import ChannelGroup, layer_weight_name, per_input_channel, per_output_channel
from camphive.pruning.structured.saliency import greedy_obs_scores, obs_saliency
from camphive.pruning.criteria.base import CRITERIA, make_criterion

TP_CRITERIA = ("tp-magnitude", "tp-taylor", "tp-hessian")
STRUCTURED_CRITERIA = CRITERIA + TP_CRITERIA


def canonical_criterion(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    aliases = {"camphive": "camp-hive", "l1": "magnitude", "fisher": "obd", "tp-l2": "tp-magnitude",
               "tp-group-magnitude": "tp-magnitude", "tp-obd": "tp-hessian"}
    key = aliases.get(key, key)
    if key not in STRUCTURED_CRITERIA:
        raise ConfigError(f"unknown criterion {name!r}; use one of {', '.join(STRUCTURED_CRITERIA)}")
    return key


CHANNEL_SCORES = ("summed", "obs", "greedy_obs")


class ChannelScorer:
    """Scores the channels of every group.

    ``channel_score`` (CAMP-HiVe only): ``"summed"`` sums the criterion's per-weight scores
    over the group; ``"obs"`` and ``"greedy_obs"`` are the channel-space Optimal Brain
    Surgeon saliencies of :mod:`~camphive.pruning.structured.saliency` (what a removal costs
    after the least-squares fold; greedy: given the channels removed before it).
    ``options`` go to the CAMP-HiVe criterion (score, curvature, ...).
    """

    def __init__(self, criterion: str, seed: int = 0, channel_score: str = "summed", **options):
        self.name = canonical_criterion(criterion)
        if channel_score not in CHANNEL_SCORES:
            raise ConfigError(f"unknown channel_score {channel_score!r}; use one of {', '.join(CHANNEL_SCORES)}")
        if channel_score != "summed" and self.name != "camp-hive":
            raise ConfigError(f"channel_score={channel_score!r} belongs to criterion camp-hive; "
                              f"drop it for {self.name}")
        self.channel_score = channel_score
        self.seed = seed
        if self.name in TP_CRITERIA or channel_score != "summed":
            if options:
                raise ConfigError(f"criterion {self.name} (channel_score {channel_score}) takes no options, "
                                  f"got {sorted(options)}")
            self.criterion = None
        else:
            self.criterion = make_criterion(self.name, seed=seed, **(options if self.name == "camp-hive" else {}))

    @property
    def needs_activations(self) -> bool:
        return self.channel_score != "summed"

    def describe(self) -> dict:
        described = self.criterion.describe() if self.criterion is not None else {"criterion": self.name}
        return {**described, "channel_score": self.channel_score} if self.name == "camp-hive" else described

    def scores(self, model: nn.Module, groups: list[ChannelGroup], info, batches, loss_fn=None, grams=None,
               damping: float = 0.01) -> list[torch.Tensor]:
        """``[(group.size,) float64 tensor per group]``; ``grams`` from
        :func:`~camphive.pruning.structured.merging.consumer_grams` when ``channel_score="obs"``."""
        if self.channel_score in ("obs", "greedy_obs"):
            saliency = obs_saliency if self.channel_score == "obs" else greedy_obs_scores
            read = {key for key, _ in (grams or {})}
            # A group no conv/linear reads (e.g. an LSTM does) has no fold-aware cost: its
            # channels are scored by CAMP-HiVe's per-weight scores of the layers it has, summed.
            unread = [group for group in groups if group.key not in read]
            fallback = dict(zip((g.key for g in unread), self._summed_fallback(unread, info)))
            return [fallback[group.key] if group.key in fallback else saliency(group, grams or {}, damping)
                    for group in groups]
        if self.criterion is not None:
            weight_scores = self.criterion.scores(info)
            return [weight_scores_to_channels(group, weight_scores) for group in groups]
        return torch_pruning_scores(self.name, model, groups, batches, loss_fn)

    def _summed_fallback(self, groups: list[ChannelGroup], info) -> list[torch.Tensor]:
        if not groups:
            return []
        weight_scores = make_criterion("camp-hive", seed=self.seed).scores(info)
        return [weight_scores_to_channels(group, weight_scores) for group in groups]


@torch.no_grad()
def weight_scores_to_channels(group: ChannelGroup, weight_scores: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum the per-weight scores of each channel over the group's conv/linear members."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        scores = weight_scores.get(layer_weight_name(member))
        if member.role == "norm" or scores is None:
            continue
        scores = scores.detach().double().cpu()
        if member.role == "consumer":
            values = per_input_channel(member.module, scores)[member.indices]
        else:
            values = per_output_channel(member.module, scores)[member.indices]
        total.index_add_(0, member.root_indices, values)
    return total


def torch_pruning_scores(name: str, model: nn.Module, groups: list[ChannelGroup], batches,
                         loss_fn=None) -> list[torch.Tensor]:
    """Torch-Pruning's importance of each group's channels (see the module docstring)."""
    if name == "tp-magnitude":
        importance = tp.importance.GroupMagnitudeImportance(p=2)
    elif name == "tp-taylor":
        importance = tp.importance.GroupTaylorImportance()
        _set_mean_gradients(model, batches, loss_fn)
    else:
        importance = tp.importance.GroupHessianImportance()
        _set_mean_squared_sample_gradients(model, batches, loss_fn)
    try:
        results = []
        for group in groups:
            value = importance(group.tp_group)
            if value is None:  # a group without weights Torch-Pruning scores: keep its order
                value = torch.zeros(group.size)
            results.append(value.detach().double().cpu())
        return results
    finally:
        model.zero_grad(set_to_none=True)


def _set_mean_gradients(model: nn.Module, batches, loss_fn=None) -> None:
    """``p.grad`` = gradient of the mean calibration loss (BatchNorm in eval mode), over the
    batches of every process when a process group runs (``batches`` is then this process's shard)."""
    loss_fn = loss_fn or F.cross_entropy
    model.zero_grad(set_to_none=True)
    total = distributed.all_reduce_int(sum(int(inputs.shape[0]) for inputs, _ in batches))
    device = next(model.parameters()).device
    with eval_mode(model), torch.enable_grad():
        for inputs, targets in batches:
            loss = loss_fn(model(inputs.to(device)), targets.to(device)) * (inputs.shape[0] / total)
            loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    for gradient, total_gradient in zip(gradients, distributed.all_reduce_tensors(gradients)):
        gradient.copy_(total_gradient)


def _set_mean_squared_sample_gradients(model: nn.Module, batches, loss_fn=None) -> None:
    """``p.grad`` = mean over samples of the squared per-sample gradient (empirical Fisher)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = empirical_fisher_diagonal(model, batches, params, loss_fn)
    for name, parameter in params.items():
        parameter.grad = fisher[name].to(parameter)

