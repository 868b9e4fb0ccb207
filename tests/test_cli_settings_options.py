"""The pruning options of the command line are generated from the settings classes' fields."""
import dataclasses
import re

import typer
from typer.testing import CliRunner

from camphive.cli.settings_options import setting_fields, settings_options, settings_values
from camphive.pruning.settings import SETTINGS
from camphive.pruning.unstructured.settings import UnstructuredSettings


def _command_params(command: str) -> dict:
    from camphive.cli import app

    return {param.name: param for param in typer.main.get_command(app).commands[command].params}


def test_every_settings_field_is_a_prune_option_named_after_it():
    params = _command_params("prune")
    fields = {}
    for cls in SETTINGS.values():  # a field both modes declare (sparsity) is documented where first declared
        for field in dataclasses.fields(cls):
            fields.setdefault(field.name, field)
    for name, field in fields.items():
        if name == "num_batches":  # the job's calibration set is --calib-samples
            assert name not in params
            continue
        flag = "--" + name.replace("_", "-")
        assert flag in params[name].opts, (name, params[name].opts)
        if str(field.type).replace(" ", "") in ("bool", "bool|None"):
            assert f"--no-{flag[2:]}" in params[f"no_{name}"].opts
        if name != "seed":  # declared by the command: it seeds the data too
            assert params[name].help.startswith(field.metadata.get("help", "")), name
            assert params[name].rich_help_panel == field.metadata.get("panel"), name


@dataclasses.dataclass(frozen=True)
class _Extended(UnstructuredSettings):
    """A settings class with fields of its own, as a contributor would add them."""

    warp: float = dataclasses.field(default=0.5, metadata={"help": "Warp factor", "panel": "Pruning"})
    fast: bool = dataclasses.field(default=False, metadata={"help": "Go fast", "off_help": "Go slow"})
    shapes: tuple = dataclasses.field(default=(1, 2), metadata={"help": "Shapes", "items": int})
    hint: str | None = None


def _app_with(fields: dict):
    received = []
    app = typer.Typer()

    @app.command()
    @settings_options(fields)
    def command(ctx: typer.Context, name: str = typer.Option("x"), **settings):
        received.append((name, settings_values(ctx, fields, settings)))

    @app.command()
    def other():  # a second command keeps Typer from folding the app into a single command
        pass

    return app, received


def test_a_new_settings_field_is_an_option_with_no_cli_edit():
    fields = setting_fields([_Extended], only=("warp", "fast", "shapes", "hint", "cycles", "ignored_layers",
                                                 "refit"))
    app, received = _app_with(fields)
    runner = CliRunner()
    result = runner.invoke(app, ["command", "--warp", "0.75", "--no-fast", "--shapes", "3,4", "--hint", "h",
                                 "--cycles", "2", "--ignored-layers", "conv1, fc1"])
    assert result.exit_code == 0, result.output
    assert received[-1] == ("x", {"warp": 0.75, "fast": False, "shapes": [3, 4], "hint": "h", "cycles": 2,
                                  "ignored_layers": ["conv1", "fc1"]})
    assert runner.invoke(app, ["command"]).exit_code == 0
    assert received[-1] == ("x", {})  # nothing given: nothing passed on, the settings resolve their defaults
    assert runner.invoke(app, ["command", "--cycles", "0"]).exit_code == 2  # the field's "min"
    text = re.sub(r"\x1b\[[0-9;]*m", "", runner.invoke(app, ["command", "--help"], env={"COLUMNS": "200"}).output)
    for expected in ("--warp", "Warp factor (default: 0.5).", "--fast", "Go fast.", "--no-fast", "Go slow (default).",
                     "Shapes (default: 1,2).", "--hint", "Hint (default: resolved per criterion).",
                     "(default: 1; camp-hive unstructured without the refit: 3)",
                     "(default: on for camp-hive"):
        assert expected in text, (expected, text)


def test_generated_prune_options_reach_the_job_as_settings(tmp_path, monkeypatch):
    from camphive.cli import main
    from camphive.jobs import prune

    calls = []

    def fake_prune_job(**kwargs):
        calls.append(kwargs)
        return {"dense": {"accuracy": 1.0}, "pruned": {"accuracy": 1.0}, "prune": {"sparsity": 0.5, "macs_ratio": 2.0},
                "finetuned": None}  # a structured record always has its MACs ratio

    monkeypatch.setattr(prune, "prune_job", fake_prune_job)
    command = ["prune", "--checkpoint", str(tmp_path / "m.safetensors"), "--mode", "structured"]
    assert main([*command, "--target-macs-ratio", "2", "--criterion", "magnitude", "--latency-batch-sizes", "1,8",
                 "--no-intercept", "--round-min-group", "4", "--seed", "3"]) == 0
    job = calls[-1]
    assert (job["criterion"], job["sparsity"], job["target_macs_ratio"], job["seed"]) == ("magnitude", None, 2.0, 3)
    assert job["options"] == {"latency_batch_sizes": [1, 8], "intercept": False, "round_min_group": 4}
    assert main([*command, "--sparsity", "0.5"]) == 0
    assert calls[-1]["criterion"] == "camp-hive" and calls[-1]["options"] == {}
