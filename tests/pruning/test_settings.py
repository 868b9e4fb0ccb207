"""Pruning settings checked without a model or data (what jobs run before any work starts)."""
import pytest

from camphive.errors import ConfigError
from camphive.pruning.settings import check_prune_settings


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


# --- typed settings: built once, checked once, refused rather than dropped ------------------------------

import dataclasses  # noqa: E402

import torch  # noqa: E402

from camphive.errors import DataError  # noqa: E402
from camphive.pruning import StructuredSettings, UnstructuredSettings, prune, settings_for  # noqa: E402
from tests.pruning.cases import image_batches, tiny_cnn  # noqa: E402


def test_settings_are_frozen_resolved_and_checked_on_construction():
    settings = UnstructuredSettings(sparsity=0.9)
    assert (settings.merge, settings.cycles, settings.refit, settings.loss_weighting, settings.spectrum_top_k) == \
        ("least_squares", 1, True, "batchnorm", 0)  # CAMP-HiVe's measured defaults; no sharpness report by default
    assert UnstructuredSettings(sparsity=0.9, refit=False).cycles == 3  # without the refit, three cycles
    magnitude = UnstructuredSettings(sparsity=0.9, criterion="magnitude")
    assert (magnitude.merge, magnitude.refit, magnitude.cycles) == ("none", False, 1)  # the peers' published form
    assert StructuredSettings(target_macs_ratio=2.0).refit and not StructuredSettings(target_macs_ratio=2.0,
                                                                                      criterion="tp-taylor").refit
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.sparsity = 0.5
    with pytest.raises(ConfigError, match="unknown merge 'lsq'; use one of"):
        UnstructuredSettings(sparsity=0.9, merge="lsq")
    with pytest.raises(ConfigError, match="option top_k=2.5 must be int"):
        UnstructuredSettings(sparsity=0.9, top_k=2.5)
    assert StructuredSettings(target_macs_ratio=2.0).channel_score == "greedy_obs"
    with pytest.raises(ConfigError, match="exactly one of sparsity"):
        StructuredSettings(sparsity=0.5, target_macs_ratio=2.0)
    with pytest.raises(ConfigError, match="scores channel groups only"):
        UnstructuredSettings(sparsity=0.5, criterion="tp-magnitude")


@pytest.mark.parametrize("option", ["scope", "schedule", "top_k", "recovery_steps", "recovery_lr", "clip",
                                    "eigen_method", "hutchinson_probes", "loss_diagonal", "spectrum_top_k",
                                    "selection", "min_keep"])
def test_unstructured_only_options_are_refused_in_structured_mode_never_dropped(option):
    value = UnstructuredSettings(sparsity=0.5).to_dict()[option]
    with pytest.raises(ConfigError, match=f"{option} apply to unstructured pruning only"):
        settings_for("structured", sparsity=0.5, **{option: value})
    with pytest.raises(ConfigError, match=f"{option} apply to unstructured pruning only"):
        prune(tiny_cnn(), image_batches(), 0.5, mode="structured", **{option: value})


def test_structured_only_options_are_refused_in_unstructured_mode():
    with pytest.raises(ConfigError, match="round_to apply to structured pruning only"):
        prune(tiny_cnn(), image_batches(), 0.5, round_to=8)


def test_prune_takes_a_settings_object_and_gives_the_same_model_as_keywords():
    by_keywords, by_settings = tiny_cnn(), tiny_cnn()
    prune(by_keywords, image_batches(), 0.6, criterion="magnitude", cycles=2)
    result = prune(by_settings, image_batches(), settings=UnstructuredSettings(sparsity=0.6, criterion="magnitude",
                                                                                cycles=2))
    for a, b in zip(by_keywords.parameters(), by_settings.parameters()):
        assert torch.equal(a, b)
    assert result.config["cycles"] == 2 and result.config["mode"] == "unstructured"
    with pytest.raises(ConfigError, match="either settings or"):
        prune(tiny_cnn(), image_batches(), 0.6, settings=UnstructuredSettings(sparsity=0.6))


def test_user_facing_errors_are_also_the_builtins_callers_catch():
    with pytest.raises(ValueError):
        prune(tiny_cnn(), image_batches(), 1.5)
    with pytest.raises(ValueError) as caught:
        prune(tiny_cnn(), [], 0.5)
    assert isinstance(caught.value, DataError)
