"""Two dense-prediction tasks on Fashion-MNIST images: per-pixel class segmentation and distance-to-background.

A stand-in, at CPU scale, for the multi-task dense benchmarks of M3ViT / Edge-MoE (semantic
segmentation and depth on NYUD-v2 / PASCAL-Context / Cityscapes), built on the Fashion-MNIST
images (`attnlab.tasks.fashion_mnist`: the same files, the same lookup):

- "seg": every foreground pixel (intensity > `threshold` * 255) gets the image's class + 1
  (1..10), background 0: 11 classes per pixel. Scored by mIoU: per class c, IoU = |pred = c and
  true = c| / |pred = c or true = c| over all evaluated pixels (pooled), averaged over the classes
  present in the ground truth.
- "depth": the Euclidean distance of each pixel to the nearest background pixel, with the ring
  just outside the image counting as background (so a foreground pixel on the border is 1 away),
  0 on the background, divided by `depth_scale` (8 px by default, so values lie in [0, ~1.2]);
  a depth proxy. Scored by RMSE (in those units). Computed here by brute force (exact, every
  pixel against every background pixel of the 30 x 30 padded image).

batch = {"inputs": (B, 28, 28) float32 standardised with the train-set pixel mean/std,
"seg": (B, 28, 28) int64 in 0..10, "depth": (B, 28, 28) float32, "labels": (B,) int64}. Train
batches draw images uniformly with replacement (the first `train_size` of a fixed permutation
when subsampled, as `fashion_mnist` does); val batch i is the fixed slice [iB, (i+1)B) of the
10,000 test images.

Model: `attnlab.models.EdgeMoEViT` with heads {"seg": 11, "depth": 1}; build_model's
`model="moe"` (odd blocks TaskMoE, one gate per task) or `model="dense"` (every block a dense
MLP; the baselines). Loss, per task through its own gate (M3ViT's "one by one" training):

    CE(seg logits, seg) + depth_weight * MSE(depth, target) + balance_weight * (balance losses)

(balance_weight 0.01 as M3ViT's --moe_noisy_gate_loss_weight). quality = "miou" (pooled over
the evaluated batches by `evaluate`); "rmse", "ce", "mse", "pixel_accuracy" are also reported.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.models.edge_moe import EdgeMoEViT
from attnlab.tasks import Batch, Task, register_task
from attnlab.tasks._images import SUBSAMPLE_SEED, pixel_statistics
from attnlab.tasks.fashion_mnist import find_root, load_fashion_mnist

SIDE = 28
NUM_SEG_CLASSES = 11                      # background + 10 garment classes
TASK_CHANNELS = {"seg": NUM_SEG_CLASSES, "depth": 1}
MODELS = ("moe", "dense")

def distance_to_background(foreground: Tensor) -> Tensor:
    """Exact Euclidean distance transform: bool masks (B, H, W) -> (B, H, W) float32 distance of each
    pixel to the nearest background pixel, the one-pixel ring outside the image counting as
    background (0 on background pixels).

    Separable and exact: D^2(y, x) = min_x' [(x - x')^2 + g(y, x')^2], g(y, x') the distance along
    column x' to its nearest background pixel, both minimised by brute force over the padded image.
    """
    if foreground.dim() != 3 or foreground.dtype != torch.bool:
        raise ValueError(f"distance_to_background: expected bool masks (B, H, W), got "
                         f"{tuple(foreground.shape)} {foreground.dtype}")
    B, H, W = foreground.shape
    background = ~F.pad(foreground, (1, 1, 1, 1), value=False)                    # (B, H+2, W+2)
    inf = torch.full((), float("inf"))
    rows = torch.arange(H, dtype=torch.float32) + 1                               # inner rows in padded coords
    dy2 = (rows[:, None] - torch.arange(H + 2, dtype=torch.float32)[None]) ** 2   # (H, H+2)
    g2 = torch.where(background[:, None], dy2[None, :, :, None], inf).amin(2)    # (B, H, W+2): min over y'
    cols = torch.arange(W, dtype=torch.float32) + 1
    dx2 = (cols[:, None] - torch.arange(W + 2, dtype=torch.float32)[None]) ** 2   # (W, W+2)
    d2 = (g2[:, :, None, :] + dx2[None, None]).amin(-1)                          # (B, H, W): min over x'
    return d2.sqrt()


def confusion(pred: Tensor, target: Tensor, num_classes: int = NUM_SEG_CLASSES) -> Tensor:
    """(num_classes, num_classes) int64 counts, rows = true class, columns = predicted."""
    index = target.reshape(-1) * num_classes + pred.reshape(-1)
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def miou(conf: Tensor) -> float:
    """Mean IoU over the classes present in the ground truth (rows with counts) of a confusion matrix."""
    conf = conf.to(torch.float64)
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    present = conf.sum(1) > 0
    if not present.any():
        raise ValueError("miou: the confusion matrix holds no ground-truth pixels")
    return float((tp[present] / union[present]).mean())


@register_task
class FashionDense(Task):
    name = "fashion_dense"
    kind = "classify"
    quality = "miou"
    higher_is_better = True
    causal = False
    description = ("Fashion-MNIST as two dense tasks (per-pixel class segmentation, mIoU; distance to background, "
                   "RMSE) for the multi-task Edge-MoE / M3ViT ViT")

    def __init__(self, seed: int = 0, *, patch: int = 4, train_size: int | None = None, threshold: float = 0.1,
                 depth_scale: float = 8.0, depth_weight: float = 1.0, balance_weight: float = 0.01,
                 root: str | None = None):
        super().__init__(seed)
        if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or SIDE % patch:
            raise ValueError(f"fashion_dense: patch must be a divisor of 28 (1, 2, 4, 7, 14, 28), got {patch!r}")
        if train_size is not None and (isinstance(train_size, bool) or not isinstance(train_size, int)
                                       or train_size < 1):
            raise ValueError(f"fashion_dense: train_size must be a positive int or None, got {train_size!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"fashion_dense: threshold must be a number in [0, 1), got {threshold!r}")
        for arg, v in (("depth_scale", depth_scale), ("depth_weight", depth_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"fashion_dense: {arg} must be a positive number, got {v!r}")
        if isinstance(balance_weight, bool) or not isinstance(balance_weight, (int, float)) or balance_weight < 0:
            raise ValueError(f"fashion_dense: balance_weight must be a number >= 0, got {balance_weight!r}")
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"fashion_dense: root must be a str or None, got {type(root).__name__}")
        self.patch, self.train_size, self.threshold = patch, train_size, float(threshold)
        self.depth_scale, self.depth_weight, self.balance_weight = float(depth_scale), float(depth_weight), \
            float(balance_weight)
        self.root_option = None if root is None else str(root)
        train_x, train_y, val_x, val_y = load_fashion_mnist(find_root(root))
        if train_size is not None:
            if train_size > len(train_x):
                raise ValueError(f"fashion_dense: train_size={train_size} exceeds the {len(train_x)} training images")
            keep = np.random.default_rng(SUBSAMPLE_SEED).permutation(len(train_x))[:train_size]
            train_x, train_y = train_x[keep], train_y[keep]
        self.images = {"train": torch.from_numpy(np.ascontiguousarray(train_x)),
                       "val": torch.from_numpy(np.ascontiguousarray(val_x))}        # (n, 28, 28) uint8
        self.labels = {"train": torch.from_numpy(train_y.astype(np.int64)),
                       "val": torch.from_numpy(val_y.astype(np.int64))}              # (n,)
        self.mean, self.std = pixel_statistics(train_x, 255.0)

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "patch": self.patch, "train_size": self.train_size, "threshold": self.threshold,
                "depth_scale": self.depth_scale, "depth_weight": self.depth_weight,
                "balance_weight": self.balance_weight, "root": self.root_option}

    @property
    def seq_len(self) -> int:
        return (SIDE // self.patch) ** 2

    def num_examples(self, split: str) -> int:
        if split not in self.labels:
            raise ValueError(f"split must be one of {tuple(self.labels)}, got {split!r}")
        return len(self.labels[split])

    # -- data ---------------------------------------------------------------------------------
    def targets(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images (B, 28, 28) and labels (B,) -> seg (B, 28, 28) int64, depth (B, 28, 28) float32."""
        foreground = images.float() > self.threshold * 255.0                     # (B, 28, 28)
        seg = torch.where(foreground, labels[:, None, None] + 1, torch.zeros_like(labels)[:, None, None])
        depth = distance_to_background(foreground) / self.depth_scale
        return seg, depth

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        rows = self.example_rows(split, index, batch_size, self.num_examples(split))      # (B,)
        images, labels = self.images[split][rows], self.labels[split][rows]
        seg, depth = self.targets(images, labels)
        inputs = (images.float() / 255.0 - self.mean) / self.std                   # (B, 28, 28)
        return {"inputs": inputs, "seg": seg, "depth": depth, "labels": labels}

    # -- model and loss -----------------------------------------------------------------------
    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], *, mlp_ratio: float = 4.0,
                    model: str = "moe", num_experts: int = 8, top_k: int = 2, expert_ratio: float = 2.0,
                    noisy: bool = True, numerics: str = "exact") -> nn.Module:
        """EdgeMoEViT for the two tasks; model="dense" drops the experts (every block a dense MLP of
        hidden mlp_ratio * dim). layers: one mechanism name per block (an int = that many "mhsa")."""
        if model not in MODELS:
            raise ValueError(f"fashion_dense: model must be one of {MODELS}, got {model!r}")
        return EdgeMoEViT(TASK_CHANNELS, dim, num_heads, layers, img_size=SIDE, patch=self.patch,
                          mlp_ratio=mlp_ratio, num_experts=num_experts if model == "moe" else 0, top_k=top_k,
                          expert_ratio=expert_ratio, noisy=noisy, numerics=numerics)

    def _outputs(self, model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        outs, balance = model.forward_all(batch["inputs"])
        seg_logits, depth = outs["seg"], outs["depth"]
        B = batch["seg"].shape[0]
        if seg_logits.shape != (B, NUM_SEG_CLASSES, SIDE, SIDE) or depth.shape != (B, 1, SIDE, SIDE):
            raise ValueError(f"fashion_dense: expected seg logits ({B}, {NUM_SEG_CLASSES}, 28, 28) and depth "
                             f"({B}, 1, 28, 28), got {tuple(seg_logits.shape)} and {tuple(depth.shape)}")
        return seg_logits, depth[:, 0], balance

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        seg_logits, depth, balance = self._outputs(model, batch)
        ce = F.cross_entropy(seg_logits.float(), batch["seg"])
        mse = F.mse_loss(depth.float(), batch["depth"])
        loss = ce + self.depth_weight * mse + self.balance_weight * balance
        with torch.no_grad():
            pred = seg_logits.argmax(1)
            conf = confusion(pred, batch["seg"])
        return loss, {"loss": loss.item(), "ce": ce.item(), "mse": mse.item(), "rmse": mse.item() ** 0.5,
                      "balance": float(balance.detach()), "miou": miou(conf),
                      "pixel_accuracy": float((pred == batch["seg"]).float().mean())}

    @torch.no_grad()
    def scores(self, model: nn.Module, *, batches: int, batch_size: int = 100, split: str = "val",
               device: torch.device | str = "cpu") -> dict[str, float]:
        """Pooled metrics over the first `batches` batches of `split`: mIoU from one confusion matrix,
        RMSE over all pixels, mean CE, pixel accuracy; IoU per class in "iou"."""
        was_training = model.training
        model.eval()
        conf = torch.zeros(NUM_SEG_CLASSES, NUM_SEG_CLASSES, dtype=torch.long)
        sq, ce, pixels = 0.0, 0.0, 0
        try:
            for i in range(batches):
                b = {k: v.to(device) for k, v in self.batch(split, i, batch_size).items()}
                seg_logits, depth, _ = self._outputs(model, b)
                conf += confusion(seg_logits.argmax(1), b["seg"]).cpu()
                sq += float(((depth.float() - b["depth"]) ** 2).sum())
                ce += float(F.cross_entropy(seg_logits.float(), b["seg"], reduction="sum"))
                pixels += b["seg"].numel()
        finally:
            model.train(was_training)
        c = conf.to(torch.float64)
        iou = c.diagonal() / (c.sum(0) + c.sum(1) - c.diagonal()).clamp_min(1)
        return {"miou": miou(conf), "rmse": (sq / pixels) ** 0.5, "ce": ce / pixels,
                "pixel_accuracy": float(c.diagonal().sum() / c.sum()), "iou": iou.tolist()}

    def evaluate(self, model: nn.Module, *, batches: int = 4, batch_size: int = 64,
                 device: torch.device | str = "cpu") -> dict[str, float]:
        """Pooled val metrics (see `scores`), without the per-class list."""
        s = self.scores(model, batches=batches, batch_size=batch_size, device=device)
        return {k: v for k, v in s.items() if k != "iou"}

    def baselines(self, *, batches: int, batch_size: int = 100, split: str = "val") -> dict[str, float]:
        """Trivial predictors on the same pixels: all-background mIoU, and the RMSE of predicting the
        train-set mean depth everywhere (the mean from 20 train batches of 100)."""
        mean = float(torch.stack([self.batch("train", i, 100)["depth"].mean() for i in range(20)]).mean())
        conf = torch.zeros(NUM_SEG_CLASSES, NUM_SEG_CLASSES, dtype=torch.long)
        sq, pixels = 0.0, 0
        for i in range(batches):
            b = self.batch(split, i, batch_size)
            conf += confusion(torch.zeros_like(b["seg"]), b["seg"])
            sq += float(((b["depth"] - mean) ** 2).sum())
            pixels += b["seg"].numel()
        return {"all_background_miou": miou(conf), "mean_depth_rmse": (sq / pixels) ** 0.5, "mean_depth": mean}


__all__ = ["FashionDense", "distance_to_background", "confusion", "miou", "TASK_CHANNELS", "NUM_SEG_CLASSES"]
