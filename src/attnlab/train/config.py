"""What defines a training run: TrainConfig and its validation, the learning-rate schedule, layer lists."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from attnlab._checks import check_int, check_number
from attnlab.models.transformer import parse_layer
from attnlab.registry import get_spec


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
        if not isinstance(self.task, str) or not self.task:
            raise ValueError(f"task must be a task name, got {self.task!r}")
        for name in ("task_options", "block_options"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if isinstance(self.layers, (str, dict)) or not isinstance(self.layers, (list, tuple)):
            raise TypeError(f"layers must be a list of mechanism names or dicts, got {self.layers!r}")
        self.layers = list(self.layers)
        for layer in self.layers:
            if not (isinstance(layer, str) and layer) and not (isinstance(layer, dict)
                                                                and isinstance(layer.get("name"), str)):
                raise TypeError(f"each layer must be a mechanism name or a dict with a 'name', got {layer!r}")
        if not _is_int(self.steps) or self.steps <= 0:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        for name in ("dim", "num_heads", "batch_size", "eval_every", "eval_batches", "eval_batch_size",
                     "log_every"):
            check_int(name, getattr(self, name), 1)
        for name in ("warmup", "checkpoint_every", "seed"):
            check_int(name, getattr(self, name), 0)
        check_number("lr", self.lr, 0.0, strict=True)
        check_number("min_lr_ratio", self.min_lr_ratio, 0.0, high=1.0)
        for name in ("mlp_ratio", "weight_decay", "grad_clip", "aux_weight"):
            check_number(name, getattr(self, name), 0.0)
        if not isinstance(self.device, str) or self.device.split(":")[0] not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {self.device!r}")
        if self.threads is not None:
            check_int("threads", self.threads, 1)

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


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of the update from `step` to `step + 1`: linear warm-up, then cosine to min_lr_ratio."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    span = max(1, config.steps - config.warmup)
    progress = min(1.0, (step - config.warmup) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def parse_layers(text: str) -> list:
    """'mhsa,moh,deconstructed:fixed' or a JSON list ('[{"name": "moh", "top_k": 2}, "mhsa"]'); 'none' is
    the empty list, for a task whose model can have no attention layer (Task.accepts_no_layers)."""
    text = text.strip()
    if text == "none":
        return []
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


def check_layers(task, layers: list) -> None:
    """Every layer names a registered mechanism, and a causal one where the task trains a causal model;
    an empty list only for a task whose model takes none (Task.accepts_no_layers)."""
    if not layers and not task.accepts_no_layers():
        raise ValueError(f"layers must name at least one mechanism (task {task.name!r} builds one attention "
                         "layer per entry)")
    for layer in layers:
        name, _ = parse_layer(layer)
        spec = get_spec(name)                     # unknown names: ValueError with close matches
        if task.causal and not spec.causal:
            raise ValueError(f"task {task.name!r} trains a causal model, and mechanism {name!r} has no causal "
                             f"mode (spec.causal=False); pick a causal mechanism")
