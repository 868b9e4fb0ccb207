"""Every recipe in configs/ runs: loaded through ``camphive compare --config``, with its
budget overridden on the command line (1 epoch, a few samples, one target, cheap criteria)
on synthetic data of the recipe's input shape and class count.

ImageNet recipes run at 3x224x224 with 100 classes instead of 1000: the synthetic generator
draws one full-size pattern per class, and 1000 of them at 224x224 take 0.6 GB. The head's
width is the only thing this changes.
"""
import json
from pathlib import Path

import pytest
import yaml

from camphive.cli import main
from camphive.jobs.compare_options import parse_list

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
SYNTHETIC = {  # dataset -> (shape, classes) of the stand-in data
    "fashion-mnist": ("1x28x28", 10),
    "cifar10": ("3x32x32", 10),
    "cifar100": ("3x32x32", 100),
    "imagenet": ("3x224x224", 100),
}
# Structured CAMP-HiVe on MobileNetV2 and ResNet-18 takes 10-90 s even on 4 images (its channel
# merging, not the recipe), so those smoke runs use magnitude only; CAMP-HiVe runs on the rest.
CHEAP_CAMP_HIVE = {"small-cnn", "resnet56"}


def test_the_paper_settings_have_recipes():
    names = {path.stem for path in RECIPES}
    for expected in ("resnet56-cifar10", "resnet18-cifar10", "resnet18-cifar100", "mobilenetv2-cifar10",
                     "mobilenetv2-cifar100", "resnet18-imagenet", "mobilenetv2-imagenet"):
        assert expected in names


@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_recipe_runs_on_synthetic_data_with_a_tiny_budget(recipe, tmp_path):
    settings = yaml.safe_load(recipe.read_text())
    shape, classes = SYNTHETIC[settings["dataset"]]
    criteria = ["camp-hive", "magnitude"] if settings["model"] in CHEAP_CAMP_HIVE else ["magnitude"]
    assert set(criteria) <= set(settings["criteria"])
    target_option = "--macs-ratios" if settings.get("macs_ratios") else "--sparsities"
    # The hardest target: the smallest pruned model is the quickest to prune, fine-tune and evaluate.
    target = max(parse_list(settings.get("macs_ratios") or settings["sparsities"], float))
    out = tmp_path / "run"
    argv = ["compare", "--config", str(recipe), "--dataset", "synthetic", "--out", str(out),
            "--dataset-options", f"num_samples=8,num_classes={classes},shape={shape}",
            "--criteria", ",".join(criteria), target_option, str(target), "--dense-epochs", "1",
            "--finetune-epochs", "1", "--batch-size", "4", "--train-subset", "8", "--finetune-subset", "8",
            "--test-subset", "8", "--calib-samples", "4", "--calib-batch-size", "4", "--spectrum-top-k", "0",
            "--no-latency", "--num-workers", "0", "--device", "cpu"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [row["criterion"] for row in results["rows"]] == criteria
    assert all(row["target"] == target for row in results["rows"])
    saved = yaml.safe_load((out / "config.yaml").read_text())
    # Every setting of the recipe that the command line did not override is the one the run used.
    kept = {key: value for key, value in settings.items() if f"--{key.replace('_', '-')}" not in argv}
    assert kept and {key: saved[key] for key in kept} == kept
    assert saved["config_file"] == str(recipe)
    assert results["headline"] and (out / "report.html").is_file()
