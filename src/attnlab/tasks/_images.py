"""Shared pieces of image-classification tasks: patch tokens, standardisation, batches, loss.

An image task supplies its arrays (uint8 images (n, H, W), int labels (n,)) through
`_load_arrays`; this module turns them into ViT-style patch tokens:

    pixels / pixel_max -> [0, 1] -> (x - train mean) / train std -> (n, (H/p)(W/p), p*p)

and builds the model that reads them: `network="vit"` (default) the `Classifier` (mean-pooled,
learned positions, one attention mechanism per layer), `network="medusa"` the MEDUSA CNN
(`attnlab.models.MedusaNet`), which first puts the patch tokens back into the image
(`unpatchify`, the exact inverse of `patchify`), so both networks train on the same batches.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.tasks import Batch, Task
from attnlab.models import Classifier, MedusaNet

NETWORKS = ("vit", "medusa")

# Subsampling (`train_size`) takes the first rows of this fixed permutation, the same for every
# task seed, so runs with different seeds see the same images and a smaller set nests in a larger one.
SUBSAMPLE_SEED = 0


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, H, W) -> (B, (H/p)(W/p), p*p): non-overlapping p x p patches in row-major order."""
    B, H, W = images.shape
    if H % patch or W % patch:
        raise ValueError(f"patch={patch} does not divide the image size {H}x{W}")
    x = images.reshape(B, H // patch, patch, W // patch, patch)        # (B, H/p, p, W/p, p)
    x = x.permute(0, 1, 3, 2, 4)                                       # (B, H/p, W/p, p, p)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch)   # (B, N, p*p)


def unpatchify(tokens: Tensor, patch: int, side: int) -> Tensor:
    """(B, (side/p)^2, p*p) -> (B, side, side): the inverse of `patchify`."""
    B, N, P = tokens.shape
    g = side // patch
    if side % patch or N != g * g or P != patch * patch:
        raise ValueError(f"expected tokens (B, {g * g}, {patch * patch}) of a {side}x{side} image cut into "
                         f"{patch}x{patch} patches, got {tuple(tokens.shape)}")
    x = tokens.reshape(B, g, g, patch, patch)                         # (B, H/p, W/p, p, p)
    return x.permute(0, 1, 3, 2, 4).reshape(B, side, side)            # (B, H, W)


class PatchImageNet(nn.Module):
    """Patch tokens (B, N, p*p) -> the image (B, side, side) -> an image network's output."""

    def __init__(self, net: nn.Module, patch: int, side: int):
        super().__init__()
        self.net, self.patch, self.side = net, patch, side

    def forward(self, tokens: Tensor) -> Tensor:
        return self.net(unpatchify(tokens, self.patch, self.side))


def pixel_statistics(images: np.ndarray, pixel_max: float) -> tuple[float, float]:
    """Mean and std of images / pixel_max, exactly, from a histogram of the uint8 pixel values."""
    if images.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)    # (256,)
    values = np.arange(256, dtype=np.float64) / pixel_max
    total = counts.sum()
    mean = float((counts * values).sum() / total)
    var = float((counts * (values - mean) ** 2).sum() / max(total - 1, 1))
    if var <= 0:
        raise ValueError("the training images are constant; cannot standardise them")
    return mean, var ** 0.5


class ImageClassTask(Task):
    """Classification of small grey images cut into patch tokens.

    batch = {"inputs": (B, N, patch*patch) float32, "targets": (B,) int64}. Train batches draw
    images uniformly with replacement from the task's generator; val batch i is the fixed slice
    [i*B, (i+1)*B) of the val set (wrapping around), so `evaluate(batches=ceil(n_val / B))`
    covers the whole val set, the same way on every call.

    Subclasses set `image_size`, `pixel_max`, `num_classes`, `default_patch` and implement
    `_load_arrays() -> (train_images, train_labels, val_images, val_labels)` as numpy arrays
    (images uint8 (n, H, W) with values in [0, pixel_max], labels integers (n,)).
    """

    kind = "classify"
    quality = "accuracy"
    higher_is_better = True
    causal = False

    image_size: ClassVar[int] = 0
    pixel_max: ClassVar[float] = 255.0
    num_classes: ClassVar[int] = 10
    default_patch: ClassVar[int] = 4

    def __init__(self, seed: int = 0, *, patch: int | None = None, train_size: int | None = None):
        super().__init__(seed)
        patch = self.default_patch if patch is None else patch
        if not isinstance(patch, int) or isinstance(patch, bool) or patch < 1 or self.image_size % patch:
            divisors = [d for d in range(1, self.image_size + 1) if self.image_size % d == 0]
            raise ValueError(f"{self.name}: patch must be a divisor of the image side {self.image_size} "
                             f"({', '.join(map(str, divisors))}), got {patch!r}")
        if train_size is not None and (not isinstance(train_size, int) or isinstance(train_size, bool)
                                       or train_size < 1):
            raise ValueError(f"{self.name}: train_size must be a positive int or None, got {train_size!r}")
        self.patch, self.train_size = patch, train_size
        train_x, train_y, val_x, val_y = self._load_arrays()
        if train_size is not None:
            if train_size > len(train_x):
                raise ValueError(f"{self.name}: train_size={train_size} exceeds the {len(train_x)} training images")
            keep = np.random.default_rng(SUBSAMPLE_SEED).permutation(len(train_x))[:train_size]
            train_x, train_y = train_x[keep], train_y[keep]
        self.images = {"train": torch.from_numpy(np.ascontiguousarray(train_x)),   # (n, H, W) integer pixels
                       "val": torch.from_numpy(np.ascontiguousarray(val_x))}
        self.labels = {"train": torch.from_numpy(train_y.astype(np.int64)),        # (n,)
                       "val": torch.from_numpy(val_y.astype(np.int64))}
        self.mean, self.std = pixel_statistics(train_x, self.pixel_max)          # train-set statistics

    def _load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def seq_len(self) -> int:
        return self.num_patches

    def num_examples(self, split: str) -> int:
        if split not in self.labels:
            raise ValueError(f"split must be one of {tuple(self.labels)}, got {split!r}")
        return len(self.labels[split])

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "patch": self.patch, "train_size": self.train_size}

    def tokens(self, images: Tensor) -> Tensor:
        """Integer-pixel images (B, H, W) -> standardised patch tokens (B, N, patch*patch) float32."""
        unit = images.float() / self.pixel_max                                    # (B, H, W) in [0, 1]
        return patchify((unit - self.mean) / self.std, self.patch)

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        rows = self.example_rows(split, index, batch_size, self.num_examples(split))      # (B,)
        return {"inputs": self.tokens(self.images[split][rows]), "targets": self.labels[split][rows]}

    def accepts_no_layers(self) -> bool:
        return True            # network="medusa" without attention: the bare CNN backbone

    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], *, network: str = "vit",
                    **block_options) -> nn.Module:
        """network="vit": Classifier(dim, num_heads, layers, **block_options). network="medusa":
        MedusaNet with body_dim=dim, num_heads heads and `layers` = [] (no attention: the bare
        backbone) or [name] (the body's attention, "medusa" = the built-in one); block_options are
        MedusaNet's (placement, widths, strides, stem_width, body_stride, residual, dropout);
        `mlp_ratio` (passed by attnlab.train) has no meaning there and is not used: the body has
        no MLP."""
        if network not in NETWORKS:
            raise ValueError(f"{self.name}: network must be one of {NETWORKS}, got {network!r}")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = ["mhsa"] * layers if network == "vit" else ["medusa"] * layers
        layers = list(layers)
        if network == "medusa":
            block_options.pop("mlp_ratio", None)
            if len(layers) > 1:
                raise ValueError(f"{self.name}: network='medusa' has one shared attention body: give no layer "
                                 f"(the bare backbone) or one mechanism name, got {layers}")
            if not layers:
                block_options = {**block_options, "placement": None}
            elif block_options.get("placement", "shared") is None:
                raise ValueError(f"{self.name}: placement=None is the model without attention; give no layers "
                                 f"for it, not {layers}")
            net = MedusaNet(self.num_classes, image_size=self.image_size, body_dim=dim, num_heads=num_heads,
                            attention=layers[0] if layers else "medusa", **block_options)
            return PatchImageNet(net, self.patch, self.image_size)
        if not layers:
            raise ValueError(f"{self.name}: network='vit' needs at least one attention layer, got none")
        side = self.image_size // self.patch                                       # patches per image side
        return Classifier(self.num_classes, dim, num_heads, layers, in_dim=self.patch * self.patch,
                          max_len=self.num_patches, pool="mean", grid=(side, side), **block_options)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["inputs"])                                            # (B, classes)
        targets = batch["targets"]
        if logits.shape != (targets.shape[0], self.num_classes):
            raise ValueError(f"{self.name}: expected logits ({targets.shape[0]}, {self.num_classes}), "
                             f"got {tuple(logits.shape)}")
        loss = F.cross_entropy(logits.float(), targets)
        with torch.no_grad():
            accuracy = (logits.argmax(-1) == targets).float().mean().item()
        return loss, {"loss": loss.item(), "accuracy": accuracy}
