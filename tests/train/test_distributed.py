"""One-process behaviour of the torchrun helpers (the 2-process run is in test_loop.py)."""
from __future__ import annotations

import pytest
import torch

from attnlab.train import distributed


def test_environment_ints_and_devices(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.world_size() == 1 and distributed.setup("cpu") == distributed.Dist()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an int, got 'two'"):
        distributed.world_size()
    assert distributed.device_kind("cuda:1") == "cuda" and distributed.device_kind("cpu") == "cpu"
    assert distributed.resolve_device("cpu", distributed.Dist()) == torch.device("cpu")


def test_rng_states_round_trip_and_refuse_another_world_size():
    info, cpu = distributed.Dist(), torch.device("cpu")
    saved = distributed.gather_rng(cpu, info)
    expected = torch.rand(5)
    torch.rand(100)
    assert distributed.restore_rng(saved, cpu, info, saved_world=1)
    assert torch.equal(torch.rand(5), expected)
    assert not distributed.restore_rng(saved, cpu, info, saved_world=2)
