"""Character-level language modelling on tiny-shakespeare (Karpathy's char-rnn corpus, ~1.1M chars).

The first 90% of the file's characters is the train split, the last 10% the val split. A batch
is `batch_size` windows of `context + 1` characters at random offsets inside one split: inputs
are the first `context`, targets the last `context` (next character at every position).
The vocabulary is the sorted set of the characters of the whole file, so it is a pure function
of the file. quality = "loss": cross-entropy in nats per character (lower is better); metrics
also report "bpc" (bits per character = loss / ln 2) and next-character "accuracy".

Where the file is looked for, first hit wins:
    1. the `path=` option
    2. the ATTNLAB_TINYSHAKESPEARE environment variable
    3. ../shared/data/tinyshakespeare/input.txt from the current directory, then from the repo root
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from attnlab._data import DEFAULT_RELATIVE, ENV_VAR, REPO_ROOT, find_corpus  # noqa: F401  (re-exported)
from attnlab.tasks import Batch, register_task
from attnlab.tasks._token import TokenTask, token_loss

TRAIN_FRACTION = 0.9

# Per-process cache: resolved path -> (sorted characters, ids of the whole file (N,) int64).
_CORPORA: dict[str, tuple[str, Tensor]] = {}


def _load(path: Path) -> tuple[str, Tensor]:
    key = str(path.resolve())
    if key not in _CORPORA:
        text = path.read_text(encoding="utf-8")
        chars = "".join(sorted(set(text)))
        lookup = {c: i for i, c in enumerate(chars)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)     # (N,)
        _CORPORA[key] = (chars, ids)
    return _CORPORA[key]


@register_task
class TinyShakespeare(TokenTask):
    name = "tinyshakespeare"
    description = "character-level LM on tiny-shakespeare, 90/10 split (val loss in nats/char; bpc)"
    quality = "loss"
    higher_is_better = False

    def __init__(self, seed: int = 0, *, context: int = 128, path: str | None = None):
        super().__init__(seed)
        if not isinstance(context, int) or isinstance(context, bool) or context < 1:
            raise ValueError(f"context must be a positive int, got {context!r}")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str or None, got {type(path).__name__}")
        self.context = context
        self.path_option = None if path is None else str(path)   # saved as given: None = look it up
        self.path = find_corpus(path)
        self.chars, ids = _load(self.path)
        cut = int(len(ids) * TRAIN_FRACTION)
        self.splits = {"train": ids[:cut], "val": ids[cut:]}
        for split, part in self.splits.items():
            if len(part) < context + 1:
                raise ValueError(f"tinyshakespeare: the {split} split of {self.path} has {len(part)} characters, "
                                 f"fewer than context + 1 = {context + 1}")
        self._lookup = {c: i for i, c in enumerate(self.chars)}

    @property
    def seq_len(self) -> int:
        return self.context

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def options(self) -> dict:
        return {"seed": self.seed, "context": self.context, "path": self.path_option}

    def encode(self, text: str) -> Tensor:
        """Characters -> ids (N,) int64; a character outside the corpus raises ValueError."""
        unknown = sorted(set(text) - set(self._lookup))
        if unknown:
            raise ValueError(f"characters not in the tinyshakespeare vocabulary: {unknown!r}")
        return torch.tensor([self._lookup[c] for c in text], dtype=torch.long)

    def decode(self, ids: Tensor | list[int]) -> str:
        """Ids (N,) -> characters."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= i < len(self.chars)]
        if bad:
            raise ValueError(f"ids must lie in [0, {len(self.chars)}), got {bad[:5]}")
        return "".join(self.chars[i] for i in ids)

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        g = self.generator(split, index)
        ids = self.splits[split]
        starts = torch.randint(0, len(ids) - self.context, (batch_size,), generator=g)   # (B,)
        window = starts[:, None] + torch.arange(self.context + 1)                       # (B, T + 1)
        chunk = ids[window]                                                               # (B, T + 1)
        return {"inputs": chunk[:, :-1].contiguous(), "targets": chunk[:, 1:].contiguous()}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["inputs"])                                                   # (B, T, V)
        loss, metrics = token_loss(logits, batch["targets"])
        metrics["bpc"] = metrics["loss"] / math.log(2)
        return loss, metrics
