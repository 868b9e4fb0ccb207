"""CAMP-HiVe's curvature scores, for weights and for channels."""
from __future__ import annotations

from camphive.errors import ConfigError
from camphive.pruning.core.unit_curvature import unit_matrix
from camphive.pruning.criteria.base import Criterion, Scores

CHANNEL_SCORES = ("summed", "obs", "greedy_obs")
CAMP_HIVE_SCORES = ("diagonal", "obs", "diag_lowrank", "hv_product")
LOSS_WEIGHTINGS = ("none", "unit", "layer", "batchnorm")


class CampHive(Criterion):
    """CAMP-HiVe's curvature scores (docs/method.md, "Scores").

    ``score``:
      * ``"diagonal"``: 1/2 w_i^2 Hhat_ii with Hhat the chosen curvature (reconstruction G_jj or
        the loss Hessian's low-rank + Hutchinson diagonal);
      * ``"obs"``: the Optimal Brain Surgeon saliency w_i^2 / (2 [Hhat^-1]_ii) within the unit;
      * ``"diag_lowrank"``: 1/2 w_i^2 sum_k |lambda_k| u_{k,i}^2 from the loss Hessian's top eigenpairs;
      * ``"hv_product"``: |w_i (H v)_i| with v the dominant eigenvector (the authors' reading).
    ``loss_weighting`` (reconstruction curvature only) multiplies unit r's scores by the loss
    curvature of its output, A_rr = sum_j diag(H)_rj / tr(G) (the Kronecker-factored reading
    diag(H) ~ A_rr G_jj), estimated per unit (``"unit"``) or per layer (``"layer"``), so that
    reconstruction errors of different layers are weighed by what they cost the loss;
    ``"batchnorm"`` multiplies them instead by (gamma_r / sigma_r)^2 of the BatchNorm that reads
    the unit's output (see :mod:`camphive.pruning.core.output_scale`), 1 where none does.
    ``first_order_weight`` adds that multiple of |g_i w_i|.
    """

    name = "camp-hive"

    def __init__(self, score: str = "diagonal", curvature: str = "reconstruction", loss_weighting: str = "none",
                 first_order_weight: float = 0.0, channel_score: str = "greedy_obs"):
        if score not in CAMP_HIVE_SCORES:
            raise ConfigError(f"unknown score {score!r}; use one of {', '.join(CAMP_HIVE_SCORES)}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"unknown loss_weighting {loss_weighting!r}; use one of {', '.join(LOSS_WEIGHTINGS)}")
        if score in ("diag_lowrank", "hv_product"):
            curvature = "loss"
        if loss_weighting != "none" and curvature != "reconstruction":
            raise ConfigError("loss_weighting applies to curvature='reconstruction' only; set loss_weighting='none'")
        self.score, self.curvature = score, curvature
        self.loss_weighting, self.first_order_weight = loss_weighting, first_order_weight
        if channel_score not in CHANNEL_SCORES:
            raise ConfigError(f"unknown channel_score {channel_score!r}; use one of {', '.join(CHANNEL_SCORES)}")
        self.channel_score = channel_score

    @property
    def needs_activations(self) -> bool:
        return self.channel_score != "summed"

    def describe(self) -> dict:
        return {"criterion": self.name, "score": self.score, "curvature": self.curvature,
                "loss_weighting": self.loss_weighting, "first_order_weight": self.first_order_weight}

    def channel_scores(self, groups, info) -> list:
        """``"summed"``: the per-weight scores summed over each group. ``"obs"`` / ``"greedy_obs"``:
        the channel-space Optimal Brain Surgeon cost of removing each channel after the least-squares
        fold (:mod:`camphive.pruning.structured.saliency`; greedy: given the channels removed before
        it), from the consumers' Grams in ``info.grams``. A group no conv/linear reads (e.g. an LSTM
        does) has no fold-aware cost: its channels get the summed per-weight scores."""
        if self.channel_score == "summed":
            return super().channel_scores(groups, info)
        from camphive.pruning.structured.saliency import greedy_obs_scores, obs_saliency

        saliency = obs_saliency if self.channel_score == "obs" else greedy_obs_scores
        grams = info.grams or {}
        read = {key for key, _ in grams}
        unread = [group for group in groups if group.key not in read]
        weight_scores = self.scores(info) if unread else {}
        return [group.sum_weight_scores(weight_scores) if group.key not in read
                else saliency(group, grams, info.settings["damping"]) for group in groups]

    def scores(self, info) -> Scores:
        weights = info.weights()
        if self.score == "hv_product":
            products = info.dominant_hv_product()
            result = {name: (weight.detach() * products[name]).abs() for name, weight in weights.items()}
        elif self.score == "diag_lowrank":
            diagonal = info.lowrank_diagonal()
            result = {name: 0.5 * weight.detach() ** 2 * diagonal[name] for name, weight in weights.items()}
        else:
            view = info.unit_curvature(self.curvature)
            result = {}
            for name, weight in weights.items():
                matrix = unit_matrix(weight.detach())
                if self.score == "obs":
                    inverse = view.inverse_diagonal(name, matrix.shape[0]).to(matrix)
                    score = matrix**2 / (2.0 * inverse)
                else:
                    score = 0.5 * matrix**2 * view.diagonal(name, matrix.shape[0]).to(matrix)
                if self.loss_weighting == "batchnorm":
                    score = score * info.output_scale(name).to(matrix)[:, None]
                elif self.loss_weighting != "none":
                    score = score * info.output_curvature(name, self.loss_weighting).to(matrix)[:, None]
                result[name] = score.reshape(weight.shape)
        if self.first_order_weight:
            gradient = info.gradient()
            for name, weight in weights.items():
                result[name] = result[name] + self.first_order_weight * (weight.detach() * gradient[name]).abs()
        return result
