"""Pruning settings checked without a model or data (what jobs run before any work starts)."""
import pytest

from camphive.errors import ConfigError
from camphive.pruning.core.settings import check_prune_settings


def test_check_prune_settings_accepts_what_prune_accepts():
    check_prune_settings("unstructured", "camp-hive", 0.9, None, {"score": "obs", "merge": "curvature", "cycles": 2,
                                                                   "damping": 1e-3, "min_keep": 5, "top_k": 4})
    check_prune_settings("structured", "camp-hive", None, 2.0, {"round_to": 8, "merge": "pair", "min_channels": 0.1,
                                                                "global_pruning": True, "channel_score": "summed",
                                                                "score": "obs"})
    check_prune_settings("structured", "tp-magnitude", 0.5, None, {"ignored_layers": ["conv1"]})
    with pytest.raises(ConfigError, match="min_keep must be >= 0"):
        check_prune_settings("unstructured", "magnitude", 0.5, None, {"min_keep": -1})
    with pytest.raises(ConfigError, match="recalibrate_bn=1 must be bool"):
        check_prune_settings("unstructured", "magnitude", 0.5, None, {"recalibrate_bn": 1})
    with pytest.raises(ConfigError, match="unknown option.*seed"):  # set by the jobs themselves
        check_prune_settings("unstructured", "magnitude", 0.5, None, {"seed": 1})


def test_settings_that_belong_to_the_other_mode_are_named():
    with pytest.raises(ConfigError, match="round_to apply to structured pruning only"):
        check_prune_settings("unstructured", "magnitude", 0.5, None, {"round_to": 8})
    with pytest.raises(ConfigError, match="selection apply to unstructured pruning"):
        check_prune_settings("structured", "magnitude", 0.5, None, {"selection": "layer"})
    with pytest.raises(ConfigError, match="target-macs-ratio needs --mode structured"):
        check_prune_settings("unstructured", "magnitude", None, 2.0, {})
