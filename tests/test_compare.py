"""``camphive compare`` end to end on tiny synthetic data: fairness, files, resume, config precedence."""
import copy
import csv
import html
import json

import pytest
import torch
import yaml

from camphive import data as datasets
from camphive.checkpoints import load_checkpoint, save_checkpoint
from camphive.cli import main
from camphive.errors import ConfigError
from camphive.jobs.common import calibration_batches, checkpoint_metadata, load_splits, model_for
from camphive.jobs.compare import compare_job
from camphive.jobs.compare_options import DEFAULT_CRITERIA, check_plan, parse_list, parse_options
from camphive.pruning import prune
from camphive.pruning.core.batchnorm import recalibrate_batchnorm
from camphive.training import evaluate, train

DATA = {"num_samples": 48, "shape": [1, 8, 8]}
TINY = dict(model="small-cnn", dataset="synthetic", dataset_options=DATA, dense_epochs=1, finetune_epochs=1,
            batch_size=16, calib_samples=16, calib_batch_size=16, spectrum_top_k=2, spectrum_max_iter=6, seed=3,
            device="cpu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    # Module fixtures run before conftest's per-test single-thread setting; 2 threads on a busy machine are 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("compare") / "run"
        yield out, compare_job(out=out, criteria="camp-hive,magnitude", sparsities="0.8,0.9", **TINY)
    finally:
        torch.set_num_threads(threads)


def test_compare_writes_results_tables_and_a_self_contained_report(tiny_run):
    out, results = tiny_run
    rows = results["rows"]
    assert [(row["target"], row["criterion"]) for row in rows] == [
        (0.8, "camp-hive"), (0.8, "magnitude"), (0.9, "camp-hive"), (0.9, "magnitude")]
    for row in rows:
        assert row["sparsity"] == pytest.approx(row["target"], abs=0.01)
        assert 0 <= row["pruned"] <= 1 and 0 <= row["finetuned"] <= 1
        assert row["parameters"] < results["dense"]["parameters"]
        assert len(row["finetune_history"]) == 1
    dense = results["dense"]
    assert dense["reference"] == "recalibrated" and dense["reference_accuracy"] == dense["recalibrated"]["accuracy"]
    assert results["headline"].startswith("At sparsity 0.9, after fine-tuning: CAMP-HiVe ")
    assert f"dense model {dense['reference_accuracy']:.1%} with BatchNorm re-estimated" in results["headline"]
    assert json.loads((out / "results.json").read_text())["headline"] == results["headline"]
    table = list(csv.DictReader((out / "results.csv").open()))
    assert [line["criterion"] for line in table] == ["camp-hive", "magnitude"] * 2
    assert float(table[3]["pruned"]) == rows[3]["pruned"]
    assert results["headline"] in (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    assert html.escape(results["headline"]) in page
    assert page.count('src="data:image/png;base64,') == 3  # accuracy, per-layer sparsity, eigenvalue convergence
    assert "http://" not in page and "https://" not in page
    assert results["spectrum"]["global"]["eigenvalues"] and results["spectrum"]["num_matvecs"] > 0
    # The compressed file of each fine-tuned model, beside its accuracy: below the dense checkpoint, smaller when sparser.
    sizes = {(row["target"], row["criterion"]): row["file_bytes"] for row in rows}
    assert all(size < dense["file_bytes"] for size in sizes.values())
    assert sizes[(0.9, "camp-hive")] < sizes[(0.8, "camp-hive")] and sizes[(0.9, "magnitude")] < sizes[(0.8, "magnitude")]
    assert "| file MB |" in (out / "report.md").read_text()


def test_every_criterion_starts_from_the_same_dense_model_and_calibration_data(tiny_run):
    out, results = tiny_run
    dense = load_checkpoint(out / "dense.safetensors").model
    splits = load_splits("synthetic", **DATA)
    test = datasets.loader(splits.test, batch_size=256)
    assert evaluate(dense, test)["accuracy"] == results["dense"]["accuracy"]
    calib = calibration_batches("synthetic", None, 16, 16, 3, **DATA)
    for row in results["rows"]:
        if row["criterion"] == "magnitude":
            model = copy.deepcopy(dense)
            prune(model, calib, row["target"], criterion="magnitude", seed=3, spectrum_top_k=0)
            assert evaluate(model, test)["accuracy"] == row["pruned"]


def test_logs_are_written_per_criterion_as_it_goes(tiny_run):
    out, _ = tiny_run
    for criterion in ("camp-hive", "magnitude"):
        events = [json.loads(line) for line in (out / "logs" / f"{criterion}.jsonl").read_text().splitlines()]
        assert [event["event"] for event in events] == ["pruned", "finetune_epoch", "finetuned"] * 2
        assert [event["target"] for event in events] == [0.8] * 3 + [0.9] * 3
    assert len((out / "dense_metrics.jsonl").read_text().splitlines()) == 1
    assert len((out / "rows.jsonl").read_text().splitlines()) == 4
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["criteria"] == ["camp-hive", "magnitude"] and config["targets"] == [0.8, 0.9]
    assert config["machine"]["torch"] == torch.__version__


def test_resume_redoes_only_missing_rows_and_gets_the_same_numbers(tmp_path):
    out = tmp_path / "run"
    settings = dict(TINY, spectrum_top_k=0, out=out, criteria="magnitude,random", sparsities="0.9")
    first = compare_job(**settings)
    lines = (out / "rows.jsonl").read_text().splitlines()
    (out / "rows.jsonl").write_text(lines[0] + "\n")  # as if stopped before the second criterion finished
    again = compare_job(**settings, resume=True)
    for before, after in zip(first["rows"], again["rows"]):
        assert (after["criterion"], after["pruned"], after["finetuned"]) == (before["criterion"], before["pruned"],
                                                                           before["finetuned"])
    assert again["dense"]["accuracy"] == first["dense"]["accuracy"]
    assert "reusing the dense model" in (out / "log.txt").read_text()
    assert len((out / "logs" / "random.jsonl").read_text().splitlines()) == 6  # done twice, logged twice
    with pytest.raises(ConfigError, match="different settings.*criteria"):
        compare_job(**{**settings, "criteria": "magnitude"}, resume=True)


def test_compare_from_a_checkpoint_in_structured_mode(tmp_path):
    splits = load_splits("synthetic", **DATA)
    torch.manual_seed(0)
    model = model_for("small-cnn", splits)
    save_checkpoint(tmp_path / "dense.safetensors", model, **checkpoint_metadata(splits))
    settings = dict(TINY, dense_epochs=5, finetune_epochs=0, spectrum_top_k=0, dataset=None)  # from the checkpoint
    results = compare_job(**settings, out=tmp_path / "run", checkpoint=tmp_path / "dense.safetensors", mode="structured",
                          macs_ratios="2", criteria="tp-magnitude,camp-hive", latency_batch_sizes="1",
                          latency_seconds=0.02, latency_channels_last=True, prune_options="round_to=8")
    assert results["dense"]["train"] == {"checkpoint": str(tmp_path / "dense.safetensors")}
    for row in results["rows"]:
        assert row["macs_ratio"] >= 1.9 and row["finetuned"] is None
        assert row["latency_after_ms"] > 0 and row["speedup"] > 0 and row["latency_batch"] == 1
        assert row["latency"]["channels_last"] is True and row["latency"]["compiled"] is False
        timing = row["latency"]["batch_1"]  # compare_latency's layout, as prune's result.extra["latency"]
        assert (timing["before_ms"], timing["after_ms"]) == (row["latency_before_ms"], row["latency_after_ms"])
        assert row["file_bytes"] < results["dense"]["file_bytes"]  # the smaller checkpoint of the narrower model
    assert results["headline"].startswith("At MACs reduction 2x, right after pruning: CAMP-HiVe ")
    page = (tmp_path / "run" / "report.html").read_text()
    assert "speedup" in page and "after fine-tuning" not in page.split("<table>")[1]


def test_cli_config_file_fills_options_and_the_command_line_wins(tmp_path, capsys):
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump({
        "dataset": "synthetic", "dataset_options": DATA, "criteria": ["magnitude", "taylor"], "sparsities": [0.6, 0.7],
        "dense-epochs": 2, "finetune_epochs": 0, "batch_size": 16, "calib_samples": 8, "spectrum_top_k": 0,
        "seed": 5, "prune_options": {"spectrum_top_k": 1}}))
    out = tmp_path / "run"
    code = main(["compare", "--config", str(config), "--criteria", "random", "--dense-epochs", "1", "--out", str(out),
                 "--device", "cpu"])
    assert code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["criteria"] == ["random"] and saved["dense_epochs"] == 1  # the command line wins
    assert saved["targets"] == [0.6, 0.7] and saved["seed"] == 5 and saved["dataset_options"] == DATA  # the file fills in
    assert saved["finetune_lr"] == 0.01 and saved["config_file"] == str(config)  # defaults for the rest
    assert len(json.loads((out / "dense_train.json").read_text())["history"]) == 1
    assert "At sparsity 0.7" in capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all(isinstance(row["sharpness_after"], float) for row in rows)  # asked for in prune_options
    assert "top Hessian eigenvalue" in (out / "report.html").read_text()


def test_cli_reports_a_bad_plan_in_one_line_before_any_work(tmp_path, capsys):
    code = main(["compare", "--dataset", "synthetic", "--criteria", "camp-hive,nope", "--out", str(tmp_path / "r")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "unknown criterion 'nope'" in error
    assert not (tmp_path / "r").exists()


def test_parse_list_and_options():
    assert parse_list("0.5, 0.8,0.9", float) == [0.5, 0.8, 0.9]
    assert parse_list("[0.5, 0.8]", float) == [0.5, 0.8]  # a YAML list reaching a text option
    assert parse_list("['camp-hive', 'magnitude']") == ["camp-hive", "magnitude"]
    assert parse_list((1, 64), int) == [1, 64] and parse_list(None) == []
    assert parse_options("num_classes=100,shape=3x32x32,noise=0.5,name=x") == {
        "num_classes": 100, "shape": [3, 32, 32], "noise": 0.5, "name": "x"}
    assert parse_options("shape=[3, 16, 16],noise=1") == {"shape": [3, 16, 16], "noise": 1}
    assert parse_options("{'shape': [3, 32, 32], 'num_classes': 100}") == {"shape": [3, 32, 32], "num_classes": 100}
    assert parse_options(None) == {} and parse_options({"a": 1}) == {"a": 1}
    with pytest.raises(ConfigError, match="is not key=value"):
        parse_options("num_classes")
    with pytest.raises(ConfigError, match="not float"):
        parse_list("0.5,x", float, "sparsities")


@pytest.mark.parametrize("mode, criteria, sparsities, ratios, message", [
    ("unstructured", "camp-hive,nope", "0.5", None, "unknown criterion 'nope'"),
    ("unstructured", "tp-magnitude", "0.5", None, "not available for unstructured"),
    ("unstructured", "magnitude,magnitude", "0.5", None, "twice"),
    ("unstructured", "magnitude", "0.5", "2", "needs --mode structured"),
    ("structured", "magnitude", "0.5", "1.0", "must all be > 1"),
    ("unstructured", "magnitude", "0.5,1.0", None, r"must lie in \(0, 1\)"),
    ("sideways", "magnitude", "0.5", None, "unknown --mode"),
    ("structured", "camp-hive,sparsegpt", None, "2", "'sparsegpt' is not available for structured"),
])
def test_bad_plans_are_refused(mode, criteria, sparsities, ratios, message):
    with pytest.raises(ConfigError, match=message):
        check_plan(mode, criteria, sparsities, ratios)


def test_plan_without_criteria_runs_the_defaults_of_the_mode():
    unstructured, _, _ = check_plan("unstructured", None, "0.5", None)
    assert unstructured == list(DEFAULT_CRITERIA["unstructured"]) and {"wanda", "sparsegpt"} <= set(unstructured)
    structured, _, _ = check_plan("structured", None, None, "2")  # the layer solvers are unstructured only
    assert structured == list(DEFAULT_CRITERIA["structured"]) and "sparsegpt" not in structured


def test_plan_sorts_targets_and_names_criteria_canonically():
    assert check_plan("structured", "CampHive,l1", "0.9,0.5", None) == (["camp-hive", "magnitude"], [0.5, 0.9], "sparsity")
    assert check_plan("structured", "magnitude", "0.5", "3,1.5") == (["magnitude"], [1.5, 3.0], "macs_ratio")


def test_tensorboard_asked_for_but_missing_is_one_clear_line(tmp_path):
    try:
        import torch.utils.tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="needs the tensorboard package"):
        compare_job(**TINY, out=tmp_path / "run", criteria="magnitude", sparsities="0.5", tensorboard=True)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("options, message", [
    (dict(prune_options="bogus=1"), "magnitude at sparsity 0.5: unknown option(s) for unstructured pruning: bogus"),
    (dict(camp_hive_options="merge=lsq"), "camp-hive at sparsity 0.5: unknown merge 'lsq'"),
    (dict(prune_options="cycles=two"), "cycles='two' must be int"),
    (dict(prune_options="round_to=8"), "apply to structured pruning only"),
    (dict(prune_options="ignored_layers=conv9"), "ignored layer 'conv9'"),
    (dict(mode="structured", prune_options="merge=curvature"), "unknown merge 'curvature'"),
    (dict(mode="structured", prune_options="nonsense=1"), "unknown option(s) for structured pruning: nonsense"),
    (dict(model="resnet9000"), "unknown model 'resnet9000'"),
    (dict(spectrum_top_k=5, spectrum_max_iter=3), "pass max_iter >= 5"),
])
def test_bad_prune_options_are_refused_before_any_training(tmp_path, monkeypatch, options, message):
    from camphive.jobs import compare_dense

    def no_training(*_args, **_kwargs):
        raise AssertionError("trained before the options were checked")

    monkeypatch.setattr(compare_dense, "train", no_training)
    with pytest.raises(ConfigError) as error:
        compare_job(**{**TINY, "out": tmp_path / "run", "criteria": "magnitude,camp-hive", "sparsities": "0.5",
                       **options})
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_parse_options_reads_exponents_as_numbers():
    assert parse_options("damping=1e-3,scale=5E+2,name=1e") == {"damping": 0.001, "scale": 500.0, "name": "1e"}


def test_the_dense_checkpoint_records_the_dataset_options_and_evaluate_uses_them(tiny_run, tmp_path):
    from camphive.jobs.evaluate import evaluate_job

    out, results = tiny_run
    stored = load_checkpoint(out / "dense.safetensors")
    assert stored.metadata["dataset_options"] == DATA and stored.metadata["input_shape"] == [1, 8, 8]
    metrics = evaluate_job(checkpoint=out / "dense.safetensors", device="cpu")  # the data from the checkpoint
    assert metrics["accuracy"] == results["dense"]["accuracy"] and metrics["num_samples"] == DATA["num_samples"]
    other = {**DATA, "shape": [1, 12, 12]}  # options given win over the recorded ones, and must fit the model
    with pytest.raises(ConfigError, match="gives inputs of shape 1x12x12 but checkpoint .* was made for 1x8x8"):
        compare_job(**{**TINY, "dataset_options": other, "out": tmp_path / "run", "criteria": "magnitude",
                       "sparsities": "0.5"}, checkpoint=out / "dense.safetensors")
    assert not (tmp_path / "run").exists()


def test_a_dense_model_with_bad_batchnorm_statistics_is_read_after_the_same_re_estimation(tmp_path):
    # Pruning re-estimates BatchNorm statistics on the calibration images; a dense model whose statistics are
    # off (few training steps) must get the same, or every pruned copy looks better than dense.
    data = {**DATA, "num_samples": 96, "noise": 0.5}
    splits = load_splits("synthetic", **data)
    torch.manual_seed(0)
    model = model_for("small-cnn", splits)
    train(model, datasets.loader(splits.train, batch_size=16, train=True, seed=0), 3, lr=0.05, device="cpu")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var *= 50.0  # every activation squeezed towards its mean
    save_checkpoint(tmp_path / "dense.safetensors", model, **checkpoint_metadata(splits))
    settings = dict(TINY, dataset=None, dataset_options=data, finetune_epochs=0, spectrum_top_k=0,
                    checkpoint=tmp_path / "dense.safetensors", criteria="magnitude,camp-hive", sparsities="0.3")
    results = compare_job(**settings, out=tmp_path / "run")
    dense = results["dense"]
    test = datasets.loader(splits.test, batch_size=256)
    recalibrated = copy.deepcopy(model)
    recalibrate_batchnorm(recalibrated, calibration_batches("synthetic", None, 16, 16, 3, **data))
    assert dense["accuracy"] == evaluate(model, test)["accuracy"] < 0.5  # as trained: the statistics are off
    assert dense["recalibrated"]["accuracy"] == evaluate(recalibrated, test)["accuracy"] > 0.8
    assert dense["reference"] == "recalibrated" and dense["reference_accuracy"] == dense["recalibrated"]["accuracy"]
    text = results["headline"]
    assert text.startswith("At sparsity 0.3, right after pruning: CAMP-HiVe ") and "keeps" not in text
    assert (f"dense model {dense['recalibrated']['accuracy']:.1%} with BatchNorm re-estimated on the calibration "
            f"images, as pruning does ({dense['accuracy']:.1%} as trained)") in text
    for name in ("report.md", "report.html"):
        report = html.unescape((tmp_path / "run" / name).read_text())
        assert text in report and "dense, as trained" in report and "dense, BN re-estimated" in report
    stored = json.loads((tmp_path / "run" / "results.json").read_text())["dense"]
    assert stored["recalibrated"]["accuracy"] == dense["recalibrated"]["accuracy"]
    # Pruning that keeps the statistics is read against the dense model as trained.
    kept = compare_job(**{**settings, "prune_options": "recalibrate_bn=false"}, out=tmp_path / "kept")
    assert kept["dense"]["reference"] == "as trained" and kept["dense"]["reference_accuracy"] == dense["accuracy"]
    assert f"dense model {dense['accuracy']:.1%} as trained" in kept["headline"]
