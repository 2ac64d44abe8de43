"""The training loop: train a task's model built from any mix of mechanisms, resumably, on 1..N processes.

    from attnlab.train import TrainConfig, train
    result = train(TrainConfig(task="assoc_recall", layers=["mhsa", "moh"], steps=200), "runs/x")

One step: batch `step` of the task's train split (a pure function of the task options and the
index, so data order survives a restart by construction), loss + aux_weight * model.aux_loss,
AdamW with decay on weights of rank >= 2 only, gradient clipping, and a learning rate that is a
pure function of the step (`lr_at`). Step counts are optimizer updates done: the eval "at step s"
sees the model after s updates; step 0 is the initial model.

Output folder (rank 0 writes it):
    config.json     the TrainConfig
    metrics.jsonl   header, log, eval and resume records (see attnlab.train.metrics)
    curves.png      train/val loss and the task's quality metric against step
    ckpt/           checkpoints (see attnlab.train.checkpoint)

Checkpoints: every `checkpoint_every` steps, at the end, and on SIGINT/SIGTERM (the current step
finishes, a checkpoint is saved, TrainInterrupted is raised; the command exits with 130/143).
They hold the torch RNG states of every rank, so a resumed run on the same device and thread
count ends with exactly the numbers of an uninterrupted one.

Several processes (torchrun): every rank takes its contiguous slice of the same global batch
(`slice_batch`), gradients and train metrics are averaged over ranks after backward (the global
mean when every row has the same number of scored positions, as in the token tasks here), and
evaluation runs the same validation batches on every rank.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnlab._io import write_text
from attnlab.tasks import Task, create_task, slice_batch
from attnlab.train import distributed
from attnlab.train.checkpoint import checkpoint_to_resume, load_weights, save_checkpoint
from attnlab.train.config import TrainConfig, check_layers, lr_at
from attnlab.train.metrics import (MetricsLog, ProgressDisplay, Window, environment, now, plot_curves,
                                   read_records, records_until)

# Tests (and demos of Ctrl-C) slow each step down by this many seconds, outside the timing.
THROTTLE_ENV = "ATTNLAB_TRAIN_THROTTLE_S"


@dataclass
class TrainResult:
    config: TrainConfig
    history: list[dict]          # one per eval: step, tokens, train_*, val_*, elapsed
    final: dict                  # the last eval's val_* metrics
    params: int
    tokens_per_s: float          # this session's training tokens over its training wall time
    out_dir: Path | None


class TrainInterrupted(RuntimeError):
    """SIGINT/SIGTERM stopped a run after a whole step; `checkpoint` is where it was saved (or None)."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, out_dir: Path | None):
        self.signum, self.step, self.checkpoint, self.out_dir = signum, step, checkpoint, out_dir
        name = signal.Signals(signum).name
        where = f"checkpoint saved in {checkpoint}" if checkpoint else "nothing saved (no output folder)"
        super().__init__(f"stopped by {name} after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _StopFlag:
    """Records SIGINT/SIGTERM instead of dying, so the step in progress can finish and be saved.

    A second SIGINT while one is pending raises KeyboardInterrupt at once (nothing saved).
    """

    def __init__(self):
        self.signum = 0
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, out_dir: str | Path | None = None, *, resume: str | Path | None = None,
          progress: bool = True) -> TrainResult:
    """Train `config`; write config, metrics, curves and checkpoints into out_dir (rank 0) if given.

    resume: a run folder with a checkpoint; `config` must equal its config except RESUME_MAY_CHANGE
    fields (out_dir defaults to that folder). Raises TrainInterrupted after saving on SIGINT/SIGTERM.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    resume_from = checkpoint_to_resume(resume, config) if resume is not None else None
    if out_dir is None:
        out_dir = resume
    out_dir = Path(out_dir) if out_dir is not None else None
    task = create_task(config.task, **{"seed": config.seed, **config.task_options})  # the registry's errors
    check_layers(task, config.layers)
    world = distributed.world_size()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} does not split over {world} processes (WORLD_SIZE); "
                         f"choose a global batch size divisible by {world}")

    dist_info = distributed.setup(config.device)
    previous_threads = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        device = distributed.resolve_device(config.device, dist_info)
        with _StopFlag() as stop:
            run = _Run(config, task, out_dir, device, dist_info, resume_from)
            result = _steps(run, stop, show=progress and dist_info.rank == 0)
        # rank 0 still writes files after the last step; a peer that tears gloo down
        # first can abort ("terminate called without an active exception")
        distributed.barrier(dist_info)
        return result
    finally:
        torch.set_num_threads(previous_threads)
        distributed.teardown(dist_info)


def _steps(run: "_Run", stop: _StopFlag, show: bool) -> TrainResult:
    """Train from run.step to config.steps: log, eval and checkpoint on schedule; stop on a signal."""
    config, step = run.config, run.step
    with ProgressDisplay(show, run.label, run.task.quality, config.steps, step) as display:
        if step == 0:
            display.evaluated(run.evaluate())
        while step < config.steps:
            loss, signum = run.train_step(stop)
            step = run.step
            if step % config.log_every == 0:
                run.log()
                display.loss(loss)
            if step % config.eval_every == 0 or step == config.steps:
                display.evaluated(run.evaluate())
            display.advanced(step, run.tokens_per_s())
            due = step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0)
            saved = run.checkpoint() if due else None
            if signum and step < config.steps:
                raise TrainInterrupted(signum, step, saved if due else run.checkpoint(), run.out_dir)
    return run.result()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weights of rank >= 2 only (not on biases, norms, embeddings' scales)."""
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class _Run:
    """One training session's model, optimizer and bookkeeping; `step` is the number of updates done."""

    def __init__(self, config: TrainConfig, task: Task, out_dir: Path | None, device: torch.device,
                 dist_info: distributed.Dist, resume_from: tuple[Path, dict[str, Any]] | None):
        self.config, self.task, self.out_dir, self.device, self.dist = config, task, out_dir, device, dist_info
        self.writer = out_dir is not None and dist_info.rank == 0
        torch.manual_seed(config.seed)                              # identical initial weights on every rank
        self.model = task.build_model(config.dim, config.num_heads, config.layers, mlp_ratio=config.mlp_ratio,
                                      **config.block_options).to(device)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n_params = sum(p.numel() for p in self.params)
        self.optimizer = torch.optim.AdamW(_param_groups(self.model, config.weight_decay), lr=config.lr)
        self.tokens_per_step = config.batch_size * task.seq_len
        self.label = f"{task.name} [{','.join(l if isinstance(l, str) else l['name'] for l in config.layers)}]"
        self.throttle = float(os.environ.get(THROTTLE_ENV, "0") or 0)
        self.step, self.elapsed_before, self.history = 0, 0.0, []
        self.windows = {"log": Window(), "eval": Window()}
        self.session_tokens, self.session_time = 0, 0.0
        self.metrics = MetricsLog(out_dir / "metrics.jsonl" if self.writer else None)
        env = environment(device, dist_info.world)
        if resume_from is not None:
            self._resume(*resume_from, env)
        else:
            if dist_info.active:
                distributed.broadcast_module(self.model)
                # Each rank draws its own dropout/noise from here on.
                torch.manual_seed(config.seed + 1_000_003 * dist_info.rank)
            if self.writer:
                self._write_start([{"type": "header", "config": config.to_dict(),
                                    "task": {"name": task.name, **task.options()}, "quality": task.quality,
                                    "higher_is_better": task.higher_is_better, "seq_len": task.seq_len,
                                    "tokens_per_step": self.tokens_per_step, "params": self.n_params,
                                    "env": env, "time": now()}])
        self.wall_start = time.perf_counter()

    def _resume(self, folder: Path, state: dict[str, Any], env: dict[str, Any]) -> None:
        load_weights(folder, self.model, self.optimizer, self.device)
        self.step, self.history = state["step"], state["history"]
        self.windows = {k: Window(v) for k, v in state["windows"].items()}
        self.elapsed_before = state.get("elapsed", 0.0)
        if not distributed.restore_rng(state["rng"], self.device, self.dist, state.get("world_size", 1)):
            torch.manual_seed(self.config.seed * 1_000_003 + self.step * 7_919 + self.dist.rank)
            if self.dist.rank == 0:
                print(f"attnlab train: note: the checkpoint was saved by {state.get('world_size')} "
                      f"process(es), this run has {self.dist.world}; random streams (dropout, noise) restart, "
                      "so the result will not equal an uninterrupted run's", file=sys.stderr)
        if self.writer:
            # Keep what the interrupted run logged up to its checkpoint; later lines are redone.
            old = read_records(self.metrics.path) or read_records(folder.parent.parent / "metrics.jsonl")
            self._write_start([*records_until(old, self.step),
                               {"type": "resume", "step": self.step, "from": str(folder), "env": env,
                                "time": now()}])

    def _write_start(self, records: list[dict[str, Any]]) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.out_dir / "config.json", json.dumps(self.config.to_dict(), indent=1) + "\n")
        self.metrics.start(records)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.wall_start

    def tokens_per_s(self) -> float:
        return self.session_tokens / max(self.session_time, 1e-9)

    def train_step(self, stop: _StopFlag) -> tuple[float, int]:
        """One optimizer update; returns its train loss and the signal (if any) every rank agrees to stop on."""
        config, model, t0 = self.config, self.model, time.perf_counter()
        batch = self.task.batch("train", self.step, config.batch_size)
        if self.dist.active:
            batch = slice_batch(batch, self.dist.rank, self.dist.world)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        loss, metrics = self.task.loss(model, batch)
        metrics = {"loss": float(loss.detach()), **metrics}
        aux = getattr(model, "aux_loss", None)
        total = loss
        if aux is not None:
            metrics = {**metrics, "aux_loss": float(aux.detach())}
            if config.aux_weight:
                total = loss + config.aux_weight * aux
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        signum = stop.signum                      # read after the step's work: a signal during it still counts
        if self.dist.active:
            metrics, signum = distributed.all_reduce_step(self.params, metrics, signum, self.dist.world)
        metrics = {k: float(metrics[k]) for k in sorted(metrics)}
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"train loss is {metrics['loss']} at step {self.step + 1}; lower --lr "
                                     f"(now {config.lr}) or raise --warmup; the last checkpoint is unchanged")
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, config.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(config, self.step)
        self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        self.step += 1
        self.session_tokens += self.tokens_per_step
        self.session_time += seconds
        for w in self.windows.values():
            w.add(metrics, seconds)
        if self.throttle:
            time.sleep(self.throttle)
        return metrics["loss"], signum

    def log(self) -> None:
        """A log record: the train metrics since the last one."""
        w = self.windows["log"]
        self.metrics.emit({"type": "log", "step": self.step, "tokens": self.step * self.tokens_per_step,
                           **w.means(), "lr": lr_at(self.config, self.step - 1),
                           "tokens_per_s": w.steps * self.tokens_per_step / max(w.train_time, 1e-9),
                           "elapsed": self.elapsed()})
        self.windows["log"] = Window()

    def evaluate(self) -> dict[str, Any]:
        """An eval record: val metrics of the model now, train metrics since the last eval."""
        config = self.config
        val = self.task.evaluate(self.model, batches=config.eval_batches, batch_size=config.eval_batch_size,
                                 device=self.device)
        record = {"type": "eval", "step": self.step, "tokens": self.step * self.tokens_per_step,
                  **self.windows["eval"].means(), **{f"val_{k}": v for k, v in val.items()},
                  "elapsed": self.elapsed()}
        self.windows["eval"] = Window()
        self.history.append({k: v for k, v in record.items() if k != "type"})
        self.metrics.emit(record)
        return record

    def checkpoint(self) -> Path | None:
        """Save a checkpoint (rank 0) and redraw the curves; None without an output folder or on other ranks."""
        if self.out_dir is None:
            return None
        rng = distributed.gather_rng(self.device, self.dist)    # a collective: every rank takes part
        if not self.writer:
            return None
        config, optimizer = self.config, self.optimizer
        state = {"config": config.to_dict(), "task": self.task.options(), "world_size": self.dist.world,
                 "rng": rng, "schedule": {"kind": "warmup_cosine", "next_lr": lr_at(config, self.step)},
                 "optimizer": {"kind": "AdamW", "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                                  for g in optimizer.param_groups]},
                 "windows": {k: w.state() for k, w in self.windows.items()}, "history": self.history,
                 "elapsed": self.elapsed(), "params": self.n_params}
        path = save_checkpoint(self.out_dir, self.step, self.model, optimizer, state)
        plot_curves(self.metrics.records, self.task.quality,
                    f"{self.label}  dim={config.dim}  step {self.step}", self.out_dir / "curves.png")
        return path

    def result(self) -> TrainResult:
        final = {k: v for k, v in self.history[-1].items() if k.startswith("val_")} if self.history else {}
        return TrainResult(config=self.config, history=self.history, final=final, params=self.n_params,
                           tokens_per_s=self.tokens_per_s(), out_dir=self.out_dir)
