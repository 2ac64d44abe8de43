"""Tasks: seeded, resumable sources of batches plus the model and loss that go with them.

A task joins attnlab by subclassing `Task` in a module of this package and decorating it
with `@register_task`. Every batch is a pure function of (task options, seed, split, index):

    task = attnlab.tasks.create_task("assoc_recall", seed=0)
    batch = task.batch("train", index=17, batch_size=64)   # same tensors on every call/rank
    model = task.build_model(dim=64, num_heads=4, layers=["mhsa", "moh"])
    loss, metrics = task.loss(model, batch)

so a resumed run sees exactly the batches an uninterrupted one would, and data-parallel ranks
each take their slice of one global batch (`slice_batch`).
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

Batch = dict[str, Tensor]
SPLITS = ("train", "val")
KINDS = ("lm", "classify", "regress")

_TASKS: dict[str, type["Task"]] = {}
_discovered = False


class Task:
    """Base class. Subclasses set the class attributes and implement `batch`, `build_model`, `loss`.

    kind:      "lm" (CausalLM on token ids, loss on targets != -100), "classify" (Classifier),
               "regress" (feature vectors in, real values out)
    quality:   name of the headline metric in `loss`'s metrics (e.g. "accuracy", "loss")
    higher_is_better: direction of `quality`
    causal:    whether the task's model is causal (only mechanisms with spec.causal can run it)
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    quality: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False
    causal: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, seed: int = 0):
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = seed

    # -- data ---------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        """Tokens per example fed to the model (for tokens/s and model max_len)."""
        raise NotImplementedError

    def generator(self, split: str, index: int) -> torch.Generator:
        """The RNG for batch `index` of `split`: independent of every other batch."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"batch index must be a non-negative int, got {index!r}")
        # Distinct streams per (seed, split, index); 2**61 - 1 is prime, so no easy collisions.
        mix = (self.seed * 1_000_003 + SPLITS.index(split) * 7_919 + index * 104_729 + 17) % (2**61 - 1)
        return torch.Generator().manual_seed(mix)

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        """Batch `index` of `split`: a dict of CPU tensors, each with batch_size rows."""
        raise NotImplementedError

    def example_rows(self, split: str, index: int, batch_size: int, num_examples: int) -> Tensor:
        """Rows of a fixed data set for batch `index`: train draws uniformly with replacement from the
        batch's own generator; val is the fixed slice [i B, (i + 1) B) wrapping around, so
        ceil(n / B) val batches cover the whole set the same way on every call. (B,) int64."""
        g = self.generator(split, index)                       # validates split and index
        if split == "train":
            return torch.randint(0, num_examples, (batch_size,), generator=g)            # (B,)
        return (index * batch_size + torch.arange(batch_size)) % num_examples          # (B,) fixed slice

    # -- model and loss -----------------------------------------------------------------
    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], **block_options) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """Forward `model` on `batch`: (scalar loss to minimise, metrics incl. `quality`)."""
        raise NotImplementedError

    def accepts_no_layers(self) -> bool:
        """Whether `build_model` takes an empty layer list (a model with no attention, e.g. a baseline)."""
        return False

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, batches: int = 4, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> dict[str, float]:
        """Mean metrics over the first `batches` validation batches (the same ones every call)."""
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        try:
            for i in range(batches):
                b = {k: v.to(device) for k, v in self.batch("val", i, batch_size).items()}
                _, metrics = self.loss(model, b)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v) / batches
        finally:
            model.train(was_training)
        return totals

    def options(self) -> dict[str, Any]:
        """The constructor options that define this task (saved in configs and checkpoints)."""
        return {"seed": self.seed}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"{type(self).__name__}({opts})"


def slice_batch(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank `rank`'s contiguous share of a global batch (rows must divide evenly)."""
    out = {}
    for k, v in batch.items():
        if v.shape[0] % world_size:
            raise ValueError(f"global batch of {v.shape[0]} rows does not split over {world_size} processes; "
                             f"choose a batch size divisible by {world_size}")
        n = v.shape[0] // world_size
        out[k] = v[rank * n:(rank + 1) * n]
    return out


def register_task(cls: type[Task]) -> type[Task]:
    if not cls.name or not cls.name.isidentifier():
        raise ValueError(f"task class {cls.__name__} needs a snake_case `name`, got {cls.name!r}")
    if cls.kind not in KINDS:
        raise ValueError(f"task {cls.name!r}: kind must be one of {KINDS}, got {cls.kind!r}")
    if cls.name in _TASKS and _TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is already registered by {_TASKS[cls.name].__module__}")
    _TASKS[cls.name] = cls
    return cls


def _discover() -> None:
    global _discovered
    if not _discovered:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _discovered = True


def list_tasks() -> list[type[Task]]:
    _discover()
    return [_TASKS[k] for k in sorted(_TASKS)]


def get_task(name: str) -> type[Task]:
    _discover()
    if name not in _TASKS:
        close = difflib.get_close_matches(name, list(_TASKS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown task {name!r}{hint} (known: {', '.join(sorted(_TASKS))})")
    return _TASKS[name]


def create_task(name: str, **options) -> Task:
    cls = get_task(name)
    try:
        return cls(**options)
    except TypeError as e:
        import inspect
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise TypeError(f"task {name!r}: {e} (options: {', '.join(params)})") from None


__all__ = ["Task", "Batch", "register_task", "list_tasks", "get_task", "create_task", "slice_batch", "SPLITS"]
