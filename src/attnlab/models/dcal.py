"""DCAL networks: attention rollout, local-query selection, the SA + GLCA + PWCA stack, its classifier
and the uncertainty-weighted loss (Zhu et al., CVPR 2022, arXiv 2205.02151; no official code).

    model = DCALClassifier(num_classes=200, dim=192, num_heads=3, depth=12, in_dim=768, max_len=784)
    out = model(patches)                        # training: SA, GLCA and PWCA logits
    loss, parts = model.loss(out, labels)       # 1/2 sum_i (exp(-w_i) L_i + w_i)
    probs = model.predict(patches)              # eval: softmax(SA) + softmax(GLCA), PWCA off

The paper's architecture (Sec. 4.1): L self-attention (SA) blocks, M = 1 global-local
cross-attention (GLCA) block with its own weights, and T = L pair-wise cross-attention (PWCA)
blocks that share the SA blocks' weights and run only in training.

- `attention_rollout` (Eq. 2, after Abnar & Zuidema 2020): S_hat = S_bar_L ... S_bar_1 with
  S_bar_l = 0.5 S_l + 0.5 I, S_l a block's attention probabilities averaged over heads.
- `select_local_queries`: the R tokens with the highest response in the CLS row of S_hat
  (R = local_ratio of the patch tokens: 10% for FGVC, 30% for Re-ID in the paper).
- `DCALBlock`: a pre-norm ViT block whose attention is the `pwca` mechanism: `forward` is the SA
  block (pwca.forward_self), `forward_pair` the same block with image 1's queries over the keys
  and values of both images (Eq. 4), the same weights.
- `GLCABlock`: a pre-norm block whose attention is `glca` (Eq. 3): the selected local tokens are
  the queries (and the residual stream), all tokens the keys and values.
- `DCALTransformer` runs the three branches; `DCALClassifier` adds the patch embedding, the CLS
  token and position embeddings, one head for SA and PWCA (PWCA has the SA branch's target and
  weights) and one for GLCA.
- `UncertaintyWeightedLoss`: 1/2 sum_i (exp(-w_i) L_i + w_i), learnable w_i (the paper follows
  FairMOT's dynamic loss weights).

Readings chosen where the paper is silent (each is an option or said here):
- Where GLCA sits: Eq. 2 selects queries of block i's Q_i with the rollout through block i, so by
  default (`glca_input="parallel"`) the GLCA block takes the input of the last SA block (beside
  it, as block L' of its own branch) and the rollout runs through all L SA blocks;
  `glca_input="output"` takes the SA stack's output instead (a block after the stack).
- The CLS token stays a query of GLCA (its output feeds the GLCA classifier, "the final class
  tokens of SA and GLCA"); the top R are chosen among the patch tokens (CLS column excluded), in
  descending order of response. R = max(1, floor(local_ratio * patches)).
- The rollout serves the selection only: it runs without gradients.
- The PWCA pair: image b's distractor is image pair[b] of the same batch (the paper samples two
  images at random from the training set). By default pair is a random derangement of the batch
  (a random cyclic order, so no image is its own distractor when B > 1). The pair goes through the
  PWCA blocks together: at block l the distractor's keys and values come from its own PWCA-branch
  tokens at that depth.
- Final norms: `norm` for SA and PWCA (shared weights), `glca_norm` for GLCA (its own).
- Not implemented: stochastic depth (the paper's training uses it), the Re-ID triplet loss and
  the concatenation of the two CLS features for Re-ID retrieval (the classifier's `features`
  method returns both).

Checkpoint key map: DCALBlock keeps timm's ViT `Block` names (norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2), so timm `blocks.<i>.*` load into `transformer.blocks.<i>.*`, and a GLCABlock
can be initialised from a pretrained block with `glca.load_state_dict(blocks[-1].state_dict())`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.models.transformer import Mlp
from attnlab.registry import create


# --- rollout and selection -----------------------------------------------------------------------

def attention_rollout(attentions: Sequence[Tensor], *, residual_weight: float = 0.5) -> Tensor:
    """Accumulated attention S_hat = S_bar_L @ ... @ S_bar_1 (Eq. 2), S_bar = (1 - a) S + a I.

    attentions: the blocks' attention probabilities from the first block to the last, each
    (B, h, N, N) (averaged over heads here) or (B, N, N). Returns (B, N, N) in float32 (float64
    for float64 input); row i is how much token i of the last block draws on each input token.
    """
    if not isinstance(attentions, (list, tuple)) or not attentions:
        raise ValueError("attention_rollout expects a non-empty list of attention maps (B, h, N, N) or (B, N, N)")
    if not (isinstance(residual_weight, (int, float)) and not isinstance(residual_weight, bool)
            and 0.0 <= residual_weight <= 1.0):
        raise ValueError(f"attention_rollout: residual_weight must be a number in [0, 1], got {residual_weight!r}")
    shape = None
    rollout = None
    for i, a in enumerate(attentions):
        if not isinstance(a, Tensor) or a.dim() not in (3, 4) or a.shape[-1] != a.shape[-2]:
            got = tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__
            raise ValueError(f"attention_rollout: map {i} must be (B, h, N, N) or (B, N, N), got {got}")
        s = a.mean(1) if a.dim() == 4 else a                               # (B, N, N), heads fused by the mean
        s = s.to(torch.promote_types(s.dtype, torch.float32))
        if shape is not None and s.shape != shape:
            raise ValueError(f"attention_rollout: map {i} is {tuple(s.shape)} after head fusion, the first "
                             f"was {tuple(shape)}")
        shape = s.shape
        eye = torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
        s_bar = (1.0 - residual_weight) * s + residual_weight * eye         # (B, N, N)
        rollout = s_bar if rollout is None else s_bar @ rollout             # the later block on the left
    return rollout


def num_local_queries(num_patches: int, local_ratio: float) -> int:
    """R = max(1, floor(local_ratio * num_patches)): the paper's "top R = 10%" as a count."""
    return max(1, int(math.floor(local_ratio * num_patches + 1e-9)))


def select_local_queries(tokens: Tensor, rollout: Tensor, num_local: int, *,
                         keep_cls: bool = True) -> tuple[Tensor, Tensor]:
    """The local tokens of GLCA: tokens (B, N, C) with the CLS token first, rollout (B, N, N).

    Ranks the patch tokens (1..N-1) by the CLS row rollout[:, 0] and keeps the top `num_local`,
    in descending order of response; with keep_cls the CLS token comes first. Returns the
    gathered tokens (B, K, C) and their indices (B, K) into `tokens` (K = num_local + keep_cls).
    """
    if not isinstance(tokens, Tensor) or tokens.dim() != 3:
        raise ValueError(f"select_local_queries: tokens must be (B, N, C), got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    B, N, C = tokens.shape
    if not isinstance(rollout, Tensor) or tuple(rollout.shape) != (B, N, N):
        got = tuple(rollout.shape) if isinstance(rollout, Tensor) else type(rollout).__name__
        raise ValueError(f"select_local_queries: rollout must be (B, N, N) = ({B}, {N}, {N}) for tokens "
                         f"{tuple(tokens.shape)}, got {got}")
    if isinstance(num_local, bool) or not isinstance(num_local, int) or not 1 <= num_local <= N - 1:
        raise ValueError(f"select_local_queries: num_local must be an int in [1, {N - 1}] (the patch tokens "
                         f"after CLS), got {num_local!r}")
    response = rollout[:, 0, 1:]                                           # (B, N - 1), CLS -> patches
    index = response.topk(num_local, dim=-1).indices + 1                   # (B, R), into tokens
    if keep_cls:
        index = torch.cat([index.new_zeros(B, 1), index], dim=1)           # (B, 1 + R)
    local = torch.gather(tokens, 1, index[..., None].expand(-1, -1, C))    # (B, K, C)
    return local, index


def random_pairs(batch: int, *, generator: torch.Generator | None = None, device=None) -> Tensor:
    """A random derangement of range(batch) (a random cyclic order; [0] for batch 1): pair[b] is
    image b's distractor."""
    if batch <= 1:
        return torch.zeros(batch, dtype=torch.long, device=device)
    order = torch.randperm(batch, generator=generator).to(device)
    pair = torch.empty(batch, dtype=torch.long, device=device)
    pair[order] = order.roll(-1)                                           # order[i] -> order[i + 1]
    return pair


# --- blocks ----------------------------------------------------------------------------------------

class DCALBlock(nn.Module):
    """Pre-norm ViT block over `pwca`: SA with `forward`, PWCA with `forward_pair` (same weights).

    x (B, N, C) -> (B, N, C). Names as timm's Block: norm1, attn (qkv, proj), norm2, mlp (fc1, fc2).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, drop: float = 0.0, act: str = "gelu",
                 norm_layer: type[nn.Module] = nn.LayerNorm, backend: str | None = None):
        super().__init__()
        if not mlp_ratio > 0:
            raise ValueError(f"DCALBlock: mlp_ratio must be > 0, got {mlp_ratio!r}")
        self.norm1 = norm_layer(dim)
        self.attn = create("pwca", dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                           backend=backend)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=drop)

    def forward(self, x: Tensor, *, return_probs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if return_probs:
            y, probs = self.attn.forward_self(self.norm1(x), return_probs=True)
            x = x + y
            return x + self.mlp(self.norm2(x)), probs                       # probs (B, h, N, N)
        x = x + self.attn.forward_self(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_pair(self, x: Tensor, distractor: Tensor) -> Tensor:
        """x (B, N, C) image 1, distractor (B, M, C) image 2 -> (B, N, C), Eq. 4 in the block."""
        x = x + self.attn(self.norm1(x), self.norm1(distractor))
        return x + self.mlp(self.norm2(x))


class GLCABlock(nn.Module):
    """Pre-norm block over `glca`: local (B, K, C), tokens (B, N, C) -> (B, K, C).

    y = local + glca(norm1(local), norm1(tokens)); y + mlp(norm2(y)). Names as timm's Block.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, drop: float = 0.0, act: str = "gelu",
                 norm_layer: type[nn.Module] = nn.LayerNorm, backend: str | None = None):
        super().__init__()
        if not mlp_ratio > 0:
            raise ValueError(f"GLCABlock: mlp_ratio must be > 0, got {mlp_ratio!r}")
        self.norm1 = norm_layer(dim)
        self.attn = create("glca", dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                           backend=backend)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act, drop=drop)

    def forward(self, local: Tensor, tokens: Tensor) -> Tensor:
        y = local + self.attn(self.norm1(local), self.norm1(tokens))
        return y + self.mlp(self.norm2(y))


# --- the stack -------------------------------------------------------------------------------------

class DCALOutput(NamedTuple):
    """What DCALTransformer returns. sa and pwca after `norm`, glca after `glca_norm`."""

    sa: Tensor                  # (B, N, C), the SA branch
    glca: Tensor | None         # (B, K, C), the GLCA branch: CLS first, then the R local tokens
    pwca: Tensor | None         # (B, N, C), the PWCA branch (training, or an explicit pair)
    local_index: Tensor | None  # (B, K), the positions of the GLCA tokens in the input
    rollout: Tensor | None      # (B, N, N), the attention rollout through the L SA blocks


GLCA_INPUTS = ("parallel", "output")


class DCALTransformer(nn.Module):
    """L SA blocks (DCALBlock), one GLCA block, PWCA through the SA blocks' weights.

    forward(x (B, N, C) tokens with the CLS token first, *, pair=None) -> DCALOutput.
    PWCA runs in training mode (with `pair`, or a random derangement of the batch) and in eval
    mode only when `pair` is given; `use_pwca=False` / `use_glca=False` switch a branch off.
    With GLCA on, the SA blocks run the eager attention path (the rollout needs their
    probabilities).
    """

    def __init__(self, dim: int, num_heads: int = 8, depth: int = 12, *, local_ratio: float = 0.1,
                 glca_input: str = "parallel", use_glca: bool = True, use_pwca: bool = True,
                 residual_weight: float = 0.5, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, drop: float = 0.0, act: str = "gelu",
                 norm_layer: type[nn.Module] = nn.LayerNorm, backend: str | None = None):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"DCALTransformer: depth must be a positive int, got {depth!r}")
        if not (isinstance(local_ratio, (int, float)) and not isinstance(local_ratio, bool)
                and 0.0 < local_ratio <= 1.0):
            raise ValueError(f"DCALTransformer: local_ratio must be a number in (0, 1], got {local_ratio!r}")
        if glca_input not in GLCA_INPUTS:
            raise ValueError(f"DCALTransformer: glca_input must be one of {GLCA_INPUTS}, got {glca_input!r}")
        for arg, value in (("use_glca", use_glca), ("use_pwca", use_pwca)):
            if not isinstance(value, bool):
                raise TypeError(f"DCALTransformer: {arg} must be a bool, got {type(value).__name__}")
        block = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn_drop=attn_drop, drop=drop, act=act,
                     norm_layer=norm_layer, backend=backend)
        self.dim, self.depth = dim, depth
        self.local_ratio, self.glca_input, self.residual_weight = float(local_ratio), glca_input, residual_weight
        self.use_glca, self.use_pwca = use_glca, use_pwca
        self.blocks = nn.ModuleList(DCALBlock(dim, num_heads, **block) for _ in range(depth))
        self.norm = norm_layer(dim)
        self.glca = GLCABlock(dim, num_heads, **block) if use_glca else None
        self.glca_norm = norm_layer(dim) if use_glca else None

    def _check_pair(self, pair: Tensor, B: int) -> Tensor:
        if not isinstance(pair, Tensor) or pair.dtype not in (torch.int64, torch.int32) or tuple(pair.shape) != (B,):
            got = f"{tuple(pair.shape)} {pair.dtype}" if isinstance(pair, Tensor) else type(pair).__name__
            raise ValueError(f"DCALTransformer: pair must be a (B,) = ({B},) integer tensor of partner indices, got {got}")
        if B and (pair.min() < 0 or pair.max() >= B):
            raise ValueError(f"DCALTransformer: pair indices must lie in [0, {B}), got "
                             f"[{int(pair.min())}, {int(pair.max())}]")
        return pair.long()

    def forward(self, x: Tensor, *, pair: Tensor | None = None, run_pwca: bool | None = None) -> DCALOutput:
        """run_pwca: None = with use_pwca, in training mode or when `pair` is given; True / False force it."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"DCALTransformer: expected tokens (B, N, C={self.dim}) with the CLS token first, got {got}")
        B, N, _ = x.shape
        if self.use_glca and N < 2:
            raise ValueError(f"DCALTransformer: GLCA needs the CLS token and at least one patch token, got N={N}")

        # SA branch (and the probabilities for the rollout).
        h, probs, before_last = x, [], x
        for i, block in enumerate(self.blocks):
            if i == self.depth - 1:
                before_last = h                                            # the last block's input (Q_L's tokens)
            if self.use_glca:
                h, p = block(h, return_probs=True)
                probs.append(p.detach())
            else:
                h = block(h)
        sa = self.norm(h)

        # GLCA branch: top-R local queries by the CLS row of the rollout, against all tokens.
        glca = local_index = rollout = None
        if self.use_glca:
            with torch.no_grad():
                rollout = attention_rollout(probs, residual_weight=self.residual_weight)   # (B, N, N)
            tokens = before_last if self.glca_input == "parallel" else h
            local, local_index = select_local_queries(tokens, rollout, num_local_queries(N - 1, self.local_ratio))
            glca = self.glca_norm(self.glca(local, tokens))                 # (B, 1 + R, C)

        # PWCA branch: the same blocks, each image's queries over its own and its partner's keys.
        pwca = None
        if run_pwca is None:
            run_pwca = self.use_pwca and (self.training or pair is not None)
        if run_pwca and not self.use_pwca:
            raise ValueError("DCALTransformer: run_pwca=True asked of a model built with use_pwca=False")
        if run_pwca:
            pair = random_pairs(B, device=x.device) if pair is None else self._check_pair(pair, B)
            hp = x
            for block in self.blocks:
                hp = block.forward_pair(hp, hp[pair])
            pwca = self.norm(hp)
        return DCALOutput(sa, glca, pwca, local_index, rollout)


# --- the classifier and the loss -------------------------------------------------------------------

class UncertaintyWeightedLoss(nn.Module):
    """L = 1/2 sum_i (exp(-w_i) L_i + w_i), w_i learnable (init 0): the dynamic loss weights of
    Kendall et al. 2018 in FairMOT's form, which DCAL follows. forward(*losses): scalar losses,
    None for a branch that did not run (its term is left out)."""

    def __init__(self, num_losses: int):
        super().__init__()
        if isinstance(num_losses, bool) or not isinstance(num_losses, int) or num_losses < 1:
            raise ValueError(f"UncertaintyWeightedLoss: num_losses must be a positive int, got {num_losses!r}")
        self.log_vars = nn.Parameter(torch.zeros(num_losses))

    def forward(self, *losses: Tensor | None) -> Tensor:
        if len(losses) != self.log_vars.numel():
            raise ValueError(f"UncertaintyWeightedLoss: expected {self.log_vars.numel()} losses (None for one "
                             f"that did not run), got {len(losses)}")
        terms = []
        for w, loss in zip(self.log_vars, losses):
            if loss is None:
                continue
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError(f"UncertaintyWeightedLoss: each loss must be a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
            terms.append(torch.exp(-w) * loss.reshape(()) + w)
        if not terms:
            raise ValueError("UncertaintyWeightedLoss: every loss is None")
        return 0.5 * torch.stack(terms).sum()


class DCALClassifier(nn.Module):
    """Patch features (B, N, in_dim) -> DCAL logits: {"sa", "glca", "pwca"} (B, num_classes) each.

    A Linear patch embedding, a learned CLS token and position embeddings (N(0, 0.02), as ViT),
    DCALTransformer, `head` for SA and PWCA, `glca_head` for GLCA. `loss` is the uncertainty-
    weighted sum of the branches' cross-entropies (same target for all three); `predict` adds
    the SA and GLCA class probabilities (the paper's FGVC inference).
    """

    BRANCHES = ("sa", "glca", "pwca")

    def __init__(self, num_classes: int, dim: int, num_heads: int = 8, depth: int = 12, *, in_dim: int,
                 max_len: int = 1024, **transformer_options):
        super().__init__()
        for arg, value in (("num_classes", num_classes), ("in_dim", in_dim), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DCALClassifier: {arg} must be a positive int, got {value!r}")
        self.in_dim, self.max_len = in_dim, max_len
        self.embed = nn.Linear(in_dim, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, max_len + 1, dim))
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.transformer = DCALTransformer(dim, num_heads, depth, **transformer_options)
        self.head = nn.Linear(dim, num_classes)
        self.glca_head = nn.Linear(dim, num_classes) if self.transformer.use_glca else None
        self.loss_weights = UncertaintyWeightedLoss(len(self.BRANCHES))

    def features(self, inputs: Tensor, *, pair: Tensor | None = None, run_pwca: bool | None = None) -> DCALOutput:
        if not isinstance(inputs, Tensor) or inputs.dim() != 3 or inputs.shape[-1] != self.in_dim:
            got = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
            raise ValueError(f"DCALClassifier: expected patch features (B, N, {self.in_dim}), got {got}")
        B, N, _ = inputs.shape
        if N > self.max_len:
            raise ValueError(f"DCALClassifier: {N} patches exceed max_len={self.max_len}")
        x = self.embed(inputs)                                              # (B, N, C)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed[:, :N + 1]  # (B, 1 + N, C)
        return self.transformer(x, pair=pair, run_pwca=run_pwca)

    def forward(self, inputs: Tensor, *, pair: Tensor | None = None,
                run_pwca: bool | None = None) -> dict[str, Tensor | None]:
        out = self.features(inputs, pair=pair, run_pwca=run_pwca)
        return {"sa": self.head(out.sa[:, 0]),
                "glca": None if out.glca is None else self.glca_head(out.glca[:, 0]),
                "pwca": None if out.pwca is None else self.head(out.pwca[:, 0])}

    def loss(self, logits: dict[str, Tensor | None], targets: Tensor) -> tuple[Tensor, dict[str, float]]:
        parts = {k: None if logits.get(k) is None else F.cross_entropy(logits[k].float(), targets)
                 for k in self.BRANCHES}
        total = self.loss_weights(*(parts[k] for k in self.BRANCHES))
        return total, {k: float(v.detach()) for k, v in parts.items() if v is not None}

    @torch.no_grad()
    def predict(self, inputs: Tensor) -> Tensor:
        """Class probabilities (B, num_classes): softmax(SA) + softmax(GLCA) (SA alone without GLCA)."""
        logits = self(inputs, run_pwca=False)
        probs = logits["sa"].float().softmax(-1)
        if logits["glca"] is not None:
            probs = probs + logits["glca"].float().softmax(-1)
        return probs
