"""Interruptions never lose work: a stopped run resumes to the same result as an uninterrupted one."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from camphive.jobs import prune as prune_module
from camphive.jobs.prune import prune_job
from camphive.jobs.train import train_job


def _tensors(path):
    return load_file(str(path))


def _assert_same(first, second):
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return [sys.executable, "-m", "camphive", *map(str, args)], env


def test_ctrl_c_during_training_then_resume_matches_an_uninterrupted_run(tmp_path):
    # on the CPU: bit-identical weights are the point, and CUDA kernels need not be deterministic
    args = ["train", "--dataset", "synthetic", "--epochs", "6", "--batch-size", "32", "--device", "cpu"]
    command, env = _cli(*args, "--out", tmp_path / "full")
    assert subprocess.run(command, env=env, capture_output=True, timeout=300).returncode == 0

    command, env = _cli(*args, "--out", tmp_path / "cut")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 120
    while not log.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:
        pytest.skip("training finished before the interrupt landed")
    assert process.returncode == 130 and "Traceback" not in stderr and "interrupted" in stderr
    lines = log.read_text().splitlines()
    assert 1 <= len(lines) < 6
    from camphive.checkpoints import load_checkpoint

    load_checkpoint(tmp_path / "cut" / "model.safetensors")  # the last complete checkpoint loads

    command, env = _cli(*args, "--out", tmp_path / "cut", "--resume")
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same(tmp_path / "full" / "model.safetensors", tmp_path / "cut" / "model.safetensors")


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "dense"
    train_job(dataset="synthetic", epochs=1, batch_size=64, out=out, device="cpu")
    return out / "model.safetensors"


PRUNE_SETTINGS = dict(sparsity=0.8, calib_samples=64, finetune_epochs=2, train_subset=128, device="cpu",
                      options={"cycles": 3})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dense_checkpoint):
    """One uninterrupted prune + fine-tune run: the reference every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("resume") / "full"
    return out, prune_job(out=out, checkpoint=dense_checkpoint, **PRUNE_SETTINGS)


def _interrupt_after(monkeypatch, file_name, calls):
    """Make the job stop like Ctrl-C right after it saved ``file_name`` ``calls`` times."""
    original = prune_module.save_checkpoint
    seen = {"count": 0}

    def saving_then_stopping(path, *args, **kwargs):
        written = original(path, *args, **kwargs)
        if os.path.basename(path) == file_name:
            seen["count"] += 1
            if seen["count"] == calls:
                raise KeyboardInterrupt
        return written

    monkeypatch.setattr(prune_module, "save_checkpoint", saving_then_stopping)


@pytest.mark.parametrize("stop_at", [("cycle.safetensors", 1), ("cycle.safetensors", 3), ("model.safetensors", 2)])
def test_prune_and_finetune_resume_to_the_same_result(tmp_path, dense_checkpoint, uninterrupted, monkeypatch, stop_at):
    full_folder, full = uninterrupted
    _interrupt_after(monkeypatch, *stop_at)
    with pytest.raises(KeyboardInterrupt):
        prune_job(out=tmp_path / "cut", checkpoint=dense_checkpoint, **PRUNE_SETTINGS)
    monkeypatch.undo()
    resumed = prune_job(out=tmp_path / "cut", checkpoint=dense_checkpoint, resume=True, **PRUNE_SETTINGS)
    _assert_same(full_folder / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    assert resumed["finetuned"] == full["finetuned"] and resumed["pruned"] == full["pruned"]


def test_resume_without_anything_to_resume_in_a_new_folder_just_runs(tmp_path, dense_checkpoint):
    result = prune_job(checkpoint=dense_checkpoint, out=tmp_path / "new", sparsity=0.5, calib_samples=32,
                       device="cpu", resume=True)
    assert abs(result["prune"]["sparsity"] - 0.5) < 0.01


STRUCTURED_SETTINGS = dict(mode="structured", sparsity=0.5, calib_samples=64, finetune_epochs=1, train_subset=128,
                           device="cpu", options={"cycles": 3, "measure_latency": False})


@pytest.fixture(scope="module")
def uninterrupted_structured(tmp_path_factory, dense_checkpoint):
    out = tmp_path_factory.mktemp("resume") / "full-structured"
    return out, prune_job(out=out, checkpoint=dense_checkpoint, **STRUCTURED_SETTINGS)


@pytest.mark.parametrize("stop_at", [("cycle.safetensors", 1), ("cycle.safetensors", 2), ("model.safetensors", 1)])
def test_structured_prune_resumes_after_a_cycle_to_the_same_smaller_model(tmp_path, dense_checkpoint,
                                                                          uninterrupted_structured, monkeypatch,
                                                                          stop_at):
    from camphive.checkpoints import load_checkpoint

    full_folder, full = uninterrupted_structured
    _interrupt_after(monkeypatch, *stop_at)
    with pytest.raises(KeyboardInterrupt):
        prune_job(out=tmp_path / "cut", checkpoint=dense_checkpoint, **STRUCTURED_SETTINGS)
    monkeypatch.undo()
    if stop_at[0] == "cycle.safetensors":  # the saved cycle holds the smaller model and the state to resume from
        saved = load_checkpoint(tmp_path / "cut" / "cycle.safetensors")
        assert saved.metadata["cycle"] == stop_at[1] and not saved.masks
        assert set(saved.metadata["structured_state"]) >= {"before", "original_sizes", "kept"}
    resumed = prune_job(out=tmp_path / "cut", checkpoint=dense_checkpoint, resume=True, **STRUCTURED_SETTINGS)
    _assert_same(full_folder / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    assert resumed["finetuned"] == full["finetuned"] and resumed["pruned"] == full["pruned"]
    for key in ("channels", "macs_before", "macs_after", "params_after", "sparsity"):
        assert resumed["prune"][key] == full["prune"][key], key
    assert [record["cycle"] for record in resumed["prune"]["cycles"]] == [1, 2, 3]


def test_a_resumed_structured_run_times_the_original_model_itself(tmp_path, dense_checkpoint, monkeypatch):
    settings = {**STRUCTURED_SETTINGS, "finetune_epochs": 0,
                "options": {"cycles": 2, "latency_batch_sizes": (1,), "latency_seconds": 0.05}}
    _interrupt_after(monkeypatch, "cycle.safetensors", 1)
    with pytest.raises(KeyboardInterrupt):
        prune_job(out=tmp_path / "cut", checkpoint=dense_checkpoint, **settings)
    monkeypatch.undo()
    resumed = prune_job(out=tmp_path / "cut", checkpoint=dense_checkpoint, resume=True, **settings)
    latency = resumed["prune"]["latency"]
    assert "skipped" not in latency and latency["batch_1"]["before_ms"] > 0 and latency["batch_1"]["after_ms"] > 0


def test_a_cycle_saved_by_one_mode_is_not_resumed_by_the_other(tmp_path, dense_checkpoint, monkeypatch):
    from camphive.errors import ConfigError

    _interrupt_after(monkeypatch, "cycle.safetensors", 1)
    with pytest.raises(KeyboardInterrupt):
        prune_job(out=tmp_path / "cut", checkpoint=dense_checkpoint, **PRUNE_SETTINGS)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="saved by unstructured pruning; resume with --mode unstructured"):
        prune_job(out=tmp_path / "cut", checkpoint=dense_checkpoint, resume=True, **STRUCTURED_SETTINGS)


@pytest.mark.parametrize("mode", ["unstructured", "structured"])
def test_a_resumed_refit_matches_the_unpruned_model_as_an_uninterrupted_run_does(tmp_path, dense_checkpoint,
                                                                                monkeypatch, mode):
    """The refit's reference is the dense checkpoint, not the model saved after the last completed cycle
    (structured: at the channels each layer kept, which the resume state carries over the interruption)."""
    base = PRUNE_SETTINGS if mode == "unstructured" else STRUCTURED_SETTINGS
    settings = {**base, "finetune_epochs": 0, "options": {**base.get("options", {}), "cycles": 3, "refit": True}}
    full = prune_job(out=tmp_path / "full", checkpoint=dense_checkpoint, **settings)
    assert full["prune"]["refit"]["layers"] > 0
    _interrupt_after(monkeypatch, "cycle.safetensors", 2)
    with pytest.raises(KeyboardInterrupt):
        prune_job(out=tmp_path / "cut", checkpoint=dense_checkpoint, **settings)
    monkeypatch.undo()
    resumed = prune_job(out=tmp_path / "cut", checkpoint=dense_checkpoint, resume=True, **settings)
    _assert_same(tmp_path / "full" / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    assert resumed["pruned"] == full["pruned"]
