"""`attnlab train`: outputs, schedule, errors, checkpoints, kill-and-resume, and 2-process data parallel.

The subprocess tests are the slow part (each new interpreter imports torch): the kill test stops a
throttled `python -m attnlab train` with SIGINT and resumes it in this process (SIGTERM is sent
in-process); the data-parallel test runs `torchrun --nproc_per_node=2`. Every run is the same
tiny model (dim 32, 40 steps of 16 sequences of 32 tokens).
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
from attnlab.train import loop as train_mod
from attnlab.train import (CheckpointError, TrainConfig, TrainInterrupted, config_from_args, find_checkpoint,
                                 lr_at, parse_layers, parse_value, train)

TINY = dict(task="assoc_recall", task_options={"num_pairs": 8, "num_queries": 8, "num_keys": 16, "num_values": 16},
            layers=["mhsa", "moh"], dim=32, num_heads=4, mlp_ratio=2.0, steps=40, batch_size=16, lr=3e-3,
            warmup=5, eval_every=20, eval_batches=2, eval_batch_size=32, log_every=5, checkpoint_every=10,
            threads=1, block_options={"drop": 0.1})   # dropout: a resume must restore the RNG too
TINY_ARGS = ["--task", "assoc_recall", "--task-option", "num_pairs=8", "--task-option", "num_queries=8",
             "--task-option", "num_keys=16", "--task-option", "num_values=16", "--layers", "mhsa,moh",
             "--dim", "32", "--heads", "4", "--mlp-ratio", "2", "--steps", "40", "--batch-size", "16",
             "--lr", "3e-3", "--warmup", "5", "--eval-every", "20", "--eval-batches", "2",
             "--eval-batch-size", "32", "--log-every", "5", "--checkpoint-every", "10", "--threads", "1",
             "--block-option", "drop=0.1"]
ROOT = Path(__file__).resolve().parents[2]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _numbers(run_dir: Path) -> list[dict]:
    """The log and eval records without wall-clock fields: what must match exactly."""
    return [{k: v for k, v in r.items() if k not in train_mod.TIMING_KEYS}
            for r in _records(run_dir) if r["type"] in ("log", "eval")]


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, object]:
    """One uninterrupted in-process run of TINY: what the resumed and 2-process runs must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    return out, train(TrainConfig(**TINY), out, progress=False)


# --- config and schedule ----------------------------------------------------------------------------

@pytest.mark.parametrize("change, error, words", [
    ({"steps": 0}, ValueError, "steps must be a positive int"),
    ({"steps": -5}, ValueError, "steps"),
    ({"lr": 0.0}, ValueError, "lr must be a finite number > 0"),
    ({"lr": -1e-3}, ValueError, "lr"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"min_lr_ratio": 1.5}, ValueError, "min_lr_ratio"),
    ({"layers": "mhsa"}, TypeError, "list of mechanism names"),
    ({"layers": []}, ValueError, "at least one"),
    ({"layers": [{"top_k": 2}]}, TypeError, "'name'"),
    ({"device": "tpu"}, ValueError, "device"),
    ({"task_options": [1]}, TypeError, "task_options"),
])
def test_config_rejects_bad_values(change, error, words):
    with pytest.raises(error, match=words):
        TrainConfig(**{**TINY, **change})


def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-2, warmup=10, min_lr_ratio=0.1)
    assert [lr_at(cfg, s) for s in range(3)] == pytest.approx([1e-3, 2e-3, 3e-3])
    assert lr_at(cfg, 9) == pytest.approx(1e-2)
    assert lr_at(cfg, 10) == pytest.approx(1e-2)
    assert lr_at(cfg, 55) == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5))          # halfway down the cosine
    assert lr_at(cfg, 100) == pytest.approx(1e-3)
    after = [lr_at(cfg, s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_cli_flags_map_onto_the_config():
    args = cli.build_parser().parse_args(["train", *TINY_ARGS, "--block-option", "act=relu", "--out", "x"])
    assert config_from_args(args) == TrainConfig(**{**TINY, "block_options": {"drop": 0.1, "act": "relu"}})
    assert parse_value("8") == 8 and parse_value("0.5") == 0.5 and parse_value("true") is True
    assert parse_value("True") is True and parse_value("None") is None and parse_value("abc") == "abc"
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_layers("mhsa, moh,deconstructed:fixed") == ["mhsa", "moh", "deconstructed:fixed"]
    assert parse_layers('[{"name": "moh", "top_k": 2}, "mhsa"]') == [{"name": "moh", "top_k": 2}, "mhsa"]


# --- a run and its files ----------------------------------------------------------------------------

def test_run_writes_config_metrics_curves_and_checkpoints(reference):
    out, result = reference
    assert json.loads((out / "config.json").read_text()) == TrainConfig(**TINY).to_dict()
    records = _records(out)
    header = records[0]
    assert header["type"] == "header" and header["config"] == TrainConfig(**TINY).to_dict()
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
    model = create_task("assoc_recall", **TINY["task_options"]).build_model(32, 4, ["mhsa", "moh"], mlp_ratio=2.0)
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


def test_names_and_options_get_the_registries_errors(capsys, tmp_path):
    def run(*args: str) -> str:
        assert cli.main(["train", *TINY_ARGS, "--out", str(tmp_path / "x"), "--no-progress", *args]) == 2
        return capsys.readouterr().err

    assert "did you mean 'mhsa'" in run("--layers", "mhsa,mhsaa")
    assert "unknown task 'assoc_recal'" in run("--task", "assoc_recal")
    err = run("--task-option", "num_pears=3")
    assert "num_pears" in err and "options:" in err and "num_pairs" in err
    assert "no causal mode" in run("--layers", "infsa")
    assert "steps must be a positive int" in run("--steps", "0")
    assert "lr must be" in run("--lr", "-1")
    assert not (tmp_path / "x").exists()                                 # nothing written on bad input


def test_batch_must_divide_over_the_processes(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="divisible by 3"):
        train(TrainConfig(**TINY), None, progress=False)


# --- checkpoints and resume -------------------------------------------------------------------------

def test_resume_refuses_missing_corrupt_and_different_checkpoints(reference, tmp_path):
    ref, _ = reference
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        train(TrainConfig(**TINY), resume=tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="not a folder"):
        train(TrainConfig(**TINY), resume=tmp_path / "absent", progress=False)
    cfg = TrainConfig(**{**TINY, "steps": 60})
    run = tmp_path / "run"

    def fresh() -> Path:  # a copy of the reference run; returns its newest checkpoint folder
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(ref, run)
        return run / "ckpt" / "step-00000040"

    fresh()
    with pytest.raises(CheckpointError, match=r"differs in layers, dim .*dim: checkpoint 32, now 48"):
        train(TrainConfig(**{**TINY, "dim": 48, "layers": ["mhsa"], "steps": 60}), resume=run, progress=False)
    with pytest.raises(CheckpointError, match="at step 40 and steps is 40; pass a larger --steps"):
        train(TrainConfig(**TINY), resume=run, progress=False)
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


def test_killed_run_resumes_to_the_uninterrupted_result(reference, tmp_path):
    """SIGINT a real `python -m attnlab train` once it has a checkpoint; resuming gives the reference's numbers."""
    ref, _ = reference
    out = tmp_path / "run"
    # Throttled so that the signal lands mid-run on a slow machine; sleeping changes no number.
    env = _subprocess_env(**{train_mod.THROTTLE_ENV: "0.1"})
    proc = subprocess.Popen([sys.executable, "-m", "attnlab", "train", *TINY_ARGS, "--out", str(out), "--no-progress"],
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


def test_sigterm_saves_exits_143_and_resumes_exactly(reference, tmp_path, monkeypatch, capsys):
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
    assert cli.main(["train", *TINY_ARGS, "--out", str(out), "--no-progress"]) == 143
    err = capsys.readouterr().err
    assert f"stopped by SIGTERM after step 14; checkpoint saved in {out / 'ckpt' / 'step-00000014'}" in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL          # handlers restored
    monkeypatch.setattr(assoc_recall.AssocRecall, "batch", original)
    assert cli.main(["train", "--resume", str(out), "--no-progress"]) == 0
    _assert_same_as_reference(out, ref)


def test_interrupt_without_output_folder_saves_nothing(monkeypatch):
    from attnlab.tasks import assoc_recall
    original = assoc_recall.AssocRecall.batch

    def batch(self, split, index, batch_size):
        if split == "train" and index == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, split, index, batch_size)

    monkeypatch.setattr(assoc_recall.AssocRecall, "batch", batch)
    with pytest.raises(TrainInterrupted, match="stopped by SIGINT after step 4; nothing saved") as info:
        train(TrainConfig(**TINY), None, progress=False)
    assert info.value.exit_code == 130 and info.value.checkpoint is None


# --- several processes ------------------------------------------------------------------------------

def test_two_processes_follow_the_one_process_curve(tmp_path):
    # No dropout here: each rank draws its own masks, so only a deterministic model can match.
    cfg = {**TINY, "block_options": {"drop": 0}}
    ref = tmp_path / "one"
    train(TrainConfig(**cfg), ref, progress=False)
    out = tmp_path / "ddp"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*torchrun, "-m", "attnlab", "train", *TINY_ARGS, "--block-option", "drop=0",
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
def test_cuda_run_checkpoints_and_resumes(tmp_path, monkeypatch):
    """On CUDA: CUDA RNG state in the checkpoint, and a SIGTERM'd run resumes to the uninterrupted curve.

    Close rather than bit-exact: CUDA's embedding backward accumulates with atomics, in any order.
    """
    from attnlab.tasks import assoc_recall
    cfg = TrainConfig(**{**TINY, "device": "cuda"})
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
