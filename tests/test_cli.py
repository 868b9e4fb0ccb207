"""The CLI as a user meets it: a subprocess, its exit code and what it prints."""
import json
import os
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "camphive", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_train_then_evaluate_on_synthetic_data(tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "64", "--out", out)
    assert result.returncode == 0, result.stderr
    for name in ("config.yaml", "metrics.json", "model.safetensors", "log.txt"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    evaluated = run_cli("evaluate", "--checkpoint", out / "model.safetensors")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "accuracy" in evaluated.stdout


def test_config_file_fills_options_and_command_line_wins(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("dataset: synthetic\nepochs: 3\nbatch-size: 64\n")
    out = tmp_path / "run"
    result = run_cli("train", "--config", config, "--epochs", "1", "--out", out)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["epochs"] == 1


@pytest.mark.parametrize("args, message", [
    (["train", "--model", "nope", "--dataset", "synthetic"], "unknown model 'nope'"),
    (["train", "--dataset", "nope"], "unknown dataset 'nope'"),
    (["train", "--dataset", "cifar10", "--data-root", "/nonexistent"], "/nonexistent"),
    (["evaluate", "--checkpoint", "/nonexistent/model.safetensors"], "does not exist"),
])
def test_bad_input_gives_one_line_and_no_traceback(tmp_path, args, message):
    result = run_cli(*args, "--out", tmp_path / "o") if args[0] == "train" else run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoint_gives_one_line(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x00" * 10)
    result = run_cli("evaluate", "--checkpoint", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "truncated or not a safetensors file" in result.stderr
