"""Gradual pruning during fine-tuning: the cubic schedule counted exactly, masks that only grow, and the CLI."""
import json
import math

import pytest
import torch

import camphive
from camphive import gradual
from camphive.errors import ConfigError
from camphive.gradual import gradual_targets, prune_gradually, pruning_positions
from tests.pruning.cases import image_batches, tiny_cnn
from tests.test_cli import run_cli


def _cubic(sparsity, k, steps, initial=0.0):
    return initial + (sparsity - initial) * (1.0 - (1.0 - k / steps) ** 3)


def test_pruning_steps_are_evenly_spaced_from_step_0_and_leave_the_last_fifth_to_recover():
    assert pruning_positions(100, 4) == [0, 20, 40, 60]
    assert pruning_positions(20, 5) == [0, 3, 6, 9, 12]
    assert pruning_positions(10, 1) == [0]
    for total, steps in ((37, 6), (1000, 10), (5, 4)):
        positions = pruning_positions(total, steps)
        assert positions[0] == 0 and len(set(positions)) == steps and positions[-1] < 0.8 * total
    with pytest.raises(ConfigError, match="lower pruning_steps or train longer"):
        pruning_positions(10, 9)


def test_targets_follow_the_cubic_schedule_and_end_exactly_at_the_sparsity():
    targets = gradual_targets(0.9, 7)
    assert targets[-1] == 0.9
    for k, target in enumerate(targets, start=1):
        assert math.isclose(target, _cubic(0.9, k, 7), rel_tol=1e-12)
    assert all(b > a for a, b in zip(targets, targets[1:]))
    assert gradual_targets(0.8, 4, initial=0.5)[0] == pytest.approx(_cubic(0.8, 1, 4, 0.5))
    with pytest.raises(ConfigError, match="already 0.9000 sparse"):
        gradual_targets(0.5, 3, initial=0.9)


class _Watched:
    """Wraps ``camphive.train`` so each ``on_step`` call first checks the weights the last optimizer step left."""

    def __init__(self, monkeypatch):
        self.masks, self.checked_steps, self.snapshots = None, 0, []
        original = gradual.train

        def train(model, data, epochs, *, on_step, **options):
            def watched(step, total):
                self.check(model)
                returned = on_step(step, total)
                if returned is not None:
                    if self.masks is not None:  # pruned stays pruned
                        assert all(bool((returned[name] <= self.masks[name]).all()) for name in self.masks)
                    self.masks = {name: mask.clone() for name, mask in returned.items()}
                    self.snapshots.append(self.masks)
                return returned

            result = original(model, data, epochs, on_step=watched, **options)
            self.check(model)
            return result

        monkeypatch.setattr(gradual, "train", train)

    def check(self, model):
        if self.masks is None:
            return
        parameters = dict(model.named_parameters())
        for name, mask in self.masks.items():
            assert bool((parameters[name].detach()[~mask] == 0).all()), name  # exact zeros
        self.checked_steps += 1


@pytest.mark.parametrize("criterion", ["camp-hive", "magnitude"])
def test_each_pruning_step_reaches_the_cubic_count_exactly_and_masks_only_grow(criterion, monkeypatch):
    watched = _Watched(monkeypatch)
    model, steps, sparsity = tiny_cnn(), 5, 0.8
    records = []
    result, trained = prune_gradually(model, image_batches(batches=10, seed=1), image_batches(), sparsity, epochs=2,
                                      pruning_steps=steps, device="cpu", criterion=criterion,
                                      on_pruning_step=records.append)
    total = sum(mask.numel() for mask in result.masks.values())
    assert [record["step"] for record in records] == [0, 3, 6, 9, 12]  # 20 training steps, the last 4 recover
    for k, record in enumerate(records, start=1):
        assert record["pruned_weights"] == round(_cubic(sparsity, k, steps) * total), k
        assert record["target"] == pytest.approx(_cubic(sparsity, k, steps))
    assert sum(int((~mask).sum()) for mask in result.masks.values()) == round(sparsity * total)
    assert result.sparsity == round(sparsity * total) / total and result.cycles == records
    assert len(watched.snapshots) == steps and watched.checked_steps == 20  # 19 steps checked by the next one + end
    assert len(trained.history) == 2 and result.config["gradual"]["training_steps"] == [0, 3, 6, 9, 12]
    assert result.config["criterion"] == criterion and result.config["merge"] == (
        "least_squares" if criterion == "camp-hive" else "none")


def test_masks_given_stay_pruned_and_the_schedule_starts_from_their_sparsity():
    model, calib = tiny_cnn(), image_batches()
    first = camphive.prune(model, calib, 0.5, criterion="magnitude")
    result, _ = prune_gradually(model, image_batches(batches=10, seed=1), calib, 0.8, epochs=1, pruning_steps=2,
                                masks=first.masks, device="cpu", criterion="magnitude")
    total = sum(mask.numel() for mask in first.masks.values())
    start = round(0.5 * total) / total
    assert result.cycles[0]["pruned_weights"] == round(_cubic(0.8, 1, 2, start) * total)
    for name, mask in first.masks.items():
        assert not bool((result.masks[name] & ~mask).any()), name


@pytest.mark.parametrize("options, message", [
    ({"cycles": 3}, "drop cycles"),
    ({"schedule": "cubic"}, "drop schedule"),
    ({"mode": "structured"}, "masks single weights"),
    ({"epochs": 0}, "pass epochs >= 1"),
    ({"pruning_steps": 50}, "lower pruning_steps or train longer"),
    ({"min_keep": 0.5}, "lower the sparsity or min_keep"),
])
def test_bad_settings_fail_before_any_training(options, message):
    model = tiny_cnn()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    arguments = {"epochs": 1, "pruning_steps": 2, **options}
    with pytest.raises(ConfigError, match=message):
        prune_gradually(model, image_batches(batches=4), image_batches(), 0.8, device="cpu", **arguments)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("gradual") / "dense"
    result = run_cli("train", "--dataset", "synthetic", "--epochs", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    return out / "model.safetensors"


def test_cli_prunes_gradually_during_fine_tuning(tmp_path, tiny_checkpoint):
    out = tmp_path / "gradual"
    result = run_cli("prune", "--checkpoint", tiny_checkpoint, "--sparsity", "0.8", "--calib-samples", "64",
                     "--schedule", "gradual", "--finetune-epochs", "2", "--pruning-steps", "3", "--criterion",
                     "magnitude", "--device", "cpu", "--out", out)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    steps = results["prune"]["cycles"]  # 512 samples in batches of 128: 8 training steps, 6 before recovery
    assert [step["step"] for step in steps] == [0, 2, 4]
    assert [step["target"] for step in steps] == pytest.approx([_cubic(0.8, k, 3) for k in (1, 2, 3)])
    assert abs(results["prune"]["sparsity"] - 0.8) < 1e-3 and results["pruned"] is None
    assert 0.0 <= results["finetuned"]["accuracy"] <= 1.0 and "fine-tuned accuracy" in result.stdout
    stored = camphive.load_checkpoint(out / "model.safetensors")
    parameters = dict(stored.model.named_parameters())
    assert all(bool((parameters[name][~mask] == 0).all()) for name, mask in stored.masks.items())
    assert (out / "model.sparse.safetensors").is_file()


@pytest.mark.parametrize("args, message", [
    (["--schedule", "gradual"], "pass --finetune-epochs"),
    (["--schedule", "gradual", "--finetune-epochs", "1", "--mode", "structured"], "use --mode unstructured"),
    (["--schedule", "gradual", "--finetune-epochs", "1", "--cycles", "2"], "drop --cycles"),
    (["--pruning-steps", "4"], "applies to --schedule gradual"),
])
def test_cli_refuses_gradual_runs_it_cannot_do_in_one_line(tmp_path, tiny_checkpoint, args, message):
    result = run_cli("prune", "--checkpoint", tiny_checkpoint, "--sparsity", "0.5", *args, "--out", tmp_path / "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "o").exists()
