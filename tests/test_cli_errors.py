"""Bad input as a user meets it: one line naming the problem and the fix, exit code 2,
no traceback, and no half-written output."""
import gzip
import os
import pickle
import subprocess
import sys

import pytest
import torch

from camphive import models
from camphive.checkpoints import save_checkpoint


def run_cli(*args, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "camphive", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=cwd)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    torch.manual_seed(0)
    save_checkpoint(path, models.create("small-cnn", num_classes=10, in_channels=3), dataset="synthetic",
                    input_shape=[3, 32, 32])
    return path


def _write_bad_idx_folder(folder):
    folder.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(folder / name, "wb") as file:
            file.write(b"\x00\x00\x08\x03garbage")


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/camphive-pwned",))


@pytest.mark.parametrize("case", ["sparsity_high", "sparsity_negative", "criterion", "merge", "out_exists"])
def test_prune_option_errors(tmp_path, small_checkpoint, case):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    args = {
        "sparsity_high": (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        "sparsity_negative": (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
        "criterion": (["--sparsity", "0.5", "--criterion", "vibes"], "unknown criterion 'vibes'"),
        "merge": (["--sparsity", "0.5", "--merge", "glue"], "unknown merge 'glue'"),
        "out_exists": (["--sparsity", "0.5", "--out", tmp_path / "taken"], "already exists"),
    }[case]
    out = [] if "--out" in args[0] else ["--out", tmp_path / "o"]
    result = run_cli("prune", "--checkpoint", small_checkpoint, "--calib-samples", "16", *args[0], *out)
    assert_one_line_error(result, args[1])
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "o").exists()  # nothing half-written that would refuse the corrected command


@pytest.mark.parametrize("args, message", [
    (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "sparsity must be in [0, 1)"),
    (["--sparsity", "0.5", "--criterion", "magnitud"], "unknown criterion 'magnitud'"),
    (["--sparsity", "0.5", "--mode", "struct"], "unknown --mode 'struct'"),
    (["--sparsity", "0.5", "--score", "diag"], "unknown score 'diag'"),
    (["--sparsity", "0.5", "--merge", "lsq"], "unknown merge 'lsq'"),
    (["--sparsity", "0.5", "--schedule", "cubical"], "unknown schedule 'cubical'"),
    (["--sparsity", "0.5", "--round-to", "8"], "apply to structured pruning only"),
    (["--sparsity", "0.5", "--target-macs-ratio", "2"], "--target-macs-ratio needs --mode structured"),
    (["--mode", "structured", "--sparsity", "0.5", "--merge", "curvature"], "unknown merge 'curvature'"),
    (["--mode", "structured", "--target-macs-ratio", "0.5"], "target_macs_ratio must be >= 1"),
    (["--mode", "structured", "--sparsity", "0.5", "--target-macs-ratio", "2"], "give exactly one of"),
    (["--mode", "structured", "--sparsity", "0.5", "--selection", "layer"], "apply to unstructured pruning"),
])
def test_bad_prune_values_fail_before_the_run_folder_is_made(tmp_path, small_checkpoint, capsys, monkeypatch, args,
                                                            message):
    from camphive.cli import main
    from camphive.jobs import prune

    def no_evaluation(*_args, **_kwargs):
        raise AssertionError("the dense model was evaluated before the settings were checked")

    monkeypatch.setattr(prune, "evaluate", no_evaluation)
    code = main(["prune", "--checkpoint", str(small_checkpoint), "--calib-samples", "8", "--device", "cpu", *args,
                 "--out", str(tmp_path / "o")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and message in error and "Traceback" not in error, error
    assert not (tmp_path / "o").exists()


def test_prune_failing_after_the_folder_is_made_takes_it_back(tmp_path, small_checkpoint, capsys):
    from camphive.cli import main
    from camphive.jobs import prune

    prunable = ["--ignored-layers", "conv1,conv2,conv3,fc1,fc2"]  # valid names, but nothing left to prune
    base = ["prune", "--checkpoint", str(small_checkpoint), "--sparsity", "0.5", "--calib-samples", "8",
            "--criterion", "magnitude", "--device", "cpu"]
    assert main([*base, *prunable, "--out", str(tmp_path / "a" / "o")]) == 2
    assert "no prunable layers" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()  # the folder and the parent it made are gone

    old = tmp_path / "old"  # an --overwrite of an older run that fails gives the older run back
    old.mkdir()
    (old / "config.yaml").write_text("command: train\n")
    (old / "model.safetensors").write_bytes(small_checkpoint.read_bytes())
    assert main([*base, *prunable, "--out", str(old), "--overwrite"]) == 2
    assert (old / "config.yaml").read_text() == "command: train\n"
    assert sorted(p.name for p in old.iterdir()) == ["config.yaml", "model.safetensors"]
    prune.prune_job(checkpoint=small_checkpoint, sparsity=0.5, criterion="magnitude", calib_samples=8, device="cpu",
                    out=tmp_path / "a" / "o", options={"spectrum_top_k": 0})  # the corrected run is not refused
    assert (tmp_path / "a" / "o" / "results.json").is_file()


def test_prune_job_refuses_num_batches_before_any_work(tmp_path, small_checkpoint, monkeypatch):
    """The calibration set is --calib-samples: num_batches among the options is refused by the settings check
    (which is why prune_job has no code path that reads it)."""
    from camphive.errors import ConfigError
    from camphive.jobs import prune

    def no_calibration(*_args, **_kwargs):
        raise AssertionError("calibration data was read before the options were checked")

    monkeypatch.setattr(prune, "calibration_batches", no_calibration)
    with pytest.raises(ConfigError, match="num_batches.*--calib-samples"):
        prune.prune_job(checkpoint=small_checkpoint, sparsity=0.5, criterion="magnitude", calib_samples=8,
                        device="cpu", out=tmp_path / "o", options={"num_batches": 2})
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["model", "dataset", "schedule", "wrong_type", "unknown_option"])
def test_train_option_errors(tmp_path, case):
    args, message = {
        "model": (["--model", "resnet9000", "--dataset", "synthetic"], "unknown model 'resnet9000'"),
        "dataset": (["--dataset", "mnist-but-better"], "unknown dataset"),
        "schedule": (["--dataset", "synthetic", "--schedule", "weird", "--epochs", "1"], "unknown schedule 'weird'"),
        "wrong_type": (["--epochs", "many"], "--epochs"),
        "unknown_option": (["--learning-rate", "0.1"], "No such option"),
    }[case]
    assert_one_line_error(run_cli("train", *args, "--out", tmp_path / "o"), message)


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt_idx", "corrupt_cifar", "evil_cifar", "bad_image"])
def test_data_errors(tmp_path, case):
    root = tmp_path / "data"
    if case == "missing":
        dataset, message = "fashion-mnist", str(root)
    elif case == "empty":
        root.mkdir()
        dataset, message = "cifar10", "cifar-10"
    elif case == "corrupt_idx":
        _write_bad_idx_folder(root)
        dataset, message = "fashion-mnist", "idx"
    elif case in ("corrupt_cifar", "evil_cifar"):
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            payload = pickle.dumps(Evil(), protocol=2) if case == "evil_cifar" else b"not a pickle at all"
            (folder / name).write_bytes(payload)
        dataset, message = "cifar10", "data_batch_1"
    else:
        for split in ("train", "val"):
            (root / split / "cat").mkdir(parents=True)
            (root / split / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
        dataset, message = "imagenet", "broken.jpg"
    if os.path.exists("/tmp/camphive-pwned"):
        os.remove("/tmp/camphive-pwned")
    result = run_cli("train", "--dataset", dataset, "--data-root", root, "--epochs", "1", "--out", tmp_path / "o")
    assert_one_line_error(result, message)
    assert not os.path.exists("/tmp/camphive-pwned")
    assert not (tmp_path / "o").exists() or case == "bad_image"


def test_images_that_do_not_fit_the_model(tmp_path):
    path = tmp_path / "gray.safetensors"
    save_checkpoint(path, models.create("small-cnn", num_classes=10, in_channels=1), dataset="fashion-mnist")
    result = run_cli("evaluate", "--checkpoint", path, "--dataset", "synthetic")  # 3-channel images
    assert_one_line_error(result, "inputs of shape", "in_channels")


@pytest.mark.parametrize("case", ["truncated", "garbage", "other_architecture", "pickle"])
def test_checkpoint_errors(tmp_path, small_checkpoint, case):
    path = tmp_path / "model.safetensors"
    data = small_checkpoint.read_bytes()
    if case == "truncated":
        path.write_bytes(data[: len(data) // 3])
        message = "truncated or not a safetensors file"
    elif case == "garbage":
        path.write_bytes(os.urandom(256))
        message = "truncated or not a safetensors file"
    elif case == "pickle":
        with open(path, "wb") as file:
            pickle.dump(Evil(), file)
        message = "not a safetensors file"
    else:
        model = models.create("resnet20", num_classes=10, in_channels=3)
        model.camphive_arch = models.create("small-cnn", num_classes=10, in_channels=3).camphive_arch
        save_checkpoint(path, model, dataset="synthetic")
        message = "does not fit"
    if os.path.exists("/tmp/camphive-pwned"):
        os.remove("/tmp/camphive-pwned")
    assert_one_line_error(run_cli("evaluate", "--checkpoint", path), message)
    assert not os.path.exists("/tmp/camphive-pwned")


def test_config_file_errors(tmp_path):
    bad_key = tmp_path / "bad.yaml"
    bad_key.write_text("epoch: 3\n")
    assert_one_line_error(run_cli("train", "--config", bad_key), "unknown option 'epoch'")
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("epochs: [1, 2\n")
    assert_one_line_error(run_cli("train", "--config", not_yaml), "not valid YAML")
