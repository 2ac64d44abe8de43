"""Several processes under torchrun: process group, devices, gradient/metric all-reduce, RNG states.

torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; gloo runs on CPU, nccl on CUDA (one GPU per process).
Gradients are averaged with one all-reduce of one flat buffer, as DistributedDataParallel does
but without its per-parameter hooks, so a mechanism that leaves a parameter without gradient in
some step (routing, top-k) needs no `find_unused_parameters`.
"""
from __future__ import annotations

import base64
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    """This process's place among the processes of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False     # we initialised the process group, so we destroy it

    @property
    def active(self) -> bool:
        return self.world > 1


def env_int(name: str, default: int) -> int:
    """An integer environment variable (WORLD_SIZE, RANK, ...), `default` when unset."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {text!r}") from None


def world_size() -> int:
    """How many processes torchrun started (1 without torchrun)."""
    return env_int("WORLD_SIZE", 1)


def device_kind(device: str) -> str:
    """'cpu' or 'cuda' for a TrainConfig.device ('auto' picks CUDA when there is one)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def setup(device: str) -> Dist:
    """Join torchrun's process group (gloo on CPU, nccl on CUDA); a plain Dist() in one process."""
    world, rank = world_size(), env_int("RANK", 0)
    local = env_int("LOCAL_RANK", rank)
    if world <= 1:
        return Dist()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed")
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind(device) == "cuda" else "gloo")
        owns = True
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, owns_group=owns)


def teardown(info: Dist) -> None:
    """Destroy the process group if `setup` created it."""
    if info.owns_group:
        dist.destroy_process_group()


def barrier(info: Dist) -> None:
    if info.active:
        dist.barrier()


def resolve_device(device: str, info: Dist) -> torch.device:
    """The torch.device of a TrainConfig.device on this rank: with several processes, cuda:LOCAL_RANK."""
    kind = device_kind(device) if device == "auto" else device
    if kind.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}, but torch.cuda.is_available() is False")
        if info.active:
            if kind != "cuda":
                raise ValueError(f"with several processes give device 'cuda' (each takes cuda:LOCAL_RANK), "
                                 f"got {device!r}")
            kind = f"cuda:{info.local_rank}"
        resolved = torch.device(kind)
        torch.cuda.set_device(resolved)
        return resolved
    return torch.device("cpu")


def broadcast_module(module: nn.Module) -> None:
    """Every rank takes rank 0's parameters and buffers."""
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=0)


def all_reduce_step(params: list[nn.Parameter], metrics: dict[str, float], signum: int,
                    world: int) -> tuple[dict[str, float], int]:
    """Average gradients and metrics over ranks in one all-reduce; agree on whether to stop.

    Buffer: [every parameter's gradient (zeros where absent), 1 per parameter that has one,
    metric values, SIGINT count, SIGTERM count]. A parameter without gradient on every rank
    keeps grad=None, as in one process.
    """
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


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def gather_rng(device: torch.device, info: Dist) -> dict[str, list[str] | None]:
    """Every rank's torch RNG states as base64 text, by rank; a collective, so every rank calls it."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    if not info.active:
        return {"torch_cpu": [_b64(cpu)], "torch_cuda": [_b64(cuda)] if cuda is not None else None}
    comm = device if device.type == "cuda" else torch.device("cpu")   # nccl gathers CUDA tensors only

    def gather(t: torch.Tensor) -> list[str]:
        parts = [torch.empty_like(t, device=comm) for _ in range(info.world)]
        dist.all_gather(parts, t.to(comm))
        return [_b64(x) for x in parts]

    return {"torch_cpu": gather(cpu), "torch_cuda": gather(cuda) if cuda is not None else None}


def restore_rng(rng: dict, device: torch.device, info: Dist, saved_world: int) -> bool:
    """Restore this rank's RNG states from `gather_rng`'s dict; False when it has none for this rank."""
    cpu = rng.get("torch_cpu") or []
    if saved_world != info.world or info.rank >= len(cpu):
        return False
    torch.set_rng_state(_unb64(cpu[info.rank]))
    cuda = rng.get("torch_cuda")
    if device.type == "cuda" and cuda:
        torch.cuda.set_rng_state(_unb64(cuda[info.rank]), device)
    return True
