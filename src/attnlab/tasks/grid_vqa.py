"""Visual questions about a grid of digits: "which digit is at cell k?" (a synthetic VQA task).

An image is a G x G grid of scikit-learn digits (8 x 8 grey images, `attnlab.tasks.digits`), so
8G x 8G pixels, cut into p x p patches: M = (8G / p)^2 visual tokens of p^2 standardised pixels
(p divides 8, so no patch straddles two cells). The question is three text tokens,
[WHICH, CELL_k, ANSWER], and the answer (the digit at cell k, 10 classes) is read from the last
one. The visual tokens are the visual stream and the question the text stream of a
`attnlab.models.VisorClassifier`: the task of the `visor` claim. quality = accuracy.

Train questions draw the G^2 cells from the digits train split (1,437 images) and k uniformly,
from the batch's generator (a pure function of seed and index). The val split is a fixed set of
`val_size` questions over the 360 held-out digits, the same for every task seed (its own seed,
VAL_SEED): val batch i is the slice [i B, (i + 1) B) of it, wrapping around. Pixels are
standardised with the train digits' mean and std. Batches carry "inputs" (B, M, p^2), "question"
(B, 3), "targets" (B,) and "cell" (B,). The model's learned positions start at N(0, 1) here
(POS_STD; see build_model for why).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.models import VisorClassifier
from attnlab.tasks import Batch, Task, register_task
from attnlab.tasks._images import patchify
from attnlab.tasks.digits import load_digits_split

VAL_SEED = 12345
CELL = 8                  # digits are 8 x 8
PIXEL_MAX = 16.0          # digits pixels are 0..16
WHICH, ANSWER = 0, 1      # question tokens; cell k is token 2 + k
POS_STD = 1.0             # the models' learned positions, N(0, POS_STD) (see build_model)


@register_task
class GridVQA(Task):
    name = "grid_vqa"
    kind = "classify"
    quality = "accuracy"
    higher_is_better = True
    causal = False
    description = "which digit is at cell k of a G x G grid of sklearn digits (patch tokens + a 3-token question)"
    num_classes = 10
    text_len = 3

    def __init__(self, seed: int = 0, *, grid: int = 2, patch: int = 2, val_size: int = 2000):
        super().__init__(seed)
        for arg, value, ok in (("grid", grid, isinstance(grid, int) and grid >= 1),
                               ("patch", patch, isinstance(patch, int) and patch >= 1 and CELL % patch == 0),
                               ("val_size", val_size, isinstance(val_size, int) and val_size >= 1)):
            if isinstance(value, bool) or not ok:
                want = {"grid": "a positive int", "patch": "a divisor of the digit side 8 (1, 2, 4, 8)",
                        "val_size": "a positive int"}[arg]
                raise ValueError(f"{self.name}: {arg} must be {want}, got {value!r}")
        self.grid, self.patch, self.val_size = grid, patch, val_size
        train_x, train_y, val_x, val_y = load_digits_split()
        self.images = {"train": torch.from_numpy(np.ascontiguousarray(train_x)),   # (n, 8, 8) integer pixels
                       "val": torch.from_numpy(np.ascontiguousarray(val_x))}
        self.labels = {"train": torch.from_numpy(train_y.astype(np.int64)), "val": torch.from_numpy(val_y.astype(np.int64))}
        unit = train_x.astype(np.float64) / PIXEL_MAX
        self.mean, self.std = float(unit.mean()), float(unit.std(ddof=1))
        g = torch.Generator().manual_seed(VAL_SEED)
        self._val = self._questions("val", val_size, g)                           # the fixed val set

    # -- data ---------------------------------------------------------------------------------------
    @property
    def cells(self) -> int:
        return self.grid * self.grid

    @property
    def vocab_size(self) -> int:
        return 2 + self.cells

    @property
    def visual_len(self) -> int:
        return (CELL * self.grid // self.patch) ** 2

    @property
    def seq_len(self) -> int:
        return self.visual_len + self.text_len

    def num_examples(self, split: str) -> int:
        if split == "train":
            return len(self.labels["train"])
        if split == "val":
            return self.val_size
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "grid": self.grid, "patch": self.patch, "val_size": self.val_size}

    def compose(self, images: Tensor) -> Tensor:
        """Cells (B, G, G, 8, 8) integer pixels -> standardised patch tokens (B, M, p^2) float32."""
        B, G = images.shape[0], self.grid
        picture = images.permute(0, 1, 3, 2, 4).reshape(B, G * CELL, G * CELL)     # (B, 8G, 8G), cell (r, c) at r, c
        unit = picture.float() / PIXEL_MAX
        return patchify((unit - self.mean) / self.std, self.patch)                 # (B, M, p^2)

    def _questions(self, split: str, count: int, g: torch.Generator) -> Batch:
        n = len(self.labels[split])
        which = torch.randint(0, n, (count, self.grid, self.grid), generator=g)   # (B, G, G) image per cell
        cell = torch.randint(0, self.cells, (count,), generator=g)               # (B,) the cell asked about
        question = torch.stack([torch.full((count,), WHICH), 2 + cell, torch.full((count,), ANSWER)], 1)  # (B, 3)
        targets = self.labels[split][which.flatten(1)[torch.arange(count), cell]]  # (B,)
        return {"inputs": self.compose(self.images[split][which]), "question": question, "targets": targets,
                "cell": cell}

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        g = self.generator(split, index)
        if split == "train":
            return self._questions("train", batch_size, g)
        rows = (index * batch_size + torch.arange(batch_size)) % self.val_size        # (B,) fixed slice
        return {k: v[rows] for k, v in self._val.items()}

    # -- model and loss ------------------------------------------------------------------------------
    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], **options) -> nn.Module:
        """A VisorClassifier; options go to it (pos_std, answer_index) and its Visor body (mlp_ratio,
        cross_layers, refine_layers, act, drop, mechanism_options).

        pos_std defaults to POS_STD = 1.0 here, not the ViT-style 0.02 of VisorClassifier: the task is
        finding the patches of cell k, and with positions N(0, 0.02) next to patch embeddings of
        order 1 full self-attention (4 layers of width 64, 3 x 3 grid, patch 4) was at 0.26 val
        accuracy after 1,000 steps of 64, against 0.96 with N(0, 1).
        """
        options.setdefault("pos_std", POS_STD)
        return VisorClassifier(self.num_classes, dim, num_heads, layers, vocab_size=self.vocab_size,
                               visual_in_dim=self.patch * self.patch, text_len=self.text_len,
                               visual_len=self.visual_len, **options)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["inputs"], batch["question"])                            # (B, classes)
        targets = batch["targets"]
        if logits.shape != (targets.shape[0], self.num_classes):
            raise ValueError(f"{self.name}: expected logits ({targets.shape[0]}, {self.num_classes}), "
                             f"got {tuple(logits.shape)}")
        loss = F.cross_entropy(logits.float(), targets)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == targets).float().mean().item()
        return loss, {"loss": loss.item(), "accuracy": accuracy}
