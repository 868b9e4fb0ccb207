import pytest

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
