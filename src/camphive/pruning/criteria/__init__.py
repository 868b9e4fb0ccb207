"""Importance criteria: objects that score weights (and, summed over a group, channels)."""
from camphive.pruning.criteria.base import CRITERIA, CampHive, Criterion, make_criterion

__all__ = ["Criterion", "CampHive", "CRITERIA", "make_criterion"]
