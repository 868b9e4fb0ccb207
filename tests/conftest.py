"""Shared fixtures: tiny models and data, quiet progress, one thread.

One torch thread keeps the tiny tests fast and repeatable on a busy 2-core machine,
where several threads spin against each other.
"""
import pytest
import torch

from camphive import progress

# Module- and session-scoped fixtures run outside the per-test fixture below.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_and_single_threaded():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    progress.set_enabled(False)
    yield
    torch.set_num_threads(threads)
    progress.set_enabled(None)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("CAMPHIVE_CACHE", str(path))
    return path
