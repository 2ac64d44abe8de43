"""The checkpoint format: atomic folders, keep-N pruning, safetensors-only loading, and what resume refuses."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from attnlab import cli
from attnlab.train import CheckpointError, TrainConfig, find_checkpoint, load_weights, save_checkpoint, train
from attnlab.train import checkpoint as ckpt


def _stepped(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _state(step: int) -> dict:
    return {"config": TrainConfig().to_dict(), "rng": {}, "history": [], "windows": {}, "step": step}


def test_save_keeps_the_newest_and_loads_without_unpickling(tmp_path, monkeypatch):
    model, optimizer = _stepped(0)
    for step in (10, 20, 30):
        path = save_checkpoint(tmp_path, step, model, optimizer, _state(step))
    assert path == tmp_path / "ckpt" / "step-00000030"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["latest", "step-00000020", "step-00000030"]
    assert len(list((tmp_path / "ckpt").iterdir())) - 1 == ckpt.KEEP_CHECKPOINTS
    again = save_checkpoint(tmp_path, 30, model, optimizer, _state(30))      # the same step once more
    assert again.name == "step-00000030-1" and find_checkpoint(tmp_path)[0] == again

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    folder, state = find_checkpoint(tmp_path)
    assert state["step"] == 30 and state["format"] == ckpt.CHECKPOINT_FORMAT
    fresh, fresh_opt = _stepped(1)
    load_weights(folder, fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert optimizer.state[p].keys() == fresh_opt.state[q].keys()
        assert all(torch.equal(optimizer.state[p][k], fresh_opt.state[q][k]) for k in optimizer.state[p])


def test_a_checkpoint_of_another_format_is_refused(tmp_path):
    model, optimizer = _stepped(0)
    save_checkpoint(tmp_path, 5, model, optimizer, _state(5))
    state_file = tmp_path / "ckpt" / "step-00000005" / "state.json"
    state_file.write_text(state_file.read_text().replace(f'"format": {ckpt.CHECKPOINT_FORMAT}', '"format": 99'))
    with pytest.raises(CheckpointError, match="checkpoint format 99"):
        find_checkpoint(tmp_path)


def test_resume_refuses_missing_corrupt_and_different_checkpoints(reference, tmp_path, tiny):
    ref, _ = reference
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        train(TrainConfig(**tiny), resume=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="not a folder"):
        train(TrainConfig(**tiny), resume=tmp_path / "absent", progress=False)
    cfg = TrainConfig(**{**tiny, "steps": 60})
    run = tmp_path / "run"

    def fresh() -> Path:  # a copy of the reference run; returns its newest checkpoint folder
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(ref, run)
        return run / "ckpt" / "step-00000040"

    fresh()
    with pytest.raises(CheckpointError, match=r"differs in layers, dim .*dim: checkpoint 32, now 48"):
        train(TrainConfig(**{**tiny, "dim": 48, "layers": ["mhsa"], "steps": 60}), resume=run, progress=False)
    with pytest.raises(CheckpointError, match="at step 40 and steps is 40; pass a larger --steps"):
        train(TrainConfig(**tiny), resume=run, progress=False)
    (fresh() / "state.json").write_text('{"step": 40, "conf')
    with pytest.raises(CheckpointError, match="state.json is corrupt"):
        train(cfg, resume=run, progress=False)
    model = fresh() / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="does not load"):
        train(cfg, resume=run, progress=False)
    (fresh() / "optimizer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no optimizer.safetensors"):
        train(cfg, resume=run, progress=False)
    fresh()
    (run / "ckpt" / "latest").write_text("step-00000099\n")
    with pytest.raises(CheckpointError, match="names 'step-00000099', which is not a checkpoint"):
        train(cfg, resume=run, progress=False)
    # The command line says the same, with exit code 2.
    fresh()
    assert cli.main(["train", "--resume", str(run), "--dim", "48", "--no-progress"]) == 2
