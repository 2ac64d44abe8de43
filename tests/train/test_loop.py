"""The training loop: a run's outputs, kill-and-resume, signals, and 2-process data parallel.

The subprocess tests are the slow part (each new interpreter imports torch): the kill test stops a
throttled `python -m attnlab train` with SIGINT and resumes it in this process (SIGTERM is sent
in-process); the data-parallel test runs `torchrun --nproc_per_node=2`. Every run is the tiny
config of conftest.py.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from attnlab import cli
from attnlab.tasks import create_task
from attnlab.train import TrainConfig, TrainInterrupted, find_checkpoint, loop, metrics, train

ROOT = Path(__file__).resolve().parents[2]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _numbers(run_dir: Path) -> list[dict]:
    """The log and eval records without wall-clock fields: what must match exactly."""
    return [{k: v for k, v in r.items() if k not in metrics.TIMING_KEYS}
            for r in _records(run_dir) if r["type"] in ("log", "eval")]


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


# --- a run and its files ----------------------------------------------------------------------------

def test_run_writes_config_metrics_curves_and_checkpoints(reference, tiny):
    out, result = reference
    assert json.loads((out / "config.json").read_text()) == TrainConfig(**tiny).to_dict()
    records = _records(out)
    header = records[0]
    assert header["type"] == "header" and header["config"] == TrainConfig(**tiny).to_dict()
    assert {"torch", "python", "platform", "cpu", "num_threads", "device", "world_size"} <= set(header["env"])
    assert header["env"]["num_threads"] == 1 and header["seq_len"] == 32 and header["quality"] == "accuracy"
    logs = [r for r in records if r["type"] == "log"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in logs] == list(range(5, 41, 5))
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert all(r["tokens"] == r["step"] * 16 * 32 for r in logs + evals)
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in logs)
    assert {"train_loss", "train_accuracy", "train_aux_loss", "val_loss", "val_accuracy"} <= set(evals[-1])
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.3            # it learns something in 40 steps
    # The eval's train loss is the mean of the steps since the previous eval.
    assert evals[2]["train_loss"] == pytest.approx(sum(r["train_loss"] for r in logs[4:]) / 4)

    assert result.history == [{k: v for k, v in r.items() if k != "type"} for r in evals]
    assert result.final == {"val_loss": evals[-1]["val_loss"], "val_accuracy": evals[-1]["val_accuracy"]}
    model = create_task("assoc_recall", **tiny["task_options"]).build_model(32, 4, ["mhsa", "moh"], mlp_ratio=2.0)
    assert result.params == header["params"] == sum(p.numel() for p in model.parameters())
    assert result.tokens_per_s > 0 and result.out_dir == out
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ckpts = sorted(p.name for p in (out / "ckpt").iterdir() if p.is_dir())
    assert ckpts == ["step-00000030", "step-00000040"]                   # the newest two are kept
    assert (out / "ckpt" / "latest").read_text().strip() == "step-00000040"
    folder, state = find_checkpoint(out)
    assert state["step"] == 40 and state["history"] == result.history and state["world_size"] == 1
    model = load_file(str(folder / "model.safetensors"))
    opt = load_file(str(folder / "optimizer.safetensors"))
    assert "embed.embed.weight" in model
    assert {k.rsplit("/", 1)[1] for k in opt} == {"exp_avg", "exp_avg_sq", "step"}
    assert float(opt["embed.embed.weight/step"]) == 40.0


def test_batch_must_divide_over_the_processes(monkeypatch, tiny):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="divisible by 3"):
        train(TrainConfig(**tiny), None, progress=False)


# --- resume, signals ----------------------------------------------------------------------------

def test_resume_may_extend_the_steps(reference, tmp_path):
    ref, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    assert cli.main(["train", "--resume", str(run), "--steps", "50", "--no-progress"]) == 0
    numbers = _numbers(run)
    assert numbers[:len(_numbers(ref))] == _numbers(ref)                # the first 40 steps are untouched
    assert [r["step"] for r in numbers if r["type"] == "eval"] == [0, 20, 40, 50]
    assert [r["type"] for r in _records(run)].count("resume") == 1
    assert json.loads((run / "config.json").read_text())["steps"] == 50
    assert find_checkpoint(run)[1]["step"] == 50


def _assert_same_as_reference(out: Path, ref: Path) -> None:
    assert _numbers(out) == _numbers(ref)                               # bit-exact, every log and eval
    mine = load_file(str(find_checkpoint(out)[0] / "model.safetensors"))
    theirs = load_file(str(find_checkpoint(ref)[0] / "model.safetensors"))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    kinds = [r["type"] for r in _records(out)]
    assert kinds[0] == "header" and kinds.count("resume") == 1


def test_killed_run_resumes_to_the_uninterrupted_result(reference, tmp_path, tiny_args):
    """SIGINT a real `python -m attnlab train` once it has a checkpoint; resuming gives the reference's numbers."""
    ref, _ = reference
    out = tmp_path / "run"
    # Throttled so that the signal lands mid-run on a slow machine; sleeping changes no number.
    env = _subprocess_env(**{loop.THROTTLE_ENV: "0.1"})
    proc = subprocess.Popen([sys.executable, "-m", "attnlab", "train", *tiny_args, "--out", str(out), "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "ckpt" / "latest").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "stopped by SIGINT after step" in err and f"attnlab train --resume {out}" in err, err
    step = int(err.split("after step ")[1].split(";")[0])
    assert 10 <= step < 40
    assert find_checkpoint(out)[1]["step"] == step                      # saved where it stopped
    assert max(r["step"] for r in _numbers(out)) <= step
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_as_reference(out, ref)


def test_sigterm_saves_exits_143_and_resumes_exactly(reference, tmp_path, monkeypatch, capsys, tiny_args):
    """SIGTERM (what schedulers send) during step 14: that step finishes, is saved, the command returns 143."""
    from attnlab.tasks import assoc_recall
    ref, _ = reference
    out = tmp_path / "run"
    original = assoc_recall.AssocRecall.batch

    def batch(self, split, index, batch_size):
        if split == "train" and index == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, split, index, batch_size)

    monkeypatch.setattr(assoc_recall.AssocRecall, "batch", batch)
    assert cli.main(["train", *tiny_args, "--out", str(out), "--no-progress"]) == 143
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM after step 14; checkpoint saved in {out / 'ckpt' / 'step-00000014'}" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL          # handlers restored
    monkeypatch.setattr(assoc_recall.AssocRecall, "batch", original)
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_as_reference(out, ref)


def test_interrupt_without_output_folder_saves_nothing(monkeypatch, tiny):
    from attnlab.tasks import assoc_recall
    original = assoc_recall.AssocRecall.batch

    def batch(self, split, index, batch_size):
        if split == "train" and index == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, split, index, batch_size)

    monkeypatch.setattr(assoc_recall.AssocRecall, "batch", batch)
    with pytest.raises(TrainInterrupted, match="stopped by SIGINT after step 4; nothing saved") as info:
        train(TrainConfig(**tiny), None, progress=False)
    assert info.value.exit_code == 130 and info.value.checkpoint is None


# --- several processes ------------------------------------------------------------------------------

def test_two_processes_follow_the_one_process_curve(tmp_path, tiny, tiny_args):
    # No dropout here: each rank draws its own masks, so only a deterministic model can match.
    cfg = {**tiny, "block_options": {"drop": 0}}
    ref = tmp_path / "one"
    train(TrainConfig(**cfg), ref, progress=False)
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, "-m", "attnlab", "train", *tiny_args, "--block-option", "drop=0",
                           "--out", str(out), "--no-progress"],
                          env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "config.json").read_text()) == TrainConfig(**cfg).to_dict()
    assert done.stderr.count("attnlab train: assoc_recall") == 1          # only rank 0 reports
    records = _records(out)
    assert [r["type"] for r in records].count("header") == 1 and records[0]["env"]["world_size"] == 2
    ours, theirs = _numbers(out), _numbers(ref)
    assert [(r["type"], r["step"], r["tokens"]) for r in ours] == [(r["type"], r["step"], r["tokens"]) for r in theirs]
    # Same global batch and gradients up to float summation order: the curves agree closely.
    # (MoH's load-balance loss is a per-batch statistic, so train_aux_loss is not compared.)
    for a, b in zip(ours, theirs):
        for key in ("train_loss", "val_loss", "lr"):
            if b.get(key) is not None:
                assert math.isclose(a[key], b[key], rel_tol=1e-3), (key, a, b)
    state = find_checkpoint(out)[1]
    assert state["world_size"] == 2 and len(state["rng"]["torch_cpu"]) == 2
    assert state["rng"]["torch_cpu"][0] != state["rng"]["torch_cpu"][1]  # each rank draws its own noise


@pytest.mark.gpu
def test_cuda_run_checkpoints_and_resumes(tmp_path, monkeypatch, tiny):
    """On CUDA: CUDA RNG state in the checkpoint, and a SIGTERM'd run resumes to the uninterrupted curve.

    Close rather than bit-exact: CUDA's embedding backward accumulates with atomics, in any order.
    """
    from attnlab.tasks import assoc_recall
    cfg = TrainConfig(**{**tiny, "device": "cuda"})
    ref = tmp_path / "ref"
    train(cfg, ref, progress=False)
    original = assoc_recall.AssocRecall.batch

    def batch(self, split, index, batch_size):
        if split == "train" and index == 13:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, split, index, batch_size)

    monkeypatch.setattr(assoc_recall.AssocRecall, "batch", batch)
    out = tmp_path / "run"
    with pytest.raises(TrainInterrupted, match="after step 14"):
        train(cfg, out, progress=False)
    assert find_checkpoint(out)[1]["rng"]["torch_cuda"]
    monkeypatch.setattr(assoc_recall.AssocRecall, "batch", original)
    train(cfg, resume=out, progress=False)
    ours, theirs = _numbers(out), _numbers(ref)
    assert [(r["type"], r["step"]) for r in ours] == [(r["type"], r["step"]) for r in theirs]
    for a, b in zip(ours, theirs):
        for key in ("train_loss", "val_loss"):
            if b.get(key) is not None:
                assert math.isclose(a[key], b[key], rel_tol=1e-4), (key, a, b)
