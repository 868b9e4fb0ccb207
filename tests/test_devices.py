"""Device choice: auto, and how torchrun processes share (or not) the GPUs of a machine."""
import pytest
import torch

from camphive.devices import gpu_for_each_process, processes_on_this_node, resolve_device
from camphive.distributed import group
from camphive.errors import ConfigError


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has ``count`` GPUs (nothing is ever moved to them here)."""
    def set_count(count: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return set_count


def test_auto_is_cuda_only_with_a_gpu_for_each_process_of_this_node(gpus, monkeypatch):
    gpus(1)
    assert processes_on_this_node() == 1 and resolve_device("auto") == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a launcher that sets only WORLD_SIZE: one node assumed
    assert processes_on_this_node() == 2 and not gpu_for_each_process()
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # two nodes of one process each
    assert gpu_for_each_process() and resolve_device(None) == torch.device("cuda")
    gpus(4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert gpu_for_each_process()
    gpus(0)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")


def test_processes_without_a_gpu_of_their_own_are_refused_cuda_in_one_line(monkeypatch):
    monkeypatch.setattr(group, "is_distributed", lambda: True)
    monkeypatch.setattr(group, "_OWNS_GPU", False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="2 processes on this machine but 1 GPU") as caught:
        group.process_device(torch.device("cuda"))
    assert "--device cpu" in str(caught.value) and "\n" not in str(caught.value)
    assert group.process_device(torch.device("cpu")) == torch.device("cpu")
