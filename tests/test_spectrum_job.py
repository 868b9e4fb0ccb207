"""``camphive spectrum`` as a job: counts it cannot deliver are refused before anything is
written, and spectrum.json is strict JSON (no NaN) with the warnings of unconverged solves."""
import json

import pytest
import torch

from camphive import models
from camphive.checkpoints import save_checkpoint
from camphive.errors import ConfigError
from camphive.jobs.spectrum import spectrum_job


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(path, models.create("small-cnn", num_classes=10, in_channels=3), dataset="synthetic",
                    input_shape=[3, 32, 32])
    return path


TINY = dict(calib_samples=8, calib_batch_size=8, per_layer=False)


@pytest.mark.parametrize("top_k, max_iter, expected", [
    (100_000_000, 2, r"top_k=100000000 eigenvalues asked of a Hessian of dimension \d+ .*pass top_k <= \d+"),
    (3, 2, r"max_iter=2 products cannot give top_k=3 .*pass max_iter >= 3"),
])
def test_counts_the_solver_cannot_deliver_leave_no_run_folder(synthetic_checkpoint, tmp_path, top_k, max_iter, expected):
    out = tmp_path / "spectrum"
    with pytest.raises(ConfigError, match=expected) as error:
        spectrum_job(checkpoint=synthetic_checkpoint, out=out, top_k=top_k, max_iter=max_iter, trace_probes=0, **TINY)
    assert "\n" not in str(error.value)
    assert not out.exists()  # the corrected command is not blocked by a half-made folder


def test_unconverged_estimates_are_written_as_strict_json_with_a_warning(synthetic_checkpoint, tmp_path):
    out = tmp_path / "spectrum"
    with pytest.warns(UserWarning, match=r"1 eigen-solve\(s\) stopped before converging"):
        data = spectrum_job(checkpoint=synthetic_checkpoint, out=out, top_k=3, max_iter=3, tol=1e-12,
                            trace_probes=1, **TINY)
    text = (out / "spectrum.json").read_text()
    written = json.loads(text, parse_constant=lambda name: pytest.fail(f"spectrum.json holds {name}"))
    assert written == data
    assert len(written["global"]["eigenvalues"]) == 3 and written["global"]["converged"] == [False] * 3
    assert written["trace"]["standard_error"] is None and written["warnings"][0].startswith("global: ")
