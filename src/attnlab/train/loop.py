"""`attnlab train`: train a task's model built from any mix of mechanisms, resumably, on 1..N processes.

    attnlab train --task assoc_recall --layers mhsa,moh --dim 64 --steps 1000 --out runs/mqar
    attnlab train --resume runs/mqar                   # continue after Ctrl-C / SIGTERM / a crash
    attnlab train --resume runs/mqar --steps 2000      # or train further
    torchrun --nproc_per_node=2 -m attnlab train --task assoc_recall --layers mhsa,mhsa --out runs/ddp

    from attnlab.train import TrainConfig, train
    result = train(TrainConfig(task="assoc_recall", layers=["mhsa", "moh"], steps=200), "runs/x")

One step: batch `step` of the task's train split (a pure function of the task options and the
index, so data order survives a restart by construction), loss + aux_weight * model.aux_loss,
AdamW with decay on weights of rank >= 2 only, gradient clipping, and a learning rate that is a
pure function of the step (linear warm-up over `warmup` steps, then cosine down to
`min_lr_ratio * lr` at `steps`). Step counts are optimizer updates done: the eval "at step s"
sees the model after s updates; step 0 is the initial model.

Output folder (rank 0 writes it):
    config.json     the TrainConfig
    metrics.jsonl   {"type": "header"} (config, task, environment), then {"type": "log"} every
                    `log_every` steps (train metrics averaged over the window, lr, tokens/s) and
                    {"type": "eval"} every `eval_every` steps and at the end (train metrics since
                    the previous eval, val_* metrics); {"type": "resume"} where a run continued
    curves.png      train/val loss and the task's quality metric against step
    ckpt/           step-XXXXXXXX/{model,optimizer}.safetensors + state.json, and `latest`

Checkpoints: every `checkpoint_every` steps, at the end, and on SIGINT/SIGTERM (the current step
finishes, a checkpoint is saved, the command exits with 130/143). Tensors (weights, buffers,
AdamW's exp_avg/exp_avg_sq/step per parameter) go in safetensors files, everything else (step,
config, torch RNG states of every rank as base64, running metric sums, history) in JSON. Each
checkpoint is written into a hidden temporary folder, renamed into place in one step, and only
then named by `ckpt/latest` (itself replaced atomically), so a kill at any moment leaves the
previous checkpoint intact. Nothing is ever read with pickle/torch.load. A resumed run on the
same device and thread count ends with exactly the numbers of an uninterrupted one.

Several processes (torchrun sets WORLD_SIZE/RANK/LOCAL_RANK): gloo on CPU, nccl on CUDA (one GPU
per process). Every rank takes its contiguous slice of the same global batch (`slice_batch`), and
after backward the gradients are averaged over ranks with one all-reduce of one flat buffer,
as DistributedDataParallel does, but without DDP's per-parameter hooks, so mechanisms that leave a
parameter without gradient in some step (routing, top-k) need no `find_unused_parameters`; a
parameter without gradient on every rank keeps `grad=None`, as in one process. The train metrics
are averaged over ranks (the global mean when every row has the same number of scored positions,
as in the token tasks here). Evaluation runs the same validation batches on every rank.
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnlab._args import key_value, parse_value
from attnlab._env import gpu_name, software_and_machine
from attnlab._io import atomic_write, fsync_dir, write_text

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 2          # the newest checkpoints kept in ckpt/ (older ones are deleted)
# Fields that may differ between a checkpoint's config and the resumed run's: more (or fewer)
# steps, and how often to save. Anything else is a different experiment.
RESUME_MAY_CHANGE = ("steps", "checkpoint_every")
# Tests (and demos of Ctrl-C) slow each step down by this many seconds, outside the timing.
THROTTLE_ENV = "ATTNLAB_TRAIN_THROTTLE_S"
TIMING_KEYS = ("elapsed", "tokens_per_s", "train_time")  # differ between runs; everything else is exact


@dataclass
class TrainConfig:
    """Everything that defines a training run (JSON-serialisable; saved in config.json and checkpoints).

    layers: one entry per block, a mechanism name ("mhsa", "deconstructed:fixed") or a dict
    {"name": "moh", "top_k": 2} with that layer's mechanism options. task_options go to the
    task's constructor (its `seed` defaults to `seed`); block_options to every Block (act, drop,
    softmax). batch_size is the global batch, split over processes. checkpoint_every=0 saves only
    at the end and on a signal. threads=None keeps torch's thread count.
    """

    task: str = "assoc_recall"
    task_options: dict = field(default_factory=dict)
    layers: list = field(default_factory=lambda: ["mhsa", "mhsa"])
    dim: int = 64
    num_heads: int = 4
    mlp_ratio: float = 4.0
    block_options: dict = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    aux_weight: float = 0.01
    eval_every: int = 100
    eval_batches: int = 4
    eval_batch_size: int = 64
    log_every: int = 10
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self):
        def integer(name: str, low: int) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")

        def number(name: str, low: float, *, strict: bool = False, high: float | None = None) -> None:
            v = getattr(self, name)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
                and (v > low if strict else v >= low) and (high is None or v <= high)
            if not ok:
                bound = f"> {low}" if strict else f">= {low}"
                raise ValueError(f"{name} must be a finite number {bound}"
                                 + (f" and <= {high}" if high is not None else "") + f", got {v!r}")

        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task must be a task name, got {self.task!r}")
        for name in ("task_options", "block_options"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if isinstance(self.layers, (str, dict)) or not isinstance(self.layers, (list, tuple)):
            raise TypeError(f"layers must be a list of mechanism names or dicts, got {self.layers!r}")
        self.layers = list(self.layers)
        if not self.layers:
            raise ValueError("layers must name at least one mechanism")
        for layer in self.layers:
            if not (isinstance(layer, str) and layer) and not (isinstance(layer, dict)
                                                                and isinstance(layer.get("name"), str)):
                raise TypeError(f"each layer must be a mechanism name or a dict with a 'name', got {layer!r}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps <= 0:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        for name in ("dim", "num_heads", "batch_size", "eval_every", "eval_batches", "eval_batch_size",
                     "log_every"):
            integer(name, 1)
        for name in ("warmup", "checkpoint_every", "seed"):
            integer(name, 0)
        number("lr", 0.0, strict=True)
        number("min_lr_ratio", 0.0, high=1.0)
        for name in ("mlp_ratio", "weight_decay", "grad_clip", "aux_weight"):
            number(name, 0.0)
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {self.device!r}")
        if self.threads is not None:
            integer("threads", 1)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown} (fields: {', '.join(sorted(names))})")
        return cls(**data)

    def differences(self, other: "TrainConfig") -> dict[str, tuple[Any, Any]]:
        """{field: (self's value, other's value)} for every field that differs."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}


@dataclass
class TrainResult:
    config: TrainConfig
    history: list[dict]          # one per eval: step, tokens, train_*, val_*, elapsed
    final: dict                  # the last eval's val_* metrics
    params: int
    tokens_per_s: float          # this session's training tokens over its training wall time
    out_dir: Path | None


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the run."""


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


# --- schedule --------------------------------------------------------------------------------------

def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of the update from `step` to `step + 1`: linear warm-up, then cosine to min_lr_ratio."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# --- processes -------------------------------------------------------------------------------------

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False     # we initialised the process group, so we destroy it

    @property
    def active(self) -> bool:
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {text!r}") from None


def _setup_distributed(device_kind: str) -> _Dist:
    import torch.distributed as dist
    world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world <= 1:
        return _Dist()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
        owns = True
    return _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, owns_group=owns)


def _resolve_device(config: TrainConfig, dist_info: _Dist) -> torch.device:
    kind = config.device
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {config.device!r}, but torch.cuda.is_available() is False")
        if dist_info.active:
            if kind != "cuda":
                raise ValueError(f"with several processes give device 'cuda' (each takes cuda:LOCAL_RANK), "
                                 f"got {config.device!r}")
            kind = f"cuda:{dist_info.local_rank}"
        device = torch.device(kind)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _device_kind(config: TrainConfig) -> str:
    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device.split(":")[0]


# --- environment, files ---------------------------------------------------------------------------

def environment(device: torch.device, dist_info: _Dist) -> dict[str, Any]:
    """What the numbers depend on; no hostname."""
    return {**software_and_machine(), "num_threads": torch.get_num_threads(), "device": str(device),
            "gpu": gpu_name(device), "world_size": dist_info.world}


def _read_records(path: Path) -> list[dict[str, Any]]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    break            # a line cut short by a kill: it and anything after are dropped
    return records


# --- checkpoints ----------------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as named CPU tensors: '<param name>/<exp_avg|exp_avg_sq|step|...>'."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if not torch.is_tensor(value):
                    raise TypeError(f"optimizer state {names[id(p)]}/{key} is a {type(value).__name__}, "
                                    "expected a tensor")
                out[f"{names[id(p)]}/{key}"] = value.detach().to("cpu").contiguous()
    return out


def _load_optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer,
                            tensors: dict[str, torch.Tensor], where: Path) -> None:
    params = dict(model.named_parameters())
    state: dict[nn.Parameter, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, slot = key.rpartition("/")
        if name not in params:
            raise CheckpointError(f"{where}: optimizer state for unknown parameter {name!r}")
        p = params[name]
        if slot == "step":                   # AdamW keeps its step count as a CPU scalar tensor
            state.setdefault(p, {})[slot] = value.clone()
        else:
            if value.shape != p.shape:
                raise CheckpointError(f"{where}: optimizer state {key} has shape {tuple(value.shape)}, "
                                      f"the parameter has {tuple(p.shape)}")
            state.setdefault(p, {})[slot] = value.to(device=p.device, dtype=p.dtype).clone()
    optimizer.state.clear()
    for p, s in state.items():
        optimizer.state[p] = s


def save_checkpoint(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write ckpt/step-XXXXXXXX atomically, point ckpt/latest at it, drop older checkpoints."""
    from safetensors.torch import save_file, save_model
    root = out_dir / "ckpt"
    root.mkdir(parents=True, exist_ok=True)
    name, i = f"step-{step:08d}", 1
    while (root / name).exists():        # e.g. saved again at the same step after a resume
        name, i = f"step-{step:08d}-{i}", i + 1
    staging = root / f".{name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        atomic_write(staging / "model.safetensors", lambda tmp: save_model(model, str(tmp)))
        opt = _optimizer_tensors(model, optimizer)
        atomic_write(staging / "optimizer.safetensors", lambda tmp: save_file(opt, str(tmp)))
        write_text(staging / "state.json", json.dumps({**state, "format": CHECKPOINT_FORMAT, "step": step}))
        fsync_dir(staging)
        os.replace(staging, root / name)                      # the whole checkpoint appears at once
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    fsync_dir(root)
    write_text(root / "latest", name + "\n")                  # ... and becomes the one to resume
    fsync_dir(root)
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-"))
    for old in [p for p in done if p.name != name][:-(KEEP_CHECKPOINTS - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return root / name


def load_weights(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 device: torch.device | str = "cpu") -> None:
    """Load a checkpoint folder's weights (and AdamW state) into `model` (and `optimizer`): safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model
    try:
        load_model(model, str(folder / "model.safetensors"), strict=True, device=str(device))
        opt_tensors = load_file(str(folder / "optimizer.safetensors")) if optimizer is not None else {}
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot resume: checkpoint {folder} does not load ({e})") from None
    if optimizer is not None:
        _load_optimizer_tensors(model, optimizer, opt_tensors, folder)


def find_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint folder, its state.json) named by run_dir/ckpt/latest; CheckpointError otherwise."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"cannot resume: {run_dir} is not a folder")
    latest = run_dir / "ckpt" / "latest"
    if not latest.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint in {run_dir} ({latest} is missing; "
                              "`attnlab train --out DIR` writes one every --checkpoint-every steps)")
    name = latest.read_text().strip()
    folder = run_dir / "ckpt" / name
    if not name or "/" in name or not folder.is_dir():
        raise CheckpointError(f"cannot resume: {latest} names {name!r}, which is not a checkpoint folder in "
                              f"{run_dir / 'ckpt'}")
    for needed in ("model.safetensors", "optimizer.safetensors", "state.json"):
        if not (folder / needed).is_file():
            raise CheckpointError(f"cannot resume: checkpoint {folder} has no {needed}")
    try:
        state = json.loads((folder / "state.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot resume: {folder / 'state.json'} is corrupt ({e})") from None
    missing = [k for k in ("format", "step", "config", "rng", "history", "windows") if k not in state]
    if not isinstance(state, dict) or missing:
        raise CheckpointError(f"cannot resume: {folder / 'state.json'} lacks {missing or 'a JSON object'}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"cannot resume: {folder} has checkpoint format {state['format']!r}, "
                              f"this attnlab reads {CHECKPOINT_FORMAT}")
    return folder, state


def load_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig of the newest checkpoint in run_dir."""
    _, state = find_checkpoint(run_dir)
    try:
        return TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot resume: the checkpoint's config is invalid ({e})") from None


# --- metrics ---------------------------------------------------------------------------------------

class _Window:
    """Running sums of per-step train metrics, train wall time and steps since the window opened."""

    def __init__(self, data: dict[str, Any] | None = None):
        data = data or {}
        self.sums: dict[str, float] = dict(data.get("sums", {}))
        self.steps: int = data.get("steps", 0)
        self.train_time: float = data.get("train_time", 0.0)

    def add(self, metrics: dict[str, float], seconds: float) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        self.train_time += seconds

    def means(self) -> dict[str, float | None]:
        return {f"train_{k}": v / self.steps for k, v in self.sums.items()} if self.steps else {"train_loss": None}

    def state(self) -> dict[str, Any]:
        return {"sums": self.sums, "steps": self.steps, "train_time": self.train_time}


def _plot(records: list[dict[str, Any]], quality: str, title: str, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logs = [r for r in records if r.get("type") == "log"]
    evals = [r for r in records if r.get("type") == "eval"]
    fig = Figure(figsize=(10, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax_loss, ax_q = fig.subplots(1, 2)
    if logs:
        ax_loss.plot([r["step"] for r in logs], [r["train_loss"] for r in logs], label="train", alpha=0.8)
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r.get("val_loss") for r in evals], marker="o", label="val")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(fontsize=8)
    ax_loss.grid(True, alpha=0.3)
    key = f"val_{quality}"
    if logs and f"train_{quality}" in logs[-1] and quality != "loss":
        ax_q.plot([r["step"] for r in logs], [r.get(f"train_{quality}") for r in logs], label="train", alpha=0.8)
    if evals and key in evals[-1]:
        ax_q.plot([r["step"] for r in evals], [r.get(key) for r in evals], marker="o", label="val")
    ax_q.set_xlabel("step")
    ax_q.set_ylabel(quality)
    if ax_q.lines:
        ax_q.legend(fontsize=8)
    ax_q.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


# --- signals ---------------------------------------------------------------------------------------

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


# --- the loop ---------------------------------------------------------------------------------------

def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for _, p in model.named_parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _check_layers(task, layers: list) -> None:
    from attnlab.models.transformer import parse_layer
    from attnlab.registry import get_spec
    for layer in layers:
        name, _ = parse_layer(layer)
        spec = get_spec(name)                     # unknown names: ValueError with close matches
        if task.causal and not spec.causal:
            raise ValueError(f"task {task.name!r} trains a causal model, and mechanism {name!r} has no causal "
                             f"mode (spec.causal=False); pick a causal mechanism")


def _all_reduce_step(params: list[nn.Parameter], metrics: dict[str, float], signum: int,
                     world: int) -> tuple[dict[str, float], int]:
    """Average gradients and metrics over ranks in one all-reduce; agree on whether to stop.

    Buffer: [every parameter's gradient (zeros where absent), 1 per parameter that has one,
    metric values, SIGINT count, SIGTERM count].
    """
    import torch.distributed as dist
    device = params[0].device
    has = [p.grad is not None for p in params]
    pieces = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    keys = sorted(metrics)
    tail = [*map(float, has), *(metrics[k] for k in keys),
            float(signum == signal.SIGINT), float(signum == signal.SIGTERM)]
    flat = torch.cat([*pieces, torch.tensor(tail, device=device, dtype=torch.float32)])
    dist.all_reduce(flat)
    total = sum(p.numel() for p in params)
    counts = flat[total:total + len(params)].tolist()
    offset = 0
    for p, count in zip(params, counts):
        n = p.numel()
        p.grad = (flat[offset:offset + n] / world).view_as(p).to(p.dtype) if count > 0 else None
        offset += n
    rest = flat[total + len(params):].tolist()
    averaged = {k: v / world for k, v in zip(keys, rest[:len(keys)])}
    n_int, n_term = rest[len(keys):]
    stop = signal.SIGTERM if n_term > 0 else (signal.SIGINT if n_int > 0 else 0)
    return averaged, int(stop)


def _gather_rng(device: torch.device, dist_info: _Dist) -> dict[str, list[str] | None]:
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    if not dist_info.active:
        return {"torch_cpu": [_b64(cpu)], "torch_cuda": [_b64(cuda)] if cuda is not None else None}
    import torch.distributed as dist
    comm = device if device.type == "cuda" else torch.device("cpu")   # nccl gathers CUDA tensors only

    def gather(t: torch.Tensor) -> list[str]:
        parts = [torch.empty_like(t, device=comm) for _ in range(dist_info.world)]
        dist.all_gather(parts, t.to(comm))
        return [_b64(x) for x in parts]

    return {"torch_cpu": gather(cpu), "torch_cuda": gather(cuda) if cuda is not None else None}


def _restore_rng(rng: dict[str, Any], device: torch.device, dist_info: _Dist, saved_world: int) -> bool:
    """Restore this rank's RNG states; False when the checkpoint has none for this rank."""
    cpu = rng.get("torch_cpu") or []
    if saved_world != dist_info.world or dist_info.rank >= len(cpu):
        return False
    torch.set_rng_state(_unb64(cpu[dist_info.rank]))
    cuda = rng.get("torch_cuda")
    if device.type == "cuda" and cuda:
        torch.cuda.set_rng_state(_unb64(cuda[dist_info.rank]), device)
    return True


def train(config: TrainConfig, out_dir: str | Path | None = None, *, resume: str | Path | None = None,
          progress: bool = True) -> TrainResult:
    """Train `config`; write config, metrics, curves and checkpoints into out_dir (rank 0) if given.

    resume: a run folder with a checkpoint; `config` must equal its config except RESUME_MAY_CHANGE
    fields (out_dir defaults to that folder). Raises TrainInterrupted after saving on SIGINT/SIGTERM.
    """
    from attnlab.tasks import create_task, slice_batch

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    checkpoint_folder, ckpt_state = (None, None)
    if resume is not None:
        checkpoint_folder, ckpt_state = find_checkpoint(resume)
        saved = load_config(resume)
        changed = {k: v for k, v in saved.differences(config).items() if k not in RESUME_MAY_CHANGE}
        if changed:
            detail = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, v in changed.items() for a, b in [v])
            raise CheckpointError(f"cannot resume {resume}: the config differs in {', '.join(changed)} ({detail}); "
                                  f"only {', '.join(RESUME_MAY_CHANGE)} may change when resuming")
        if config.steps <= ckpt_state["step"]:
            raise CheckpointError(f"cannot resume {resume}: its checkpoint is at step {ckpt_state['step']} and "
                                  f"steps is {config.steps}; pass a larger --steps to train further")
        if out_dir is None:
            out_dir = resume
    out_dir = Path(out_dir) if out_dir is not None else None

    task_options = {"seed": config.seed, **config.task_options}
    task = create_task(config.task, **task_options)        # unknown task / option: the registry's errors
    _check_layers(task, config.layers)

    world = _env_int("WORLD_SIZE", 1)
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} does not split over {world} processes (WORLD_SIZE); "
                         f"choose a global batch size divisible by {world}")
    dist_info = _setup_distributed(_device_kind(config))
    previous_threads = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        device = _resolve_device(config, dist_info)
        with _StopFlag() as stop:
            result = _run(config, task, out_dir, device, dist_info, checkpoint_folder, ckpt_state, stop,
                          progress, slice_batch)
        if dist_info.world > 1:
            # rank 0 still writes files after the last step; a peer that tears gloo down
            # first can abort ("terminate called without an active exception")
            import torch.distributed as dist
            dist.barrier()
        return result
    finally:
        torch.set_num_threads(previous_threads)
        if dist_info.owns_group:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run(config, task, out_dir, device, dist_info, checkpoint_folder, ckpt_state, stop, show_progress,
         slice_batch) -> TrainResult:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    writer = out_dir is not None and dist_info.rank == 0
    torch.manual_seed(config.seed)                                  # identical initial weights on every rank
    model = task.build_model(config.dim, config.num_heads, config.layers, mlp_ratio=config.mlp_ratio,
                             **config.block_options).to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr)
    tokens_per_step = config.batch_size * task.seq_len
    history: list[dict[str, Any]] = []
    windows = {"log": _Window(), "eval": _Window()}
    start_step, elapsed_before = 0, 0.0
    records: list[dict[str, Any]] = []
    env = environment(device, dist_info)

    if ckpt_state is not None:
        load_weights(checkpoint_folder, model, optimizer, device)
        start_step = ckpt_state["step"]
        history = ckpt_state["history"]
        windows = {k: _Window(v) for k, v in ckpt_state["windows"].items()}
        elapsed_before = ckpt_state.get("elapsed", 0.0)
        exact = _restore_rng(ckpt_state["rng"], device, dist_info, ckpt_state.get("world_size", 1))
        if not exact:
            torch.manual_seed(config.seed * 1_000_003 + start_step * 7_919 + dist_info.rank)
            if dist_info.rank == 0:
                print(f"attnlab train: note: the checkpoint was saved by {ckpt_state.get('world_size')} "
                      f"process(es), this run has {dist_info.world}; random streams (dropout, noise) restart, "
                      "so the result will not equal an uninterrupted run's", file=sys.stderr)
    elif dist_info.active:
        import torch.distributed as dist
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)
        # Each rank draws its own dropout/noise from here on.
        torch.manual_seed(config.seed + 1_000_003 * dist_info.rank)

    metrics_path = out_dir / "metrics.jsonl" if out_dir is not None else None
    quality = task.quality
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "config.json", json.dumps(config.to_dict(), indent=1) + "\n")
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        if ckpt_state is not None:
            # Keep what the interrupted run logged up to its checkpoint; later lines are redone.
            old = _read_records(metrics_path) or _read_records(checkpoint_folder.parent.parent / "metrics.jsonl")
            records = [r for r in old if r.get("type") in ("header", "resume") or r.get("step", 0) <= start_step]
            records.append({"type": "resume", "step": start_step, "from": str(checkpoint_folder), "env": env,
                            "time": now})
        else:
            records = [{"type": "header", "config": config.to_dict(), "task": {"name": task.name, **task.options()},
                        "quality": quality, "higher_is_better": task.higher_is_better, "seq_len": task.seq_len,
                        "tokens_per_step": tokens_per_step, "params": n_params, "env": env, "time": now}]
        write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in records))

    def emit(record: dict[str, Any]) -> None:
        records.append(record)
        if writer:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    err = Console(stderr=True)
    live = show_progress and dist_info.rank == 0 and err.is_terminal
    lines = show_progress and dist_info.rank == 0 and not err.is_terminal
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[val]}"),
                   TextColumn("{task.fields[speed]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                   console=err, disable=not live, refresh_per_second=4)
    label = f"{task.name} [{','.join(l if isinstance(l, str) else l['name'] for l in config.layers)}]"
    session_tokens, session_time = 0, 0.0
    wall_start = time.perf_counter()
    throttle = float(os.environ.get(THROTTLE_ENV, "0") or 0)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - wall_start

    def evaluate(step: int) -> dict[str, Any]:
        val = task.evaluate(model, batches=config.eval_batches, batch_size=config.eval_batch_size, device=device)
        record = {"type": "eval", "step": step, "tokens": step * tokens_per_step, **windows["eval"].means(),
                  **{f"val_{k}": v for k, v in val.items()}, "elapsed": elapsed()}
        windows["eval"] = _Window()
        history.append({k: v for k, v in record.items() if k != "type"})
        emit(record)
        if lines:
            shown = "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                              if isinstance(v, float) and k not in TIMING_KEYS)
            print(f"[{elapsed():7.1f} s] step {step}/{config.steps}  {shown}", file=sys.stderr, flush=True)
        return record

    def checkpoint(step: int) -> Path | None:
        rng = _gather_rng(device, dist_info)                 # a collective: every rank takes part
        if not writer:
            return None
        state = {"config": config.to_dict(), "task": task.options(), "world_size": dist_info.world, "rng": rng,
                 "schedule": {"kind": "warmup_cosine", "next_lr": lr_at(config, step)},
                 "optimizer": {"kind": "AdamW", "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                                  for g in optimizer.param_groups]},
                 "windows": {k: w.state() for k, w in windows.items()}, "history": history,
                 "elapsed": elapsed(), "params": n_params}
        path = save_checkpoint(out_dir, step, model, optimizer, state)
        _plot(records, quality, f"{label}  dim={config.dim}  step {step}", out_dir / "curves.png")
        return path

    step = start_step
    with bar:
        bar_task = bar.add_task(escape(label), total=config.steps, completed=step, loss="-", val="", speed="-")
        if step == 0:
            evaluate(0)
        while step < config.steps:
            t0 = time.perf_counter()
            batch = task.batch("train", step, config.batch_size)
            if dist_info.active:
                batch = slice_batch(batch, dist_info.rank, dist_info.world)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            loss, metrics = task.loss(model, batch)
            metrics = {"loss": float(loss.detach()), **metrics}
            aux = getattr(model, "aux_loss", None)
            total = loss
            if aux is not None:
                metrics = {**metrics, "aux_loss": float(aux.detach())}
                if config.aux_weight:
                    total = loss + config.aux_weight * aux
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            signum = stop.signum
            if dist_info.active:
                metrics, signum = _all_reduce_step(params, metrics, signum, dist_info.world)
            metrics = {k: float(metrics[k]) for k in sorted(metrics)}
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"train loss is {metrics['loss']} at step {step + 1}; lower --lr "
                                         f"(now {config.lr}) or raise --warmup; the last checkpoint is unchanged")
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, config.grad_clip)
            lr = lr_at(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            step += 1
            session_tokens += tokens_per_step
            session_time += seconds
            for w in windows.values():
                w.add(metrics, seconds)
            if throttle:
                time.sleep(throttle)

            if step % config.log_every == 0:
                w = windows["log"]
                emit({"type": "log", "step": step, "tokens": step * tokens_per_step, **w.means(), "lr": lr,
                      "tokens_per_s": w.steps * tokens_per_step / max(w.train_time, 1e-9), "elapsed": elapsed()})
                windows["log"] = _Window()
                bar.update(bar_task, loss=f"{metrics['loss']:.4f}")
            if step % config.eval_every == 0 or step == config.steps:
                record = evaluate(step)
                bar.update(bar_task, val=f"val {quality} {record.get(f'val_{quality}', float('nan')):.4g}")
            bar.update(bar_task, completed=step, speed=f"{session_tokens / max(session_time, 1e-9):,.0f}")
            saved = None
            if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                saved = checkpoint(step) if out_dir is not None else None
            if signum and step < config.steps:
                if saved is None and out_dir is not None:
                    saved = checkpoint(step)
                raise TrainInterrupted(signum, step, saved, out_dir)

    final = {k: v for k, v in history[-1].items() if k.startswith("val_")} if history else {}
    return TrainResult(config=config, history=history, final=final, params=n_params,
                       tokens_per_s=session_tokens / max(session_time, 1e-9), out_dir=out_dir)


# --- command line ----------------------------------------------------------------------------------


def parse_layers(text: str) -> list:
    """'mhsa,moh,deconstructed:fixed' or a JSON list ('[{"name": "moh", "top_k": 2}, "mhsa"]')."""
    text = text.strip()
    if text.startswith("["):
        try:
            layers = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"--layers is not a valid JSON list ({e}): {text!r}") from None
        return layers
    names = [part.strip() for part in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty mechanism name in --layers {text!r}")
    return names


_FLAGS: dict[str, tuple[Any, str]] = {   # TrainConfig field -> (argparse type, help)
    "task": (str, "task name (see attnlab.tasks.list_tasks(); default assoc_recall)"),
    "layers": (parse_layers, "one mechanism per block: 'mhsa,moh,mhsa' or a JSON list with per-layer options "
                             "'[{\"name\": \"moh\", \"top_k\": 2}, \"mhsa\"]' (default mhsa,mhsa)"),
    "dim": (int, "model width (default 64)"),
    "num_heads": (int, "attention heads (default 4)"),
    "mlp_ratio": (float, "MLP hidden width / dim; 0 = no MLP (default 4)"),
    "steps": (int, "optimizer steps in total (default 1000)"),
    "batch_size": (int, "global batch size, split over processes (default 64)"),
    "lr": (float, "peak learning rate (default 3e-3)"),
    "min_lr_ratio": (float, "final lr / peak lr of the cosine schedule (default 0.1)"),
    "warmup": (int, "linear warm-up steps (default 50)"),
    "weight_decay": (float, "AdamW weight decay on weight matrices (default 0.01)"),
    "grad_clip": (float, "gradient norm clip; 0 = off (default 1.0)"),
    "aux_weight": (float, "coefficient of the model's aux_loss, e.g. MoH load balance (default 0.01)"),
    "eval_every": (int, "steps between validation evals (default 100)"),
    "eval_batches": (int, "validation batches per eval (default 4)"),
    "eval_batch_size": (int, "validation batch size (default 64)"),
    "log_every": (int, "steps between train-metric lines in metrics.jsonl (default 10)"),
    "checkpoint_every": (int, "steps between checkpoints; 0 = only at the end and on a signal (default 200)"),
    "seed": (int, "seed of the initial weights and of the task's data unless --task-option seed=... (default 0)"),
    "device": (str, "cpu, cuda or auto (default cpu)"),
    "threads": (int, "torch intra-op threads (default: torch's choice)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, (kind, help_text) in _FLAGS.items():
        flags = [f"--{name.replace('_', '-')}"] + (["--heads"] if name == "num_heads" else [])
        parser.add_argument(*flags, dest=name, type=kind, default=argparse.SUPPRESS, help=help_text)
    parser.add_argument("--task-option", dest="task_option", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="a task constructor option, e.g. num_pairs=8 (repeatable)")
    parser.add_argument("--block-option", dest="block_option", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="a Block option for every layer, e.g. drop=0.1 (repeatable)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/TASK-TIMESTAMP; with --resume, the resumed folder)")
    parser.add_argument("--resume", type=Path, default=None, metavar="DIR",
                        help="continue the run in DIR from its latest checkpoint (other flags: only --steps "
                             "and --checkpoint-every may differ from the saved config)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {name: getattr(args, name) for name in _FLAGS if hasattr(args, name)}
    if args.resume is not None:
        base = load_config(args.resume).to_dict()
        task_options = {**base["task_options"], **dict(args.task_option)}
        block_options = {**base["block_options"], **dict(args.block_option)}
        return TrainConfig.from_dict({**base, **given, "task_options": task_options, "block_options": block_options})
    return TrainConfig(**given, task_options=dict(args.task_option), block_options=dict(args.block_option))


def main(args: argparse.Namespace) -> int:
    rank = int(os.environ["RANK"]) if os.environ.get("RANK", "").isdigit() else 0
    try:
        config = config_from_args(args)
        out = args.out
        if out is None and args.resume is None:
            out = Path("runs") / f"{config.task}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = train(config, out, resume=args.resume, progress=not args.no_progress)
    except TrainInterrupted as e:
        if rank == 0:
            again = f"; continue with: attnlab train --resume {e.out_dir}" if e.checkpoint else ""
            print(f"attnlab train: {e}{again}", file=sys.stderr)
        return e.exit_code
    except (ValueError, TypeError, FloatingPointError) as e:
        if rank == 0:
            print(f"attnlab train: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.final.items())
        where = f"; wrote {result.out_dir}" if result.out_dir else ""
        print(f"attnlab train: {config.task} {config.layers}: {result.params:,} params, step {config.steps}: "
              f"{shown}; {result.tokens_per_s:,.0f} tokens/s{where}", file=sys.stderr)
    return 0


__all__ = ["TrainConfig", "TrainResult", "TrainInterrupted", "CheckpointError", "train", "lr_at",
           "save_checkpoint", "find_checkpoint", "load_config", "load_weights", "parse_layers", "parse_value"]
