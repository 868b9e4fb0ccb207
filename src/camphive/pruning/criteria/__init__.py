"""Importance criteria: objects that score weights and channels (:class:`Criterion`).

Built in: CAMP-HiVe (:mod:`.camp_hive`), the classic baselines (:mod:`.baselines`), the one-shot
peers Wanda (:mod:`.wanda`) and the layer solvers SparseGPT and OBC (:mod:`.layer_solvers`), and
Torch-Pruning's group importances (:mod:`.torch_pruning`), by name through :func:`make_criterion`.
"""
from camphive.pruning.criteria.base import Criterion, Scores
from camphive.pruning.criteria.layer_solvers import LayerSolverCriterion
from camphive.pruning.criteria.registry import (
                                                ALL_CRITERIA,
                                                CHANNEL_ONLY_CRITERIA,
                                                LAYER_SOLVER_CRITERIA,
                                                STRUCTURED_CRITERIA,
                                                WEIGHT_CRITERIA,
                                                canonical_name,
                                                is_camp_hive,
                                                is_layer_solver,
                                                make_criterion,
)

__all__ = ["Criterion", "LayerSolverCriterion", "Scores", "make_criterion", "canonical_name", "is_camp_hive",
           "is_layer_solver", "ALL_CRITERIA", "WEIGHT_CRITERIA", "CHANNEL_ONLY_CRITERIA", "LAYER_SOLVER_CRITERIA",
           "STRUCTURED_CRITERIA"]
