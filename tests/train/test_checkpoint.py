"""What resume refuses: missing, corrupt and different checkpoints."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from attnlab import cli
from attnlab.train import CheckpointError, TrainConfig, train


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
