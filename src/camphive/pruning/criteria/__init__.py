"""Importance criteria: objects that score weights and channels (:class:`Criterion`).

Built in: CAMP-HiVe (:mod:`.camp_hive`), the classic baselines (:mod:`.baselines`) and
Torch-Pruning's group importances (:mod:`.torch_pruning`), by name through :func:`make_criterion`.
"""
from camphive.pruning.criteria.base import Criterion, Scores
from camphive.pruning.criteria.registry import (
                                                ALL_CRITERIA,
                                                CHANNEL_ONLY_CRITERIA,
                                                WEIGHT_CRITERIA,
                                                canonical_name,
                                                is_camp_hive,
                                                make_criterion,
)

__all__ = ["Criterion", "Scores", "make_criterion", "canonical_name", "is_camp_hive", "ALL_CRITERIA",
           "WEIGHT_CRITERIA", "CHANNEL_ONLY_CRITERIA"]
