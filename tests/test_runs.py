import os
import stat

import pytest
import yaml

from camphive.errors import CamphiveError, ConfigError
from camphive.runs import RunFolder, atomic_write_text


def test_existing_run_folder_is_never_overwritten_without_permission(tmp_path):
    run = RunFolder.create(tmp_path / "run")
    run.write_json("metrics.json", {"a": 1})
    with pytest.raises(ConfigError, match="already exists .* --overwrite"):
        RunFolder.create(tmp_path / "run")
    assert RunFolder.create(tmp_path / "run", overwrite=True).read_json("metrics.json") == {"a": 1}


def test_failed_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "file.txt"
    atomic_write_text(target, "old")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("camphive.runs.os.replace", broken_replace)
    with pytest.raises(CamphiveError, match="No space left on device; the previous file is intact"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_config_is_written_as_plain_yaml(tmp_path):
    import numpy as np
    import torch
    import yaml

    run = RunFolder.create(tmp_path / "r")
    run.write_config({"version": torch.__version__, "path": tmp_path, "value": np.float32(0.5), "tuple": (1, 2)})
    loaded = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert loaded == {"version": str(torch.__version__), "path": str(tmp_path), "value": 0.5, "tuple": [1, 2]}


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield
    os.umask(previous)


def test_atomic_writes_get_the_mode_open_would_give_before_they_appear(tmp_path, umask_027, monkeypatch):
    with open(tmp_path / "plain.txt", "w") as file:  # the reference: what open() makes under this umask
        file.write("x")
    seen = []
    real_replace = os.replace

    def replace(source, target):
        seen.append(stat.S_IMODE(os.stat(source).st_mode))  # the mode while the file is still hidden
        real_replace(source, target)

    monkeypatch.setattr("camphive.runs.os.replace", replace)
    written = atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert stat.S_IMODE(written.stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o640
    assert seen == [0o640]
    os.chmod(written, 0o600)  # an existing file keeps its own mode, as open(path, "w") leaves it
    atomic_write_text(written, "a: 2\n")
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


def test_run_folder_files_are_readable_as_log_txt_is(tmp_path, umask_027):
    run = RunFolder.create(tmp_path / "run")
    run.write_config({"a": 1})
    run.write_json("results.json", {"b": 2})
    run.logger().info("hello")
    run.close()
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "run").iterdir()}
    assert modes == {"config.yaml": 0o640, "results.json": 0o640, "log.txt": 0o640}


def _fail_after_writing(run, keep=False):
    with pytest.raises(ConfigError, match="bad value"):
        with run.discarded_on_error():
            run.write_config({"new": True})
            run.logger().info("started")
            run.write_json("progress.json", {"dense": 1})
            (run.path / "logs").mkdir(exist_ok=True)
            (run.path / "logs" / "a.jsonl").write_text("{}\n")
            if keep:
                run.keep()
            raise ConfigError("bad value")


def test_a_run_that_fails_before_producing_anything_leaves_no_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("mine")
    run = RunFolder.create(tmp_path / "a" / "b")
    _fail_after_writing(run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]  # b and the parent a it made are gone
    RunFolder.create(tmp_path / "a" / "b")  # so the corrected command is not refused


def test_a_failed_run_keeps_an_existing_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    _fail_after_writing(RunFolder.create(tmp_path / "out"))
    assert (tmp_path / "out").is_dir() and not any((tmp_path / "out").iterdir())


def test_a_failed_overwrite_puts_the_old_run_back(tmp_path):
    old = tmp_path / "old"
    (old / "logs").mkdir(parents=True)
    (old / "config.yaml").write_text("old: true\n")
    (old / "model.safetensors").write_bytes(b"weights")
    (old / "logs" / "b.jsonl").write_text("old\n")
    before = {p.relative_to(old).as_posix(): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    _fail_after_writing(RunFolder.create(old, overwrite=True))
    after = {p.relative_to(old).as_posix(): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    assert after == before  # replaced files restored, new ones (progress.json, logs/a.jsonl, log.txt) removed


def test_a_run_that_produced_something_or_resumed_is_left_alone(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text("old: true\n")
    run = RunFolder.create(old, overwrite=True)
    _fail_after_writing(run, keep=True)
    assert yaml.safe_load((old / "config.yaml").read_text()) == {"new": True}  # the overwrite went through
    assert sorted(p.name for p in old.iterdir()) == ["config.yaml", "log.txt", "logs", "progress.json"]  # no backup
    _fail_after_writing(RunFolder.create(tmp_path / "resumed", resume=True))
    assert (tmp_path / "resumed" / "progress.json").is_file()  # --resume never removes anything


def test_an_overwrite_that_produced_something_drops_the_old_runs_other_files(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "finetune_state.pt").write_bytes(b"the old run's optimizer")  # a later --resume must not find it
    (old / "log.txt").write_text("old run\n")
    run = RunFolder.create(old, overwrite=True)
    with run.discarded_on_error():
        run.logger().info("new run")
        run.write_json("progress.json", {"dense": 1})
        run.keep()
    run.close()
    assert sorted(p.name for p in old.iterdir()) == ["log.txt", "progress.json"]
    assert (old / "log.txt").read_text().startswith("old run\n") and "new run" in (old / "log.txt").read_text()


def test_json_is_written_strict_with_null_for_numbers_that_are_not_finite(tmp_path):
    import json

    import torch

    from camphive.runs import atomic_write_json

    path = atomic_write_json(tmp_path / "r.json", {"a": float("nan"), "b": [float("inf"), 1.5, (float("-inf"),)],
                                                   "t": torch.tensor([1.0, float("nan")])})

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"a": None, "b": [None, 1.5, [None]],
                                                                   "t": [1.0, None]}
