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


def test_prune_export_and_spectrum_on_a_trained_checkpoint(tmp_path):
    trained = tmp_path / "train"
    assert run_cli("train", "--dataset", "synthetic", "--epochs", "1", "--out", trained).returncode == 0
    checkpoint = trained / "model.safetensors"
    pruned = tmp_path / "prune"
    result = run_cli("prune", "--checkpoint", checkpoint, "--sparsity", "0.8", "--calib-samples", "128",
                     "--finetune-epochs", "1", "--train-subset", "128", "--out", pruned)
    assert result.returncode == 0, result.stderr
    results = json.loads((pruned / "results.json").read_text())
    assert abs(results["prune"]["sparsity"] - 0.8) < 0.001
    assert results["finetuned"] is not None
    exported = run_cli("export", "--checkpoint", pruned / "model.safetensors", "--onnx", tmp_path / "m.onnx")
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "m.onnx").stat().st_size > 0
    spectrum = run_cli("spectrum", "--checkpoint", checkpoint, "--top-k", "2", "--calib-samples", "64",
                       "--trace-probes", "2", "--no-per-layer", "--out", tmp_path / "spectrum")
    assert spectrum.returncode == 0, spectrum.stderr
    data = json.loads((tmp_path / "spectrum" / "spectrum.json").read_text())
    assert len(data["global"]["eigenvalues"]) == 2 and (tmp_path / "spectrum" / "convergence.png").is_file()


def test_prune_with_a_sparsity_that_empties_layers_is_refused(tmp_path):
    trained = tmp_path / "train"
    assert run_cli("train", "--dataset", "synthetic", "--epochs", "1", "--out", trained).returncode == 0
    result = run_cli("prune", "--checkpoint", trained / "model.safetensors", "--sparsity", "0.999",
                     "--min-keep", "0.05", "--calib-samples", "64", "--out", tmp_path / "p")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "would empty a layer" in result.stderr


def test_structured_prune_from_the_command_line_rounds_channels_and_ignores_layers(tmp_path):
    trained = tmp_path / "train"
    assert run_cli("train", "--dataset", "synthetic", "--epochs", "1", "--out", trained).returncode == 0
    pruned = tmp_path / "prune"
    result = run_cli("prune", "--checkpoint", trained / "model.safetensors", "--mode", "structured",
                     "--target-macs-ratio", "2", "--criterion", "magnitude", "--round-to", "8", "--ignored-layers",
                     "conv1, fc1", "--latency-channels-last", "--calib-samples", "128", "--out", pruned)
    assert result.returncode == 0, result.stderr
    prune = json.loads((pruned / "results.json").read_text())["prune"]
    assert prune["config"]["round_to"] == 8 and prune["config"]["ignored_layers"] == ["conv1", "fc1"]
    assert prune["layer_sparsity"]["conv1"] == 0.0 and prune["layer_sparsity"]["fc1"] == 0.0
    assert prune["channels"] and all(after % 8 == 0 and after < before for before, after in prune["channels"].values())
    assert prune["macs_ratio"] >= 2.0 and prune["latency"]["channels_last"] is True
    speedups = ", ".join(f"{prune['latency'][f'batch_{n}']['speedup']:.2f}x at batch {n}" for n in (1, 64))
    for line in (f"channels removed: {prune['sparsity']:.4f}", f"MACs reduction: {prune['macs_ratio']:.2f}x", "channel counts: multiples of 8 (--round-to)",
                 f"speed-up: {speedups}"):
        assert line in result.stdout, result.stdout
    exported = run_cli("export", "--checkpoint", pruned / "model.safetensors", "--onnx", tmp_path / "m.onnx")
    assert exported.returncode == 0, exported.stderr
    bad = run_cli("prune", "--checkpoint", trained / "model.safetensors", "--mode", "structured", "--sparsity", "0.5",
                  "--ignored-layers", "conv9", "--calib-samples", "64", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "conv9" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_evaluate_and_prune_load_the_synthetic_data_the_checkpoint_was_trained_on(tmp_path, capsys):
    from camphive.cli import main
    from camphive.jobs.prune import prune_job

    assert main(["train", "--dataset", "synthetic", "--dataset-options", "num_classes=20,shape=3x16x16,num_samples=64",
                 "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path / "t"), "--device", "cpu"]) == 0
    trained = json.loads((tmp_path / "t" / "metrics.json").read_text())
    checkpoint = tmp_path / "t" / "model.safetensors"
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["num_samples"] == 64 and metrics["accuracy"] == trained["test"]["accuracy"]
    quick = dict(criterion="magnitude", calib_samples=8, device="cpu", options={"spectrum_top_k": 0})
    results = prune_job(checkpoint=checkpoint, sparsity=0.5, out=tmp_path / "p", **quick)
    assert results["dense"]["accuracy"] == trained["test"]["accuracy"] and results["dense"]["num_samples"] == 64
    # The same dataset named explicitly keeps the recorded options; a pruned checkpoint prunes again.
    again = prune_job(checkpoint=tmp_path / "p" / "model.safetensors", sparsity=0.6, dataset="synthetic",
                      out=tmp_path / "p2", **quick)
    assert again["dense"]["num_samples"] == 64 and abs(again["prune"]["sparsity"] - 0.6) < 0.01
    # spectrum and compare read the recorded data too (compare's --dataset no longer defaults over it).
    assert main(["spectrum", "--checkpoint", str(checkpoint), "--top-k", "1", "--max-iter", "5", "--calib-samples", "8",
                 "--trace-probes", "0", "--no-per-layer", "--out", str(tmp_path / "s")]) == 0
    import yaml

    spectrum_config = yaml.safe_load((tmp_path / "s" / "config.yaml").read_text())
    assert spectrum_config["dataset_options"] == {"num_classes": 20, "shape": [3, 16, 16], "num_samples": 64}
    # A checkpoint that does not record the options (older ones) meets the default data: refused in one line.
    from camphive.checkpoints import load_checkpoint, save_checkpoint

    stored = load_checkpoint(checkpoint)
    older = {key: value for key, value in stored.metadata.items() if key not in ("format", "arch", "dataset_options")}
    save_checkpoint(tmp_path / "older.safetensors", stored.model, **older)
    capsys.readouterr()
    for command in (["evaluate"], ["prune", "--sparsity", "0.5", "--out", str(tmp_path / "p3")]):
        assert main([*command, "--checkpoint", str(tmp_path / "older.safetensors"), "--device", "cpu"]) == 2
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and "inputs of shape 3x32x32 but checkpoint" in error and "made for 3x16x16" in error
    assert not (tmp_path / "p3").exists()


def _help_at_80_columns(command: str) -> str:
    import re

    from typer.testing import CliRunner

    from camphive.cli import app

    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return re.sub(r"\x1b\[[0-9;]*m", "", result.output)  # colours, where the environment forces them


@pytest.mark.parametrize("command, panels", [
    ("prune", {"Pruning", "CAMP-HiVe", "Structured", "Latency (structured)", "Data", "Fine-tuning", "Output"}),
    ("compare", {"Data", "Pruning", "Training (dense and fine-tuning)", "Dense training", "Fine-tuning",
                 "Latency (structured)", "Spectrum", "Output"}),
])
def test_help_in_80_columns_shows_every_option_name_whole_in_panels(command, panels):
    import re

    import typer

    from camphive.cli import app

    text = _help_at_80_columns(command)
    params = typer.main.get_command(app).commands[command].params
    names = [name for param in params for name in (*param.opts, *param.secondary_opts)]
    assert len(names) > 30
    cut = [name for name in names if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text)]
    assert not cut, f"option names cut or missing in {command} --help at 80 columns: {cut}\n{text}"
    assert "…" not in text, text  # no name, default or word shortened
    assert max(len(line) for line in text.splitlines()) <= 80
    assert {param.rich_help_panel for param in params} - {None} == panels
    for panel in panels:
        assert re.search(rf"╭─ {re.escape(panel)} ─", text), f"panel {panel!r} missing\n{text}"


def test_switches_declared_as_two_options_resolve_like_one(tmp_path, monkeypatch, capsys):
    from camphive.cli import main
    from camphive.jobs import compare, prune

    calls = []

    def fake_prune_job(**kwargs):
        calls.append(kwargs["options"])
        return {"dense": {"accuracy": 1.0}, "pruned": {"accuracy": 1.0}, "prune": {"sparsity": 0.5}, "finetuned": None}

    monkeypatch.setattr(prune, "prune_job", fake_prune_job)
    command = ["prune", "--checkpoint", str(tmp_path / "m.safetensors"), "--sparsity", "0.5"]
    assert main(command) == 0
    assert not {"recalibrate_bn", "global_pruning", "latency_channels_last", "latency_compiled"} & set(calls[-1])
    assert main([*command, "--no-recalibrate-bn", "--global-pruning", "--latency-compiled"]) == 0
    assert calls[-1]["recalibrate_bn"] is False and calls[-1]["global_pruning"] is True
    assert calls[-1]["latency_compiled"] is True
    config = tmp_path / "c.yaml"
    config.write_text("latency-channels-last: true\nno_global_pruning: true\n")
    assert main([*command, "--config", str(config), "--no-latency-channels-last", "--global-pruning"]) == 0
    assert calls[-1]["latency_channels_last"] is False and calls[-1]["global_pruning"] is True  # command line wins
    assert main([*command, "--config", str(config)]) == 0
    assert calls[-1]["latency_channels_last"] is True and calls[-1]["global_pruning"] is False
    capsys.readouterr()
    assert main([*command, "--latency-compiled", "--no-latency-compiled"]) == 2
    assert "--latency-compiled and --no-latency-compiled contradict" in capsys.readouterr().err

    compared = []
    monkeypatch.setattr(compare, "compare_job",
                        lambda **kwargs: compared.append(kwargs) or {"headline": "", "seconds": 0.0})
    assert main(["compare", "--out", str(tmp_path / "c")]) == 0
    assert compared[-1]["latency"] is True and compared[-1]["latency_channels_last"] is False
    assert compared[-1]["latency_compiled"] is False and not any(key.startswith("no_") for key in compared[-1])
    assert main(["compare", "--out", str(tmp_path / "c"), "--no-latency", "--latency-channels-last"]) == 0
    assert compared[-1]["latency"] is False and compared[-1]["latency_channels_last"] is True


def test_structured_summary_says_when_the_macs_target_was_missed_and_the_default_rounding():
    from camphive.cli.pruning_commands import structured_summary

    summary = structured_summary({"macs_ratio": 2.6, "target_macs_ratio": 3.0, "target_reached": False,
                                  "config": {"round_to": 16, "round_min_group": 16}, "latency": None})
    assert summary == {"MACs reduction": "2.60x (target 3x not reached)",
                       "channel counts": "multiples of 16 in groups of >= 16 channels (--round-to)"}
    assert structured_summary({"macs_ratio": 2.0, "config": {"round_to": 1},
                               "latency": {"skipped": "resumed run"}}) == {"MACs reduction": "2.00x"}
    allocation = {"predicted_speedup_over_uniform": 1.0412, "changed_groups": 3, "timed_shapes": 40,
                  "timing_seconds": 2.04, "search_seconds": 2.5, "kept_uniform_because": None}
    summary = structured_summary({"macs_ratio": 2.0, "config": {"round_to": 16}, "latency_allocation": allocation})
    assert summary["latency-aware rounding"] == ("3 groups rounded the other way, predicted 1.04x faster than uniform "
                                                 "(40 layer shapes timed in 2.0 s)")
    summary = structured_summary({"macs_ratio": 2.0, "config": {"round_to": 16},
                                  "latency_allocation": {**allocation, "changed_groups": 0}})
    assert summary["latency-aware rounding"] == "the uniform rounding was the fastest (40 layer shapes timed in 2.0 s)"
    summary = structured_summary({"macs_ratio": 2.0, "config": {"round_to": 16},
                                  "latency_allocation": {**allocation, "changed_groups": 0, "runtime": "onnxruntime"}})
    assert summary["latency-aware rounding"] == ("the uniform rounding was the fastest (40 layer shapes timed in "
                                                 "onnxruntime, in 2.0 s)")


@pytest.mark.parametrize("setting, kept", [(None, False), ("default", False), ("keep", True), ("KEEP", True)])
def test_the_command_keeps_freed_memory_only_when_asked(monkeypatch, setting, kept):
    import camphive.cli.entry as entry
    import camphive.measure.allocator as allocator

    calls = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: calls.append("kept") or "pinned")
    monkeypatch.setattr(entry, "main", lambda argv=None: 0)
    monkeypatch.setattr(entry.progress, "set_enabled", lambda enabled: None)  # leave this process's progress alone
    if setting is None:
        monkeypatch.delenv("CAMPHIVE_MALLOC", raising=False)
    else:
        monkeypatch.setenv("CAMPHIVE_MALLOC", setting)
    with pytest.raises(SystemExit) as exited:
        entry._entry()
    assert exited.value.code == 0 and calls == (["kept"] if kept else [])
