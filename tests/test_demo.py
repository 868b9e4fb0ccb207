"""The main job (``camphive demo``) end to end, on tiny Fashion-MNIST files in the official
idx format: dense training, both criteria at a sparsity, fine-tuning, report and plot."""
import json

import torch

from camphive.checkpoints import load_checkpoint
from camphive.jobs.demo import demo_job
from tests.data.official_formats import random_idx_data, write_idx_split


def test_demo_writes_its_report_from_a_trained_model_and_reuses_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CAMPHIVE_CACHE", str(tmp_path / "cache"))
    for split, count, seed in (("train", 96, 0), ("test", 48, 1)):
        write_idx_split(tmp_path / "fmnist", split, *random_idx_data(count, seed))
    options = dict(data_root=str(tmp_path / "fmnist"), epochs=1, sparsities=(0.5, 0.9), finetune_samples=32,
                   calib_samples=16, device="cpu")
    result = demo_job(out=tmp_path / "run", **options)
    run = tmp_path / "run"
    assert {"report.md", "results.json", "accuracy.png", "dense.safetensors", "config.yaml"} <= {
        path.name for path in run.iterdir()}
    saved = json.loads((run / "results.json").read_text())
    assert [(row["criterion"], row["sparsity"]) for row in saved["rows"]] == [
        ("camp-hive", 0.5), ("magnitude", 0.5), ("camp-hive", 0.9), ("magnitude", 0.9)]
    dense = load_checkpoint(run / "dense.safetensors").model
    prunable = sum(p.numel() for name, p in dense.named_parameters() if name.endswith("weight") and p.dim() > 1)
    for row in saved["rows"]:  # the pruned models really hold the sparsity they report
        assert abs(row["nonzero_weights"] / prunable - (1 - row["sparsity"])) < 0.01
        assert 0.0 <= row["pruned"] <= 1.0 and 0.0 <= row["finetuned"] <= 1.0
    report = (run / "report.md").read_text()
    assert report.count("| camp-hive |") == 2 and report.count("| magnitude |") == 2 and "accuracy.png" in report
    assert result["summary"].startswith("dense small-cnn on fashion-mnist") and not saved["dense_from_cache"]
    again = demo_job(out=tmp_path / "run2", **options)  # the cached dense model, the same numbers
    assert again["dense_from_cache"] and again["dense"]["accuracy"] == saved["dense"]["accuracy"]
    assert torch.equal(load_checkpoint(tmp_path / "run2" / "dense.safetensors").model.conv1.weight, dense.conv1.weight)
