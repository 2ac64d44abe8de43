"""Head importance and spatial attention profiles: which heads matter, and where they look.

Importance (one number per (layer, head), for an objective = a loss, lower is better):
    ablation_importance   objective(head h masked) - objective(unmasked), h's per-head output
                          (`hook_z`) replaced by zero or by its mean over the data. Single-head
                          ablation, Michel, Levy & Neubig (2019), "Are Sixteen Heads Really Better
                          than One?", Sec. 3.1 (they report the metric drop; here the loss rise).
                          The "pruning-based metrics" of Li et al. (2023, below) Sec. 4 are of
                          this kind. Mean ablation replaces the head by the data mean instead of
                          0, so that a head whose output is a constant offset counts as
                          unimportant (the mean ablation of circuit analyses, e.g. Wang et al.
                          2023, "Interpretability in the Wild", the IOI circuit).
    gradient_importance   I_h = E_x |dL(x)/d xi_h| at xi = 1, with a gate xi_h on each head's
                          output: Michel et al. (2019) Sec. 4.1, the equation for I_h (the first-order Taylor
                          estimate of |L(xi_h = 0) - L(xi_h = 1)|). The expectation runs over the
                          batches given, |.| taken per batch as in the official code (pmichel31415/
                          are-16-heads-really-better-than-1, carried into transformers'
                          examples/research_projects/bertology/run_bertology.py,
                          compute_heads_importance); batches of one example give the equation
                          exactly. `normalize_by_layer` divides each layer by its l2 norm (Sec. 4.1,
                          as that code does by default).

Spatial profiles (attention patterns `hook_pattern`, averaged over queries and inputs):
    distance_mass         attention mass by distance bin: for vision, rings of Chebyshev
                          distance max(|dy|, |dx|) around the query patch on the patch grid (the
                          "attention strength" by spatial neighbourhood of Li et al. 2023, "How
                          Does Attention Work in Vision Transformers? A Visual Analytics
                          Attempt", IEEE TVCG 29(6), Sec. 5; no code was released, so the exact
                          normalisation here is ours: the summed weight of the keys in ring r,
                          averaged over query patches; divide by `ring_sizes` for the mean
                          weight per key instead). For text, bins of token distance |i - j|.
    mean_attention_distance   sum_k A_qk * ||p_q - p_k|| in pixels, averaged over queries: ViT,
                          Dosovitskiy et al. (2021), Fig. 7 and Appendix D ("averaging the
                          distance between the query pixel and all other pixels, weighted by the
                          attention weight"); distances between patch centres, prefix (CLS)
                          tokens left out, the weights renormalised over the patch keys.
    cluster_heads         k-means (or agglomerative, Ward) on the heads' distance profiles (mass
                          by distance, renormalised to sum to 1), k chosen by silhouette when not
                          given. Li et al. (2023) Sec. 6 group heads by pattern with an
                          autoencoder's latent space; clustering the distance profiles directly
                          is our simpler stand-in, named as such in every table.

Objectives (`Objective = (model, batch) -> loss tensor or {name: loss}`), built by `run`:
    causal LMs        next-token NLL (tinyshakespeare, a path argument).
    sentence encoders (MiniLM) "drift": 1 - cos(embedding, unablated embedding), the brief's
                      ablation objective; its gradient at the unablated gates is zero (a
                      minimum), so the gradient importance uses "mnrl" instead: the
                      MultipleNegativesRankingLoss (in-batch softmax over cosine x 20) on
                      paraphrase pairs, the loss all-MiniLM-L6-v2 was fine-tuned with.
    DINOv2            "drift": 1 - cos(CLS, unablated CLS) on sample images and views of them;
                      "invariance": 1 - cos(CLS(image), CLS(view)), a label-free view-consistency
                      loss (DINO's objective is consistency between views) whose gradient is not
                      degenerate.
    attnlab models    their task loss: pass objective= and batches=.

Needs the `lab` extra for plots and clustering (matplotlib, scikit-learn) and the `hf` extra for
HuggingFace models; both are imported inside the functions that use them.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._extras import optional_import
from attnlab._io import save_figure, write_text
from attnlab.probes.capture import ablate_heads, capture, scale_heads
from attnlab.probes import inputs

Objective = Callable[[nn.Module, Any], "Tensor | dict[str, Tensor]"]
Progress = Callable[[int, int, str], None]

MNRL_SCALE = 20.0                                     # sentence-transformers' MultipleNegativesRankingLoss default


# --------------------------------------------------------------------------- results

@dataclass
class HeadScores:
    """Per-(layer, head) scores of one importance method.

    scores: {objective name: (L, h) tensor}; base: the unablated objective (mean over batches);
    signed: for gradients, the mean signed dL/d xi_h (None for ablation). A layer without a
    hook_z (e.g. a convolution mixer in an attnlab model) has a NaN row.
    """

    method: str                                  # "ablation:zero", "ablation:mean", "gradient"
    scores: dict[str, Tensor]
    base: dict[str, float]
    signed: dict[str, Tensor] | None = None
    heads: list[int] = field(default_factory=list)   # heads per layer (0: no hook_z)

    def ranking(self, name: str | None = None) -> list[tuple[int, int]]:
        """(layer, head) from most to least important (by |score|), NaN rows left out."""
        s = self.scores[name or next(iter(self.scores))].abs()
        order = torch.argsort(torch.nan_to_num(s, nan=-1.0).flatten(), descending=True, stable=True)
        h = s.shape[1]
        return [(int(i) // h, int(i) % h) for i in order if not torch.isnan(s.flatten()[i])]


def _as_losses(out) -> dict[str, Tensor]:
    if isinstance(out, Tensor):
        if out.numel() != 1:
            raise ValueError(f"an objective must return a scalar loss (or a dict of them), got shape {tuple(out.shape)}")
        return {"loss": out.reshape(())}
    if isinstance(out, Mapping) and out and all(isinstance(v, Tensor) and v.numel() == 1 for v in out.values()):
        return {str(k): v.reshape(()) for k, v in out.items()}
    raise TypeError(f"an objective must return a scalar tensor or a non-empty dict of scalar tensors, got "
                    f"{type(out).__name__}")


def _progress(progress: Progress | None, done: int, total: int, what: str) -> None:
    if progress is not None:
        progress(done, total, what)


# --------------------------------------------------------------------------- importance

def head_outputs(model: nn.Module, objective: Objective, batches: Sequence[Any], *,
                 token_mask: Callable[[Any], Tensor | None] | None = None):
    """One pass over `batches`: (base objective {name: mean over batches}, per-layer head counts,
    per-layer mean head output (h, d) over the tokens `token_mask(batch)` (B, N) selects, or None
    for a layer without hook_z)."""
    sums: dict[int, Tensor] = {}
    counts: dict[int, float] = {}
    dtypes: dict[int, torch.dtype] = {}
    base: dict[str, float] = {}
    with torch.no_grad(), capture(model, names="blocks.*.attn.hook_z") as cap:
        num_layers = cap.num_layers
        for batch in batches:
            cap.cache.clear()
            for k, v in _as_losses(objective(model, batch)).items():
                base[k] = base.get(k, 0.0) + float(v) / len(batches)
            mask = token_mask(batch) if token_mask is not None else None
            for l in range(num_layers):
                name = f"blocks.{l}.attn.hook_z"
                if name not in cap:
                    continue
                z = cap[name]                                            # (B, N, h, d)
                w = torch.ones(z.shape[:2]) if mask is None else mask.to(torch.float64).reshape(z.shape[:2])
                w = w.to(torch.float64)
                sums[l] = sums.get(l, 0) + torch.einsum("bn,bnhd->hd", w, z.to(torch.float64))
                counts[l] = counts.get(l, 0.0) + float(w.sum())
                dtypes[l] = z.dtype
    heads = [int(sums[l].shape[0]) if l in sums else 0 for l in range(num_layers)]
    means = [(sums[l] / max(counts[l], 1e-12)).to(dtypes[l]) if l in sums else None for l in range(num_layers)]
    return base, heads, means


def ablation_importance(model: nn.Module, objective: Objective, batches: Iterable[Any], *, mode: str = "zero",
                        heads: Iterable[tuple[int, int]] | None = None,
                        token_mask: Callable[[Any], Tensor | None] | None = None,
                        progress: Progress | None = None) -> HeadScores:
    """objective(one head ablated) - objective(none), mean over `batches`, per (layer, head).

    mode: "zero" (the head's hook_z set to 0: `capture.ablate_heads`, equal to zeroing its
    columns of the output projection) or "mean" (set to its mean over the batches' tokens,
    `token_mask(batch)` (B, N) choosing the tokens, e.g. the attention mask of padded text).
    heads: the (layer, head) pairs to ablate (default all; the others stay NaN).
    """
    if mode not in ("zero", "mean"):
        raise ValueError(f"ablation mode must be 'zero' or 'mean', got {mode!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("ablation_importance needs at least one batch")
    base, counts, means = head_outputs(model, objective, batches, token_mask=token_mask)
    L, h = len(counts), max(counts)
    todo = [(l, j) for l in range(L) for j in range(counts[l])] if heads is None else [(int(l), int(j)) for l, j in heads]
    for l, j in todo:
        if not (0 <= l < L and 0 <= j < counts[l]):
            raise IndexError(f"ablation_importance: no head {j} in layer {l} (heads per layer: {counts})")
    scores = {k: torch.full((L, h), float("nan"), dtype=torch.float64) for k in base}
    for i, (l, j) in enumerate(todo):
        value = 0.0 if mode == "zero" else means[l][j]                  # (d,) broadcasts over (B, N, 1, d)
        total: dict[str, float] = {}
        with torch.no_grad(), capture(model, names=[], edits=ablate_heads({l: [j]}, value=value)):
            for batch in batches:
                for k, v in _as_losses(objective(model, batch)).items():
                    total[k] = total.get(k, 0.0) + float(v) / len(batches)
        for k in base:
            scores[k][l, j] = total[k] - base[k]
        _progress(progress, i + 1, len(todo), f"ablation ({mode}) layer {l} head {j}")
    return HeadScores(f"ablation:{mode}", scores, base, heads=counts)


def gradient_importance(model: nn.Module, objective: Objective, batches: Iterable[Any], *, key: str | None = None,
                        normalize_by_layer: bool = False, progress: Progress | None = None) -> HeadScores:
    """Michel et al. (2019) Sec. 4.1: I_h = mean over batches of |d objective / d xi_h| at xi = 1.

    Gates xi_h (one per head, all 1) multiply each head's output through `capture.scale_heads`;
    one backward per batch gives all of them (the model's own parameters get no .grad).
    key: which loss of a dict-valued objective to differentiate (needed when it returns several).
    normalize_by_layer: divide each layer's scores by their l2 norm (Michel et al. Sec. 4.1; the
    official code's default when pruning, off here so that layers stay comparable).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("gradient_importance needs at least one batch")
    with torch.no_grad(), capture(model, names="blocks.*.attn.hook_z") as cap:
        _as_losses(objective(model, batches[0]))
        counts = [cap[f"blocks.{l}.attn.hook_z"].shape[2] if f"blocks.{l}.attn.hook_z" in cap else 0
                  for l in range(cap.num_layers)]
    L, h = len(counts), max(counts)
    gates = {l: torch.ones(counts[l], dtype=torch.float64, requires_grad=True) for l in range(L) if counts[l]}
    absolute = torch.zeros(L, h, dtype=torch.float64)
    signed = torch.zeros(L, h, dtype=torch.float64)
    base = 0.0
    name = key
    for i, batch in enumerate(batches):
        with torch.enable_grad(), capture(model, names=[], edits=scale_heads(gates)):
            losses = _as_losses(objective(model, batch))
            if name is None:
                if len(losses) != 1:
                    raise ValueError(f"gradient_importance: the objective returns {sorted(losses)}; say which with key=")
                name = next(iter(losses))
            if name not in losses:
                raise KeyError(f"gradient_importance: key {name!r} not among the objective's losses {sorted(losses)}")
            loss = losses[name]
            grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
        base += float(loss.detach()) / len(batches)
        for (l, _), g in zip(gates.items(), grads):
            g = torch.zeros(counts[l], dtype=torch.float64) if g is None else g.detach()
            absolute[l, :counts[l]] += g.abs() / len(batches)
            signed[l, :counts[l]] += g / len(batches)
        _progress(progress, i + 1, len(batches), "gradient importance")
    for l in range(L):
        absolute[l, counts[l]:] = float("nan")
        signed[l, counts[l]:] = float("nan")
    if normalize_by_layer:
        absolute = absolute / (absolute.nan_to_num().pow(2).sum(-1, keepdim=True).sqrt() + 1e-20)
    return HeadScores("gradient", {name: absolute}, {name: base}, signed={name: signed}, heads=counts)


def rank_correlation(a, b) -> float:
    """Spearman's rho of two score arrays (NaNs dropped pairwise; ties get their mean rank)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 2:
        return float("nan")

    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(x.size)
        r[order] = np.arange(x.size, dtype=np.float64)
        for v in np.unique(x):                                      # ties: the mean of their ranks
            same = x == v
            if same.sum() > 1:
                r[same] = r[same].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def top_overlap(a, b, k: int) -> float:
    """|top-k(a) & top-k(b)| / k, NaN entries never counted as top."""
    a = np.nan_to_num(np.asarray(a, dtype=np.float64).ravel(), nan=-np.inf)
    b = np.nan_to_num(np.asarray(b, dtype=np.float64).ravel(), nan=-np.inf)
    k = min(k, a.size)
    return len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k


# --------------------------------------------------------------------------- distances

def grid_coordinates(grid: tuple[int, int]) -> Tensor:
    """(P, 2) (row, column) of the patches of a (rows, cols) grid, row-major: HuggingFace ViT and
    DINOv2 flatten the patch convolution's output as flatten(2), so patch i is (i // cols, i % cols)."""
    rows, cols = int(grid[0]), int(grid[1])
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([y.flatten(), x.flatten()], dim=-1)


def grid_distances(grid: tuple[int, int], *, metric: str = "chebyshev") -> Tensor:
    """(P, P) distances between patches in patch units: "chebyshev" max(|dy|, |dx|) (the ring a key
    lies on around the query, long) or "euclidean" (float64)."""
    c = grid_coordinates(grid)
    d = (c[:, None, :] - c[None, :, :]).abs()                           # (P, P, 2)
    if metric == "chebyshev":
        return d.max(-1).values
    if metric == "euclidean":
        return d.to(torch.float64).pow(2).sum(-1).sqrt()
    raise ValueError(f"metric must be 'chebyshev' or 'euclidean', got {metric!r}")


def with_prefix(distances: Tensor, prefix: int, fill) -> Tensor:
    """Pad a (P, P) patch-distance matrix to (prefix + P, prefix + P) for the prefix tokens (CLS,
    registers) that come first in the sequence; their rows and columns get `fill`."""
    P = distances.shape[0]
    out = torch.full((prefix + P, prefix + P), fill, dtype=distances.dtype)
    out[prefix:, prefix:] = distances
    return out


def token_distance_bins(n: int) -> tuple[Tensor, list[str]]:
    """(n, n) bins of |i - j| for text, 0, 1, 2-3, 4-7, ... (bin floor(log2 d) + 1), and their labels."""
    i = torch.arange(n)
    d = (i[:, None] - i[None, :]).abs()
    bins = torch.where(d == 0, 0, torch.floor(torch.log2(d.clamp_min(1).double())).long() + 1)
    labels = []
    for b in range(int(bins.max()) + 1):
        lo, hi = (0, 0) if b == 0 else (2 ** (b - 1), min(2 ** b - 1, n - 1))
        labels.append(str(lo) if lo == hi else f"{lo}-{hi}")
    return bins, labels


def _query_weights(pattern: Tensor, query_weights: Tensor | None) -> Tensor:
    B, _, N, _ = pattern.shape
    if query_weights is None:
        return torch.ones(B, N, dtype=torch.float64)
    w = query_weights.to(torch.float64)
    return w.expand(B, N) if w.dim() == 1 else w


def distance_mass_sums(pattern: Tensor, bins: Tensor, num_bins: int, query_weights: Tensor | None = None):
    """(sum over queries of w_q * mass in each bin (h, num_bins), sum of w_q): the parts of
    `distance_mass`, to accumulate over batches."""
    B, h, N, M = pattern.shape
    if bins.shape != (N, M):
        raise ValueError(f"bins must be ({N}, {M}) for a pattern {tuple(pattern.shape)}, got {tuple(bins.shape)}")
    idx = torch.where(bins < 0, num_bins, bins).to(pattern.device)     # keys left out go to an overflow bin
    if int(idx.max()) > num_bins:
        raise ValueError(f"bins go up to {int(bins.max())}, past num_bins={num_bins}")
    per_query = torch.zeros(B, h, N, num_bins + 1, dtype=torch.float64, device=pattern.device)
    per_query.scatter_add_(-1, idx.expand(B, h, N, M), pattern.to(torch.float64))   # (B, h, N, bins + 1)
    w = _query_weights(pattern, query_weights).to(pattern.device)       # (B, N)
    sums = torch.einsum("bn,bhnr->hr", w, per_query[..., :num_bins])
    return sums.cpu(), float(w.sum())


def distance_mass(pattern: Tensor, bins: Tensor, num_bins: int, query_weights: Tensor | None = None) -> Tensor:
    """Attention mass by distance bin, averaged over queries: (h, num_bins).

    pattern (B, h, N, M); bins (N, M) long: the distance bin of key k for query q, -1 for keys
    left out (the CLS token, whose mass is then 1 - the row's sum); query_weights (B, N) or (N,):
    which queries count (0 for prefix tokens or padding). mass[h, r] = sum_{b,q} w_bq
    sum_{k: bins[q,k] = r} A[b,h,q,k] / sum w.
    """
    sums, total = distance_mass_sums(pattern, bins, num_bins, query_weights)
    return sums / max(total, 1e-300)


def ring_sizes(grid: tuple[int, int], num_bins: int | None = None) -> Tensor:
    """Mean number of patch keys at each Chebyshev distance from a query patch: (num_bins,)."""
    d = grid_distances(grid)
    num_bins = int(d.max()) + 1 if num_bins is None else num_bins
    counts = torch.zeros(d.shape[0], num_bins, dtype=torch.float64).scatter_add_(1, d, torch.ones_like(d, dtype=torch.float64))
    return counts.mean(0)


def mean_attention_distance_sums(pattern: Tensor, distances: Tensor, query_weights: Tensor | None = None,
                                 key_mask: Tensor | None = None, *, renormalize: bool = True):
    """(sum_q w_q * distance_q per head (h,), sum_q w_q (h,)): the parts of `mean_attention_distance`."""
    B, h, N, M = pattern.shape
    A = pattern.to(torch.float64)
    if key_mask is not None:
        A = A * key_mask.to(A)
    mass = A.sum(-1)                                                    # (B, h, N)
    per_query = (A * distances.to(A)).sum(-1)                           # (B, h, N)
    w = _query_weights(pattern, query_weights).to(A)[:, None, :].expand(B, h, N)
    if renormalize:                                                     # a weighted mean over the kept keys
        keep = mass > 0
        per_query = torch.where(keep, per_query / mass.clamp_min(1e-300), 0.0)
        w = w * keep                                                    # a query with no kept mass has no distance
    return (w * per_query).sum((0, 2)).cpu(), w.sum((0, 2)).cpu()


def mean_attention_distance(pattern: Tensor, distances: Tensor, query_weights: Tensor | None = None,
                            key_mask: Tensor | None = None, *, renormalize: bool = True) -> Tensor:
    """ViT's mean attention distance per head (h,): sum_k A_qk d_qk, averaged over queries.

    distances (N, M) (pixels for ViT's figure: patch-centre distances times the patch size);
    key_mask (M,) bool: the keys that count (patches, not CLS); renormalize: weights divided by
    their sum over the kept keys, so the result is a distance (otherwise mass on left-out keys
    counts as distance 0). NaN for a head whose queries put no mass on the kept keys.
    """
    num, den = mean_attention_distance_sums(pattern, distances, query_weights, key_mask, renormalize=renormalize)
    return torch.where(den > 0, num / den.clamp_min(1e-300), float("nan"))      # NaN: no query had kept mass


# --------------------------------------------------------------------------- profiles over a model

@dataclass
class Profiles:
    """What `attention_profiles` measured, per layer and head.

    mass (L, h, R): attention mass by distance bin (rows sum to 1 - prefix_mass); prefix_mass
    (L, h): mass on the left-out keys (CLS); mean_distance (L, h) in `unit`; bin_labels (R,).
    """

    mass: Tensor
    prefix_mass: Tensor
    mean_distance: Tensor
    bin_labels: list[str]
    unit: str
    distance_name: str
    uniform_mass: Tensor | None = None          # (R,) what attention spread evenly over the kept keys gives
    uniform_distance: float | None = None

    def normalized(self) -> Tensor:
        """The distance profiles renormalised to sum to 1 per head: (L, h, R), what clustering uses."""
        return self.mass / self.mass.sum(-1, keepdim=True).clamp_min(1e-300)


def cluster_heads(profiles, *, k: int | None = None, method: str = "kmeans", k_range: tuple[int, int] = (2, 6),
                  seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Cluster heads by their (n, R) profiles: (labels (n,), info).

    method: "kmeans" (scikit-learn KMeans, 10 restarts, `seed`) or "agglomerative" (Ward). k=None
    picks the k in k_range with the highest silhouette score. Labels are renumbered by the
    centroid's mean bin (0 = the most local cluster). info: k, silhouette per k tried, centroids.
    """
    sk_cluster = optional_import("sklearn.cluster", "lab", what="clustering heads")
    sk_metrics = optional_import("sklearn.metrics", "lab", what="clustering heads")
    X = np.asarray(profiles, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ValueError(f"profiles must be (heads >= 2, bins), got {X.shape}")
    if method not in ("kmeans", "agglomerative"):
        raise ValueError(f"method must be 'kmeans' or 'agglomerative', got {method!r}")

    def fit(n):
        if method == "kmeans":
            return sk_cluster.KMeans(n_clusters=n, n_init=10, random_state=seed).fit_predict(X)
        return sk_cluster.AgglomerativeClustering(n_clusters=n, linkage="ward").fit_predict(X)

    distinct = len(np.unique(X.round(12), axis=0))
    silhouettes: dict[int, float] = {}
    if k is None:
        lo, hi = k_range
        best = None
        for n in range(max(2, lo), min(hi, distinct - 1, X.shape[0] - 1) + 1):
            labels = fit(n)
            s = float(sk_metrics.silhouette_score(X, labels))
            silhouettes[n] = s
            if best is None or s > best[0] + 1e-12:
                best = (s, n, labels)
        if best is None:                                             # too few distinct profiles to choose
            k, labels = min(2, distinct), fit(min(2, distinct)) if distinct >= 2 else np.zeros(X.shape[0], int)
        else:
            _, k, labels = best
    else:
        if not 1 <= k <= X.shape[0]:
            raise ValueError(f"k must lie in [1, {X.shape[0]}], got {k}")
        labels = fit(k) if k > 1 else np.zeros(X.shape[0], int)
    centres = np.stack([X[labels == c].mean(0) for c in range(int(labels.max()) + 1)])
    order = np.argsort(centres @ np.arange(X.shape[1]), kind="stable")   # by mean bin
    relabel = np.empty_like(order)
    relabel[order] = np.arange(order.size)
    labels = relabel[labels]
    return labels, {"k": int(k), "method": method, "silhouette": silhouettes, "centroids": centres[order]}


# --------------------------------------------------------------------------- objectives and data

def nll_objective(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Next-token NLL of a HuggingFace causal LM on batch["input_ids"] (B, N): mean over B (N - 1)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits                                  # (B, N, V)
    return {"nll": F.cross_entropy(_upcast(logits[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())}


def _upcast(x: Tensor) -> Tensor:
    """Half precision to float32 for the losses; float32 and float64 stay."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """sentence-transformers' mean pooling: the mean of the unpadded tokens' states (B, C)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)                      # (B, N, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def encoder_objective(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """batch: {"inputs": tokenizer output for anchors + positives (2n sentences), "ref": (2n, C)
    unablated normalised embeddings, "n"}. drift = mean 1 - cos(e, ref); mnrl = cross-entropy of
    MNRL_SCALE * cos(anchor_i, positive_j) against i (in-batch negatives)."""
    inputs = batch["inputs"]
    e = F.normalize(_upcast(mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])), dim=-1)
    n = batch["n"]
    out = {"drift": (1 - (e * batch["ref"]).sum(-1)).mean()}
    if n:
        out["mnrl"] = F.cross_entropy(MNRL_SCALE * e[:n] @ e[n:2 * n].T, torch.arange(n, device=e.device))
    return out


def vision_objective(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """batch: {"pixel_values": (2n, 3, H, W) images then their views, "ref": (2n, C) unablated CLS, "n"}.
    drift = mean 1 - cos(CLS, ref); invariance = mean 1 - cos(CLS(image_i), CLS(view_i))."""
    cls = _upcast(model(pixel_values=batch["pixel_values"]).last_hidden_state[:, 0])   # (2n, C)
    n = batch["n"]
    out = {"drift": (1 - F.cosine_similarity(cls, batch["ref"], dim=-1)).mean()}
    if n:
        out["invariance"] = (1 - F.cosine_similarity(cls[:n], cls[n:2 * n], dim=-1)).mean()
    return out


# Paraphrase pairs for MiniLM's MNRL objective (written for this probe).
PARAPHRASES = [
    ("A man is playing a guitar on the stage.", "Someone performs on stage with a guitar."),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("It will probably rain tomorrow afternoon.", "Rain is likely tomorrow after lunch."),
    ("She bought fresh bread at the bakery.", "She picked up a new loaf from the baker's."),
    ("The train to the city was delayed.", "The city train arrived late."),
    ("Two children are building a sandcastle.", "A pair of kids make a castle out of sand."),
    ("He forgot his keys at the office.", "He left his keys behind at work."),
    ("The soup needs more salt.", "This soup is not salty enough."),
    ("The museum opens at nine in the morning.", "Doors to the museum open at 9 a.m."),
    ("A dog is chasing a ball across the park.", "In the park a dog runs after a ball."),
    ("The meeting was moved to Thursday.", "They rescheduled the meeting for Thursday."),
    ("My phone battery died during the call.", "The call dropped when my phone ran out of power."),
    ("The river flooded the nearby fields.", "Fields next to the river were under water."),
    ("A woman is slicing tomatoes in the kitchen.", "In the kitchen a lady cuts tomatoes."),
    ("The concert tickets sold out in minutes.", "Tickets for the concert were gone almost at once."),
    ("He is learning to speak Japanese.", "He is studying the Japanese language."),
]


def image_views(pixel_values: Tensor, *, scale: float = 0.8) -> Tensor:
    """A second view of each image: the central `scale` crop, resized back and flipped left-right."""
    B, C, H, W = pixel_values.shape
    h, w = max(1, round(H * scale)), max(1, round(W * scale))
    top, left = (H - h) // 2, (W - w) // 2
    crop = pixel_values[:, :, top:top + h, left:left + w]
    return F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False).flip(-1)


def sample_images(n: int = 4, *, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """Up to n RGB uint8 photographs and where they came from (attnlab.probes.inputs.sample_images)."""
    images, _, source = inputs.sample_images(n, seed=seed)
    return images, source


def shakespeare_text(path: str | os.PathLike | None) -> str:
    """The tinyshakespeare corpus: `path`, else where the tinyshakespeare task finds it
    ($ATTNLAB_TINYSHAKESPEARE, then ../shared/data/tinyshakespeare/input.txt)."""
    return inputs.read_text(path)


# --------------------------------------------------------------------------- plots

def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)                                            # Agg, whatever pyplot's backend is
    return fig


def plot_importance_grids(panels: list[tuple[str, np.ndarray, bool]], path: Path, title: str) -> None:
    """One heatmap per (title, (L, h) scores, signed) panel, layers down and heads across; signed
    scores on a diverging scale centred on 0, up to three panels a row."""
    from matplotlib.colors import TwoSlopeNorm
    L, h = panels[0][1].shape
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    pw, ph = 0.42 * h + 2.2, 0.3 * L + 1.6
    fig = _figure(min(cols * pw, 24), min(rows * ph + 0.6, 30))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= len(panels):
            ax.set_visible(False)
            continue
        name, s, signed = panels[i]
        finite = s[np.isfinite(s)]
        if signed and finite.size:
            m = max(float(np.abs(finite).max()), 1e-30)
            im = ax.imshow(s, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -m, m), aspect="auto", interpolation="nearest")
        else:
            im = ax.imshow(s, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(0, h, max(1, h // 12)))
        ax.set_yticks(range(0, L, max(1, L // 15)))
        ax.tick_params(labelsize=7)
        if h <= 8 and L <= 12 and finite.size:           # numbers only where they fit in the cells
            for (r, c), v in np.ndenumerate(s):
                if np.isfinite(v):
                    ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=6,
                            color="black" if signed else "white")
        bar = fig.colorbar(im, ax=ax, shrink=0.9)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_distance_curves(prof: Profiles, path: Path, title: str) -> None:
    """Attention mass by distance, one subplot per layer, one curve per head."""
    L, h, R = prof.mass.shape
    cols = min(6, L)
    rows = math.ceil(L / cols)
    fig = _figure(3.0 * cols, 2.4 * rows + 0.8)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)
    import matplotlib
    colors = matplotlib.colormaps["tab20"].colors
    x = np.arange(R)
    for l in range(rows * cols):
        ax = axes[l // cols][l % cols]
        if l >= L:
            ax.set_visible(False)
            continue
        for j in range(h):
            if torch.isfinite(prof.mass[l, j]).all():
                ax.plot(x, prof.mass[l, j].numpy(), marker=".", ms=3, lw=1, color=colors[j % len(colors)],
                        label=f"head {j}")
        if prof.uniform_mass is not None:
            ax.plot(x, prof.uniform_mass.numpy(), color="gray", ls="--", lw=1, label="uniform attention")
        ax.set_title(f"layer {l}", fontsize=8)
        ax.grid(True, alpha=0.3)
        if l % cols == 0:
            ax.set_ylabel("attention mass")
        if l // cols == rows - 1 or l + cols >= L:
            ax.set_xlabel(prof.distance_name, fontsize=8)
            step = max(1, R // 8)
            ax.set_xticks(x[::step])
            ax.set_xticklabels(prof.bin_labels[::step], fontsize=6, rotation=45 if R > 12 else 0)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_mean_distance(prof: Profiles, labels: np.ndarray, path: Path, title: str) -> None:
    """ViT Fig. 7 style: each head's mean attention distance against its layer, coloured by cluster."""
    import matplotlib
    L, h = prof.mean_distance.shape
    fig = _figure(7.0, 4.5)
    ax = fig.subplots()
    colors = matplotlib.colormaps["tab10"].colors
    lab = labels.reshape(L, h)
    for c in range(int(labels.max()) + 1):
        ls, hs = np.nonzero(lab == c)
        ax.scatter(ls, prof.mean_distance.numpy()[ls, hs], color=colors[c % 10], s=22, label=f"cluster {c}")
    if prof.uniform_distance is not None:
        ax.axhline(prof.uniform_distance, color="gray", ls="--", lw=1,
                   label=f"uniform attention ({prof.uniform_distance:.0f} {prof.unit})")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean attention distance ({prof.unit})")
    ax.set_xticks(range(L))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_clusters(X: np.ndarray, labels: np.ndarray, info: dict, names: list[str], bin_labels: list[str],
                  path: Path, title: str) -> None:
    """Heads in the first two principal components of their profiles, and each cluster's mean profile."""
    import matplotlib
    colors = matplotlib.colormaps["tab10"].colors
    Xc = X - X.mean(0)
    _, _, vt = np.linalg.svd(Xc, full_matrices=False)
    pc = Xc @ vt[:2].T if vt.shape[0] >= 2 else np.c_[Xc @ vt[:1].T, np.zeros(len(X))]
    fig = _figure(12.0, 5.0)
    ax, bx = fig.subplots(1, 2)
    for c in range(int(labels.max()) + 1):
        sel = labels == c
        ax.scatter(pc[sel, 0], pc[sel, 1], color=colors[c % 10], s=26, label=f"cluster {c} ({int(sel.sum())} heads)")
        bx.plot(range(X.shape[1]), info["centroids"][c], marker="o", ms=3, color=colors[c % 10], label=f"cluster {c}")
    if len(names) <= 120:
        for (x, y), n in zip(pc, names):
            ax.annotate(n, (x, y), fontsize=5.5, xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("profile PC 1")
    ax.set_ylabel("profile PC 2")
    ax.set_title(f"heads by distance profile ({info['method']}, k={info['k']})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    step = max(1, len(bin_labels) // 10)
    bx.set_xticks(range(0, len(bin_labels), step))
    bx.set_xticklabels(bin_labels[::step], fontsize=7)
    bx.set_xlabel("distance bin")
    bx.set_ylabel("share of the patch/token attention")
    bx.set_title("cluster mean profiles", fontsize=9)
    bx.legend(fontsize=7)
    bx.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def plot_agreement(ablation: np.ndarray, gradient: np.ndarray, path: Path, title: str) -> None:
    """|ablation change| against gradient importance, one dot per head (log axes)."""
    a, g = np.abs(ablation.ravel()), gradient.ravel()
    keep = np.isfinite(a) & np.isfinite(g)
    fig = _figure(5.5, 5.0)
    ax = fig.subplots()
    ax.scatter(np.maximum(g[keep], 1e-12), np.maximum(a[keep], 1e-12), s=14)
    lo = max(1e-12, min(g[keep].min(initial=1), a[keep].min(initial=1)))
    hi = max(g[keep].max(initial=1e-12), a[keep].max(initial=1e-12))
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8, ls="--", label="|ablation| = gradient (first order)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("gradient importance |dL/d gate| (Michel et al. 2019)")
    ax.set_ylabel("|objective change| when the head is zeroed")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


# --------------------------------------------------------------------------- layouts (what distance means)

Layout = Callable[[int, int], tuple[Tensor, Tensor, Tensor | None, Tensor | None]]


def grid_layout(grid: tuple[int, int], *, prefix: int = 1, patch_size: int = 1) -> tuple[Layout, list[str]]:
    """Vision: (layout, bin labels). Bins are Chebyshev rings on the patch grid (prefix tokens left
    out as keys, weight 0 as queries); distances are patch-centre Euclidean distances x patch_size."""
    rings = grid_distances(grid)
    R = int(rings.max()) + 1
    bins = with_prefix(rings, prefix, -1)
    dist = with_prefix(grid_distances(grid, metric="euclidean") * patch_size, prefix, 0.0)
    keys = torch.ones(bins.shape[1], dtype=torch.bool)
    keys[:prefix] = False
    queries = keys.to(torch.float64)

    def layout(N: int, M: int):
        if (N, M) != tuple(bins.shape):
            raise ValueError(f"a {grid[0]}x{grid[1]} patch grid with {prefix} prefix tokens has {bins.shape[0]} tokens, "
                             f"the pattern has ({N}, {M})")
        return bins, dist, keys, queries
    return layout, [str(r) for r in range(R)]


def token_layout(max_tokens: int) -> tuple[Layout, list[str]]:
    """Text: (layout, bin labels). Bins of |i - j| (0, 1, 2-3, 4-7, ...) up to max_tokens; distances in tokens."""
    _, labels = token_distance_bins(max_tokens)

    def layout(N: int, M: int):
        if N != M or N > max_tokens:
            raise ValueError(f"token_layout({max_tokens}) takes square patterns of at most {max_tokens} tokens, got ({N}, {M})")
        bins, _ = token_distance_bins(N)
        i = torch.arange(N, dtype=torch.float64)
        return bins, (i[:, None] - i[None, :]).abs(), None, None
    return layout, labels


def uniform_reference(layout: Layout, num_tokens: int, num_bins: int) -> tuple[Tensor, float]:
    """(mass by bin (num_bins,), mean distance) of a pattern spread evenly over the layout's kept
    keys: the curve a head without any spatial preference draws (ring sizes set its shape)."""
    bins, dist, keys, queries = layout(num_tokens, num_tokens)
    keep = torch.ones(num_tokens, dtype=torch.bool) if keys is None else keys
    pattern = (keep.to(torch.float64) / keep.sum()).expand(1, 1, num_tokens, num_tokens)
    mass = distance_mass(pattern, bins, num_bins, queries)[0]
    return mass, float(mean_attention_distance(pattern, dist, queries, keys)[0])


def attention_profiles(model: nn.Module, objective: Objective, batches: Iterable[Any], layout: Layout,
                         bin_labels: Sequence[str], *, unit: str, distance_name: str,
                         query_mask: Callable[[Any], Tensor | None] | None = None,
                       edits: dict | None = None) -> Profiles:
    """Run `objective` (only for its forward) on each batch inside capture and reduce each layer's
    pattern at once to distance masses and mean distances (the patterns are never all held).

    layout(N, M) -> (bins (N, M) long, -1 for keys left out; distances (N, M); key_mask (M,) or
    None: the keys of the mean distance; query weights (N,) or None); query_mask: batch -> (B, N)
    weights multiplied in (e.g. a padding mask); edits: capture edits active meanwhile (the
    profiles of an edited model; the recorded pattern is the edited one).
    """
    R = len(bin_labels)
    acc: dict[int, list] = {}
    with torch.no_grad(), capture(model, names="blocks.*.attn.hook_pattern", edits=edits) as cap:
        L = cap.num_layers
        for batch in batches:
            cap.cache.clear()
            objective(model, batch)
            extra = query_mask(batch) if query_mask is not None else None
            for l in range(L):
                name = f"blocks.{l}.attn.hook_pattern"
                if name not in cap:
                    continue
                p = cap[name]                                          # (B, h, N, M)
                bins, dist, keys, queries = layout(p.shape[-2], p.shape[-1])
                w = queries
                if extra is not None:
                    extra_w = extra.to(torch.float64)
                    w = extra_w if w is None else extra_w * w
                ms, mt = distance_mass_sums(p, bins, R, w)
                ds, dt = mean_attention_distance_sums(p, dist, w, keys)
                a = acc.get(l)
                acc[l] = [ms, mt, ds, dt] if a is None else [a[0] + ms, a[1] + mt, a[2] + ds, a[3] + dt]
    h = max((a[0].shape[0] for a in acc.values()), default=0)
    mass = torch.full((L, h, R), float("nan"), dtype=torch.float64)
    dist = torch.full((L, h), float("nan"), dtype=torch.float64)
    for l, (ms, mt, ds, dt) in acc.items():
        mass[l, :ms.shape[0]] = ms / max(mt, 1e-300)
        dist[l, :ds.shape[0]] = torch.where(dt > 0, ds / dt.clamp_min(1e-300), float("nan"))
    return Profiles(mass, (1 - mass.sum(-1)).clamp_min(0), dist, list(bin_labels), unit, distance_name)


# --------------------------------------------------------------------------- run

@dataclass
class HeadsConfig:
    """The knobs of `run` (defaults sized to a few minutes on one CPU thread for DINOv2-S and MiniLM).

    modes: ablation modes; gradient: also Michel et al.'s gradient importance; clusters: k for
    the head clustering (None: by silhouette); images/image_size: DINOv2 inputs; text_path,
    seq_len, sequences: the causal-LM objective's data (tinyshakespeare); max_tokens: the text
    layout's longest sequence; grid, prefix_tokens, patch_size: for a model given with its own
    objective whose tokens are a patch grid (prefix tokens first), the spatial layout to use
    instead of token distances.
    """

    modes: tuple[str, ...] = ("zero", "mean")
    gradient: bool = True
    clusters: int | None = None
    cluster_method: str = "kmeans"
    images: int = 4
    image_size: int = 224
    text_path: str | None = None
    seq_len: int = 64
    sequences: int = 4
    max_tokens: int = 512
    grid: tuple[int, int] | None = None
    prefix_tokens: int = 0
    patch_size: int = 1
    seed: int = 0


@dataclass
class _Setup:
    """What run() needs for one model: data, objective, and how to read distances."""

    name: str
    kind: str
    model: nn.Module
    objective: Objective
    batches: list
    grad_key: str | None
    layout: Layout
    bin_labels: list[str]
    unit: str
    distance_name: str
    inputs: str
    token_mask: Callable[[Any], Tensor | None] | None = None
    notes: list[str] = field(default_factory=list)
    uniform_tokens: int | None = None            # vision: tokens of the uniform-attention reference


def _assets():
    # Lazily: the loaders need the hf extra and the model packages (attnlab.probes.assets).
    import importlib
    return importlib.import_module("attnlab.probes.assets")


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def _hf_kind(model: nn.Module) -> str:
    cfg = model.config
    if type(model).__name__.endswith("ForCausalLM"):
        return "lm"
    if getattr(cfg, "patch_size", None) is not None and getattr(cfg, "image_size", None) is not None:
        return "vision"
    return "encoder"


def _load(name: str):
    """A model name (dinov2, minilm, smollm2, gemma3) or a HuggingFace folder -> (model, tokenizer or None, name)."""
    key = name.lower()
    if key in ("dinov2", "dinov2-s", "dinov2-s14"):
        return _assets().load_dinov2(), None, "dinov2"
    if key in ("minilm", "all-minilm-l6-v2"):
        model, tok = _assets().load_minilm()
        return model, tok, "minilm"
    if key in ("smollm2", "smollm2-135m"):
        model, tok = _assets().load_smollm2()
        return model, tok, "smollm2"
    if key in ("gemma3", "gemma3-270m"):
        model, tok = _assets().load_gemma3()          # its tokenizer adds <bos> itself
        return model, tok, "gemma3"
    folder = Path(name).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"unknown model {name!r}: expected dinov2, minilm, smollm2, gemma3 or a HuggingFace folder with config.json")
    transformers = optional_import("transformers", "hf", what="loading a HuggingFace model")
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    archs = " ".join(getattr(config, "architectures", None) or [])
    cls = transformers.AutoModelForCausalLM if "CausalLM" in archs else transformers.AutoModel
    model = cls.from_pretrained(str(folder), attn_implementation="eager", local_files_only=True).eval()
    tok = None
    if getattr(config, "patch_size", None) is None:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return model, tok, folder.name


def _vision_setup(model, name, images, cfg: HeadsConfig) -> _Setup:
    source = "pixel tensor given"
    if images is None:
        arrays, source = sample_images(cfg.images, seed=cfg.seed)
        pixels = _assets().dinov2_preprocess(arrays, cfg.image_size)
    elif isinstance(images, Tensor):
        pixels = images.to(next(model.parameters()).dtype)
    else:
        pixels = _assets().dinov2_preprocess(images, cfg.image_size)
        source = f"{len(pixels)} images given"
    if pixels.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W) pixel values or a list of RGB arrays, got {tuple(pixels.shape)}")
    p = int(model.config.patch_size)
    B, _, H, W = pixels.shape
    grid = (H // p, W // p)
    prefix = 1 + int(getattr(model.config, "num_register_tokens", 0) or 0)
    views = image_views(pixels)
    batches = []
    with torch.no_grad():
        for i in range(B):                           # one image (and its view) per batch: E_x per example
            x = torch.cat([pixels[i:i + 1], views[i:i + 1]])
            ref = _upcast(model(pixel_values=x).last_hidden_state[:, 0])
            batches.append({"pixel_values": x, "ref": ref, "n": 1})
    layout, labels = grid_layout(grid, prefix=prefix, patch_size=p)
    return _Setup(name, "vision", model, vision_objective, batches, "invariance", layout, labels, "px",
                  "Chebyshev distance (patches)",
                  f"{B} images at {H}x{W} ({grid[0]}x{grid[1]} patches of {p} px) and their flipped 0.8 crops; {source}",
                  notes=["drift = 1 - cos(CLS, unablated CLS); invariance = 1 - cos(CLS(image), CLS(view))",
                         "the gradient importance uses invariance: drift's gradient at the unablated gates is 0",
                         "one image and its view per batch"],
                  uniform_tokens=prefix + grid[0] * grid[1])


def _encoder_setup(model, name, tokenizer, texts, cfg: HeadsConfig) -> _Setup:
    if tokenizer is None:
        raise ValueError("a text encoder needs tokenizer=")
    pairs = list(texts) if texts is not None else PARAPHRASES
    if not pairs or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in pairs):
        raise ValueError("texts for an encoder must be (anchor, positive) pairs")
    n = len(pairs)
    inputs = tokenizer([a for a, _ in pairs] + [b for _, b in pairs], padding=True, truncation=True,
                       max_length=cfg.max_tokens, return_tensors="pt")
    inputs = {k: v for k, v in inputs.items()}
    with torch.no_grad():
        ref = F.normalize(_upcast(mean_pool(model(**inputs).last_hidden_state, inputs["attention_mask"])), dim=-1)
    batch = {"inputs": inputs, "ref": ref, "n": n}
    layout, labels = token_layout(cfg.max_tokens)
    N = inputs["input_ids"].shape[1]
    return _Setup(name, "encoder", model, encoder_objective, [batch], "mnrl", layout,
                  token_layout(N)[1], "tokens", "token distance |i - j|",
                  f"{n} paraphrase pairs ({2 * n} sentences, padded to {N} tokens)",
                  token_mask=lambda b: b["inputs"]["attention_mask"],
                  notes=["drift = 1 - cos(embedding, unablated embedding) (mean pooling, L2-normalised)",
                         f"mnrl = MultipleNegativesRankingLoss, scale {MNRL_SCALE:g}, in-batch negatives "
                         "(all-MiniLM-L6-v2's fine-tuning loss); one batch, so |dL/d gate| is of the batch loss",
                         "the gradient importance uses mnrl: drift's gradient at the unablated gates is 0"])


def _lm_setup(model, name, tokenizer, cfg: HeadsConfig, bos: int | None) -> _Setup:
    if tokenizer is None:
        raise ValueError("a causal LM needs tokenizer=")
    text = shakespeare_text(cfg.text_path)
    batches = []
    stride = max(1, (len(text) - 16 * cfg.seq_len) // max(1, cfg.sequences))
    for i in range(cfg.sequences):
        chunk = text[i * stride:i * stride + 16 * cfg.seq_len]
        ids = list(tokenizer(chunk)["input_ids"])[:cfg.seq_len]
        if bos is not None:
            ids = [bos] + ids
        batches.append({"input_ids": torch.tensor([ids], dtype=torch.long)})
    N = batches[0]["input_ids"].shape[1]
    layout, _ = token_layout(N)
    return _Setup(name, "lm", model, nll_objective, batches, "nll", layout, token_layout(N)[1], "tokens",
                  "token distance i - j", f"{cfg.sequences} tinyshakespeare sequences of {N} tokens"
                  + (f" (BOS {bos} first)" if bos is not None else ""),
                  notes=["nll = next-token cross-entropy (nats/token); one sequence per batch"])


def _custom_setup(model, name, objective, batches, grad_key, cfg: HeadsConfig) -> _Setup:
    if objective is None or batches is None:
        raise ValueError(f"{name}: a model that is not dinov2/minilm/a HuggingFace LM needs objective=(model, batch) "
                         "-> loss and batches= (e.g. an attnlab task's loss and batches)")
    batches = list(batches)
    if cfg.grid is not None:
        layout, labels = grid_layout(cfg.grid, prefix=cfg.prefix_tokens, patch_size=cfg.patch_size)
        return _Setup(name, "custom", model, objective, batches, grad_key, layout, labels,
                      "px" if cfg.patch_size > 1 else "patches", "Chebyshev distance (patches)",
                      f"{len(batches)} batches given", notes=["objective given by the caller"],
                      uniform_tokens=cfg.prefix_tokens + cfg.grid[0] * cfg.grid[1])
    layout, labels = token_layout(cfg.max_tokens)
    return _Setup(name, "custom", model, objective, batches, grad_key, layout, labels, "tokens",
                  "token distance |i - j|", f"{len(batches)} batches given", notes=["objective given by the caller"])


def _trim_labels(prof: Profiles) -> Profiles:
    """Drop trailing distance bins that no head reaches (text layouts are sized for max_tokens)."""
    m = prof.mass.nan_to_num()
    used = np.nonzero((m.abs() > 0).any(0).any(0).numpy())[0]
    R = int(used.max()) + 1 if used.size else 1
    return Profiles(prof.mass[..., :R], prof.prefix_mass, prof.mean_distance, prof.bin_labels[:R], prof.unit,
                    prof.distance_name, None if prof.uniform_mass is None else prof.uniform_mass[:R],
                    prof.uniform_distance)


def _fmt(v: float, spec: str = ".4g") -> str:
    return "-" if v is None or not np.isfinite(v) else format(v, spec)


def _jsonable(x):
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return [_jsonable(v) for v in x] if x.ndim else _jsonable(x.item())
    if isinstance(x, (float, np.floating)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def run(model_name_or_model, *, out: Path, config: HeadsConfig | None = None, tokenizer=None, images=None,
        texts=None, objective: Objective | None = None, batches: Iterable[Any] | None = None,
        grad_key: str | None = None, progress: Progress | None = None) -> dict:
    """Head importance and spatial profiles of one model; writes heads.md, heads.json and PNGs into `out`.

    model_name_or_model: "dinov2", "minilm", "smollm2", "gemma3", a HuggingFace folder, or a model: a
    HuggingFace vision model (patch_size in its config; images= pixel values or RGB arrays), a
    text encoder or causal LM (tokenizer=), or an attnlab model (objective= and batches=: its
    task loss; grad_key= names the loss to differentiate if the objective returns several).
    texts: (anchor, positive) pairs for an encoder (default PARAPHRASES).
    Returns the JSON document (also with "files": the paths written).
    """
    cfg = config or HeadsConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    bos = None
    if isinstance(model_name_or_model, (str, os.PathLike)):
        model, tok, name = _load(str(model_name_or_model))
        tokenizer = tokenizer or tok
        if name == "smollm2":
            bos = _assets().SMOLLM2_BOS
    elif isinstance(model_name_or_model, nn.Module):
        model, name = model_name_or_model, type(model_name_or_model).__name__
    else:
        raise TypeError(f"run: expected a model name, a folder or an nn.Module, got {type(model_name_or_model).__name__}")
    if objective is not None:
        setup = _custom_setup(model, name, objective, batches, grad_key, cfg)
    elif _is_hf(model):
        kind = _hf_kind(model)
        if kind == "vision":
            setup = _vision_setup(model, name, images, cfg)
        elif kind == "lm":
            setup = _lm_setup(model, name, tokenizer, cfg, bos)
        else:
            setup = _encoder_setup(model, name, tokenizer, texts, cfg)
    else:
        setup = _custom_setup(model, name, objective, batches, grad_key, cfg)
    model.eval()

    ablations: dict[str, HeadScores] = {}
    for mode in cfg.modes:
        ablations[mode] = ablation_importance(model, setup.objective, setup.batches, mode=mode,
                                              token_mask=setup.token_mask, progress=progress)
    grad = gradient_importance(model, setup.objective, setup.batches, key=setup.grad_key,
                               progress=progress) if cfg.gradient else None
    prof = _trim_labels(attention_profiles(model, setup.objective, setup.batches, setup.layout, setup.bin_labels,
                                             unit=setup.unit, distance_name=setup.distance_name,
                                             query_mask=setup.token_mask))
    if setup.uniform_tokens is not None:
        prof.uniform_mass, prof.uniform_distance = uniform_reference(setup.layout, setup.uniform_tokens,
                                                                     len(prof.bin_labels))
    L, h = prof.mean_distance.shape
    X = prof.normalized().reshape(L * h, -1).numpy()
    valid = np.isfinite(X).all(1)
    labels = np.full(L * h, -1)
    labels_valid, info = cluster_heads(X[valid], k=cfg.clusters, method=cfg.cluster_method, seed=cfg.seed)
    labels[valid] = labels_valid

    # agreement of the gradient with the ablation of the same objective (|change| vs I_h)
    agreement = []
    gk = None if grad is None else next(iter(grad.scores))
    if grad is not None:
        for mode, ab in ablations.items():
            if gk in ab.scores:
                a, g = ab.scores[gk].abs().numpy(), grad.scores[gk].numpy()
                k = max(1, min(10, int(np.isfinite(g).sum()) // 4))
                agreement.append({"objective": gk, "ablation": mode, "spearman": rank_correlation(a, g),
                                  "top_k": k, "top_k_overlap": top_overlap(a, g, k)})

    files = []

    def png(name):
        files.append(str(out / name))
        return out / name

    panels = []
    for mode, ab in ablations.items():
        for k, s in ab.scores.items():
            panels.append((f"ablation ({mode}): {k} change", s.numpy(), True))
    if grad is not None:
        for k, s in grad.scores.items():
            panels.append((f"gradient |d {k} / d gate|", s.numpy(), False))
    if panels:
        plot_importance_grids(panels, png("importance_grid.png"), f"{setup.name}: head importance ({setup.inputs})")
    plot_distance_curves(prof, png("distance_curves.png"),
                         f"{setup.name}: attention mass by {setup.distance_name} (mean over queries and inputs)")
    plot_mean_distance(prof, labels, png("mean_distance.png"),
                       f"{setup.name}: mean attention distance per head (ViT Fig. 7 style)")
    names = [f"{l}.{j}" for l in range(L) for j in range(h)]
    plot_clusters(X[valid], labels_valid, info, [n for n, v in zip(names, valid) if v], prof.bin_labels,
                  png("clusters.png"), f"{setup.name}: heads clustered by distance profile")
    if grad is not None and "zero" in ablations and gk in ablations["zero"].scores:
        rho = next(a["spearman"] for a in agreement if a["ablation"] == "zero")
        plot_agreement(ablations["zero"].scores[gk].numpy(), grad.scores[gk].numpy(), png("importance_agreement.png"),
                       f"{setup.name}: {gk}, zero ablation vs gradient (Spearman {rho:.2f})")

    doc = {
        "probe": "heads", "model": setup.name, "kind": setup.kind, "layers": L, "heads": h, "inputs": setup.inputs,
        "notes": setup.notes, "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "base": {**next(iter(ablations.values())).base} if ablations else (grad.base if grad else {}),
        "ablation": {mode: {k: s for k, s in ab.scores.items()} for mode, ab in ablations.items()},
        "gradient": None if grad is None else {"key": gk, "importance": grad.scores[gk], "signed": grad.signed[gk],
                                               "base": grad.base[gk]},
        "agreement": agreement,
        "spatial": {"distance": setup.distance_name, "unit": setup.unit, "bins": prof.bin_labels,
                    "mass": prof.mass, "prefix_mass": prof.prefix_mass, "mean_distance": prof.mean_distance,
                    "uniform_mass": prof.uniform_mass, "uniform_distance": prof.uniform_distance},
        "clusters": {"labels": labels.reshape(L, h), "k": info["k"], "method": info["method"],
                     "silhouette": info["silhouette"], "centroids": info["centroids"],
                     "source": "k-means/Ward on distance profiles (a stand-in for Li et al. 2023's autoencoder)"},
        "seconds": time.perf_counter() - t0,
    }
    doc = _jsonable(doc)
    files = [str(out / "heads.md"), str(out / "heads.json")] + files
    doc["files"] = files
    write_text(out / "heads.json", json.dumps(doc, indent=1) + "\n")
    write_text(out / "heads.md", _markdown(doc))
    return doc


def _markdown(doc: dict) -> str:
    L, h = doc["layers"], doc["heads"]
    lines = [f"# Head importance and spatial profiles: {doc['model']}", "",
             f"{doc['kind']} model, {L} layers x {h} heads; inputs: {doc['inputs']}; {doc['seconds']:.1f} s.", ""]
    lines += [f"- {n}" for n in doc["notes"]] + [""]
    lines += ["| objective (unablated) | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in doc["base"].items()] + [""]
    if doc["agreement"]:
        lines += ["Gradient importance (Michel et al. 2019) against single-head ablation of the same objective:", "",
                  "| objective | ablation | Spearman rho, abs(change) vs gradient | top-k overlap |", "| --- | --- | --- | --- |"]
        lines += [f"| {a['objective']} | {a['ablation']} | {_fmt(a['spearman'], '.3f')} | "
                  f"{_fmt(a['top_k_overlap'], '.2f')} (k={a['top_k']}) |"
                  for a in doc["agreement"]] + [""]
    columns = []                                     # (header, (L, h) values)
    for mode, scores in doc["ablation"].items():
        for k, s in scores.items():
            columns.append((f"abl {mode} {k}", np.array(s, dtype=float)))
    if doc["gradient"]:
        columns.append((f"grad {doc['gradient']['key']}", np.array(doc["gradient"]["importance"], dtype=float)))
    sp = doc["spatial"]
    mass = np.array(sp["mass"], dtype=float)
    for name, s in columns:
        flat = np.nan_to_num(np.abs(s.ravel()), nan=-1)
        top = np.argsort(-flat, kind="stable")[:10]
        lines.append(f"Top heads by |{name}|: " + ", ".join(f"{i // h}.{i % h} ({_fmt(s.ravel()[i], '.3g')})" for i in top))
    lines.append("")
    shown = min(4, mass.shape[-1])
    header = ["layer", "head"] + [c[0] for c in columns] + [f"mean dist ({sp['unit']})", "prefix mass", "cluster"] \
        + [f"mass d={sp['bins'][r]}" for r in range(shown)]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    labels = np.array(doc["clusters"]["labels"])
    for l in range(L):
        for j in range(h):
            row = [str(l), str(j)] + [_fmt(c[1][l, j]) for c in columns]
            row += [_fmt(np.array(sp["mean_distance"], dtype=float)[l, j], ".3g"),
                    _fmt(np.array(sp["prefix_mass"], dtype=float)[l, j], ".3f"), str(labels[l, j])]
            row += [_fmt(mass[l, j, r], ".3f") for r in range(shown)]
            lines.append("| " + " | ".join(row) + " |")
    c = doc["clusters"]
    lines += ["", f"Clusters: {c['method']}, k={c['k']} ({c['source']}); silhouette by k: "
              + (", ".join(f"{k}: {v:.3f}" for k, v in c["silhouette"].items()) or "k given"),
              "Distance bins: " + ", ".join(sp["bins"]) + f" ({sp['distance']})."
              + (f" Attention spread evenly over the patches would give a mean distance of "
                 f"{sp['uniform_distance']:.1f} {sp['unit']}." if sp.get("uniform_distance") is not None else ""), ""]
    lines += ["Files: " + ", ".join(Path(f).name for f in doc["files"]), ""]
    return "\n".join(lines)


__all__ = ["HeadScores", "Profiles", "HeadsConfig", "ablation_importance", "gradient_importance", "head_outputs",
           "rank_correlation", "top_overlap", "grid_coordinates", "grid_distances", "with_prefix", "token_distance_bins",
           "distance_mass", "distance_mass_sums", "ring_sizes", "mean_attention_distance",
           "mean_attention_distance_sums", "attention_profiles", "uniform_reference", "grid_layout", "token_layout",
           "cluster_heads", "nll_objective", "encoder_objective", "vision_objective", "mean_pool", "sample_images",
           "image_views", "shakespeare_text", "PARAPHRASES", "run"]
