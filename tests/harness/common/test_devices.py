"""harness.common.devices.pick_device, shared by the harness and the trainer."""
import pytest
import torch

from harness.common.devices import pick_device


def test_names_and_auto(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    # Without CUDA here, cuda is passed through as asked: a sweep planned on a GPU-less login node still submits.
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda")


def test_bare_cuda_gets_the_current_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # what set_device(LOCAL_RANK) left on rank 3
    assert pick_device("cuda") == torch.device("cuda", 3)
    assert pick_device("auto") == torch.device("cuda", 3)
    assert pick_device("cuda:0") == torch.device("cuda", 0)


@pytest.mark.parametrize("bad", ["cdua", "cuda:x", ""])
def test_bad_names_are_explained(bad):
    with pytest.raises(ValueError, match=f"device {bad!r} is not a device name; use auto, cpu, cuda or cuda:N"):
        pick_device(bad)
