"""Edge-MoE / M3ViT: a multi-task ViT whose odd blocks are task-gated mixture-of-experts MLPs.

Papers: M3ViT: Mixture-of-Experts Vision Transformer for Efficient Multi-task Learning with
Model-Accelerator Co-design (Liang, Fan, Sarkar, Jiang, Chen, Wang, Hao; NeurIPS 2022,
arXiv 2210.14793) and Edge-MoE: Memory-Efficient Multi-Task Vision Transformer Architecture with
Task-level Sparsity via Mixture-of-Experts (Sarkar, Liang, Fan, Wang, Hao; ICCAD 2023,
arXiv 2305.18691).
Official code: github.com/VITA-Group/M3ViT (PyTorch + FastMoE: `models/vision_transformer_moe.py`,
`models/custom_moe_layer.py`, `models/gate_funs/noisy_gate.py`, `utils/moe_utils.py`,
`train_fastmoe.py`) and github.com/sharc-lab/Edge-MoE (HLS C++: `include/model.hpp`,
`src/moe.cpp`). Both were read to get the network right; nothing is copied.
Status: the network, its task-conditioned noisy top-k gate and balance loss, the per-expert token
queues and Edge-MoE's numerics are implemented; the decoder heads and sizes are ours (below).

What is the official code's
---------------------------
- Which blocks are MoE: block i is an MoE block when i is odd (`i % 2 == 1`), the even ones keep
  the dense MLP (M3ViT `VisionTransformerMoE.__init__`). Pre-norm blocks, qkv bias on.
- Experts: E two-layer GELU MLPs of hidden `expert_ratio * dim`; M3ViT's configs use
  `moe_mlp_ratio: 2` beside `mlp_ratio: 4` for the dense blocks, and Edge-MoE's `model.hpp` has
  FEATURE_DIM 192, VIT_HIDDEN_DIM 768, EXPERT_HIDDEN_DIM 384, NUM_EXPERTS 16,
  NUM_SELECTED_EXPERTS 2: with top-2, the active expert FLOPs equal one dense MLP's.
- Task-level gating: `multi_gate=True` gives every task its own gate (`nn.ModuleList` of gates
  indexed by `task_id`); M3ViT trains "one by one": a forward per task on the same images,
  each task's loss backpropagated, one optimizer step (`train/train_utils.py`, `--one_by_one`).
- The gate (`NoisyGate`, Shazeer et al.'s noisy top-k): for tokens x (T, C),
      clean = x W_g,   std = (softplus(x W_n) + 1e-2) * training,   logits = clean + N(0, 1) * std
      top-(k+1) of logits;  weights = softmax(the top-k logits)  (renormalised over the k chosen)
      importance = sum over tokens of the (T, E) sparse gate matrix
      load = sum over tokens of P(expert in top-k under fresh noise)   (training, k < E)
           = Phi((clean - threshold) / std), threshold = the (k+1)-th logit if the expert is in the
             top k, else the k-th                                         (`_prob_in_top_k`)
      balance loss = cv^2(importance) + cv^2(load),  cv^2(v) = var(v) / (mean(v)^2 + 1e-10)
  with an unbiased var, 0 in eval; W_g, W_n have no bias, kaiming-uniform init. The losses of
  every gate are summed and weighted by `--moe_noisy_gate_loss_weight`, default 0.01
  (`collect_noisy_gating_loss`).
- Dispatch (Edge-MoE `src/moe.cpp` `write_gate_results`): every token's top-k (expert, score)
  pairs are appended to per-expert queues, then a meta-queue lists the experts with a non-empty
  queue and each of those experts' weights is loaded once per layer and run over its queue; the
  outputs are accumulated back into the token rows weighted by the scores. `TaskMoE` does the
  same (gather the queue's tokens, run the expert once, `index_add_` the weighted rows back);
  `dispatch="dense"` is the reference that runs every expert on every token and weights by the
  sparse gate matrix (identical result; tests check it, gradients included).
- Numerics: Edge-MoE's single-pass softmax and table GELU (`attnlab.ops.numerics`, from
  `src/attention.cpp`, `src/gelu.cpp`); `numerics="edgemoe"` runs both (attention through mhsa's
  `softmax="edgemoe"`, every MLP/expert GELU through `edgemoe_gelu`), `numerics="exact"` torch's.

What is ours
------------
- Sizes for a CPU (dim ~96, 6 blocks, 28x28 inputs with patch 4, E and k as options); learned
  absolute positions, no class token (dense tasks only).
- The decoders: a final LayerNorm and, per task, one Linear from each token to its p x p
  pixels' outputs (a "linear patch-to-pixels" head): (B, N, C) -> (B, out, H, W). M3ViT uses
  a convolutional up-sampling head (`VisionTransformerUpHead`) per task.
- The dense baselines: the same class with `num_experts=0` (every block dense, `mlp_ratio` free).
- The task-level gate is applied per forward: `forward(images, task)` routes every token
  through `gates[task]`; a batch runs one task at a time.
- The counters: `flops(task)` counts the matmul FLOPs of one task's eval forward (2 per
  multiply-add, patch embed + attention + MLPs/experts + gates + that task's head; norms,
  softmax and GELU not counted), checked in the tests against torch's FlopCounterMode;
  `usage()` holds the tokens routed to each expert per task and layer, and the number of
  distinct experts each image loads per layer (what Edge-MoE must fetch per image).
- The balance loss is kept on the model (`balance_loss`, the sum over MoE blocks of the last
  forward) rather than added by the training loop: the task adds `balance_weight *` it per task pass.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.ops.numerics import edgemoe_gelu, exact_gelu
from attnlab.models.transformer import parse_layer
from attnlab.registry import create, get_spec

NUMERICS = ("exact", "edgemoe")
DISPATCHES = ("queues", "dense")
NOISE_EPSILON = 1e-2            # NoisyGate.noise_epsilon
BALANCE_WEIGHT = 0.01           # train_fastmoe.py --moe_noisy_gate_loss_weight


def _check_numerics(where: str, numerics) -> None:
    if numerics not in NUMERICS:
        raise ValueError(f"{where}: numerics must be one of {NUMERICS}, got {numerics!r}")


def _positive_int(where: str, name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{where}: {name} must be an int >= {low}, got {value!r}")
    return value


class Gelu(nn.Module):
    """GELU whose arithmetic is switchable: numerics "exact" (erf) or "edgemoe" (ReLU minus table)."""

    def __init__(self, numerics: str = "exact"):
        super().__init__()
        _check_numerics("Gelu", numerics)
        self.numerics = numerics

    def forward(self, x: Tensor) -> Tensor:
        return edgemoe_gelu(x) if self.numerics == "edgemoe" else exact_gelu(x)   # fixed point, as in hardware

    def extra_repr(self) -> str:
        return f"numerics={self.numerics!r}"


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear: (..., C) -> (..., C). One dense MLP, or one expert."""

    def __init__(self, dim: int, hidden_dim: int, *, numerics: str = "exact"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = Gelu(numerics)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation var(x) / (mean(x)^2 + 1e-10), unbiased var; 0 for one element."""
    x = x if x.is_floating_point() else x.float()        # loads may be counts
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


class TaskGate(nn.Module):
    """One task's noisy top-k gate (M3ViT's NoisyGate): tokens (T, C) -> indices (T, k), weights (T, k), loss.

    Noise is added in training only (`noisy=True`, the official default); the balance loss
    cv^2(importance) + cv^2(load) is computed in training only, 0 in eval, as in the official code.
    """

    def __init__(self, dim: int, num_experts: int, *, top_k: int = 2, noisy: bool = True):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"TaskGate: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.noisy = num_experts, top_k, noisy
        # x W_g and x W_n without bias (NoisyGate: w_gate, w_noise (C, E)); Linear's init is theirs.
        self.w_gate = nn.Linear(dim, num_experts, bias=False)
        self.w_noise = nn.Linear(dim, num_experts, bias=False) if noisy else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        T, E, k = x.shape[0], self.num_experts, self.top_k
        clean = self.w_gate(x)                                            # (T, E)
        noisy_run = self.training and self.noisy
        if noisy_run:
            std = F.softplus(self.w_noise(x)) + NOISE_EPSILON             # (T, E)
            logits = clean + torch.randn_like(clean) * std
        else:
            std, logits = None, clean
        top_logits, top_indices = logits.topk(min(k + 1, E), dim=-1)      # (T, k+1) (or (T, E) when k == E)
        indices = top_indices[:, :k]                                      # (T, k)
        weights = torch.softmax(top_logits[:, :k], dim=-1)                # (T, k), renormalised over the k
        loss = clean.new_zeros(())
        if self.training and T > 0:
            gates = torch.zeros_like(logits).scatter(1, indices, weights)  # (T, E) sparse gate matrix
            importance = gates.sum(0)                                     # (E,)
            if noisy_run and k < E:
                threshold_in = top_logits[:, k:k + 1]                     # (T, 1): the (k+1)-th logit
                threshold_out = top_logits[:, k - 1:k]                    # (T, 1): the k-th logit
                is_in = logits > threshold_in
                normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
                prob = torch.where(is_in, normal.cdf((clean - threshold_in) / std),
                                   normal.cdf((clean - threshold_out) / std))   # (T, E)
                load = prob.sum(0)
            else:
                load = (gates > 0).sum(0)
            loss = cv_squared(importance) + cv_squared(load)
        return indices, weights, loss


class TaskMoE(nn.Module):
    """Task-gated mixture of `num_experts` FeedForward experts, top-k per token: (B, N, C) -> (B, N, C).

    `forward(x, task)` routes through `gates[task]`; `dispatch="queues"` (default) runs each
    expert once on its queue of tokens, `dispatch="dense"` every expert on every token (reference).
    After a forward: `balance_loss` (scalar), `last_indices` (B, N, k) the chosen experts.
    """

    def __init__(self, dim: int, hidden_dim: int, *, num_experts: int, num_tasks: int, top_k: int = 2,
                 noisy: bool = True, numerics: str = "exact"):
        super().__init__()
        _positive_int("TaskMoE", "num_experts", num_experts)
        _positive_int("TaskMoE", "num_tasks", num_tasks)
        _positive_int("TaskMoE", "top_k", top_k)
        self.dim, self.hidden_dim, self.num_experts, self.top_k = dim, hidden_dim, num_experts, top_k
        self.experts = nn.ModuleList(FeedForward(dim, hidden_dim, numerics=numerics) for _ in range(num_experts))
        self.gates = nn.ModuleList(TaskGate(dim, num_experts, top_k=top_k, noisy=noisy) for _ in range(num_tasks))
        self.balance_loss: Tensor | None = None
        self.last_indices: Tensor | None = None

    def route(self, x: Tensor, task: int) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens (T, C) -> (indices (T, k), weights (T, k), balance loss) from task `task`'s gate."""
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(self.gates):
            raise ValueError(f"TaskMoE: task must be an int in [0, {len(self.gates)}), got {task!r}")
        return self.gates[task](x)

    def combine(self, x: Tensor, indices: Tensor, weights: Tensor, dispatch: str = "queues") -> Tensor:
        """Tokens (T, C), their experts (T, k) and weights (T, k) -> sum_j weights[:, j] * expert_{indices[:, j]}(x)."""
        T, C = x.shape
        if dispatch == "queues":
            out = x.new_zeros(T, C)
            flat_expert = indices.reshape(-1)                                        # (T k,)
            flat_token = torch.arange(T, device=x.device).repeat_interleave(self.top_k)   # (T k,)
            flat_weight = weights.reshape(-1)                                        # (T k,)
            order = torch.argsort(flat_expert, stable=True)                          # queue order
            counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
            start = 0
            for e, n in enumerate(counts):
                if n == 0:
                    continue                      # an empty queue: the expert is never loaded
                slots = order[start:start + n]                                       # (n,) this expert's queue
                start += n
                rows = flat_token[slots]                                             # (n,) token rows
                y = self.experts[e](x[rows]) * flat_weight[slots, None]              # (n, C)
                out = out.index_add(0, rows, y)
            return out
        if dispatch == "dense":
            gates = x.new_zeros(T, self.num_experts).scatter(1, indices, weights)   # (T, E), k non-zeros a row
            out = x.new_zeros(T, C)
            for e, expert in enumerate(self.experts):
                out = out + gates[:, e:e + 1] * expert(x)                            # every expert, every token
            return out
        raise ValueError(f"TaskMoE: dispatch must be one of {DISPATCHES}, got {dispatch!r}")

    def forward(self, x: Tensor, task: int, *, dispatch: str = "queues") -> Tensor:
        B, N, C = x.shape
        tokens = x.reshape(B * N, C)                                                 # (T, C), T = B N
        indices, weights, loss = self.route(tokens, task)
        self.balance_loss = loss
        self.last_indices = indices.detach().reshape(B, N, self.top_k)               # (B, N, k)
        return self.combine(tokens, indices, weights, dispatch).reshape(B, N, C)     # (B, N, C)


class EdgeMoEBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)) with a dense MLP or a TaskMoE."""

    def __init__(self, dim: int, num_heads: int, *, mechanism="mhsa", grid: tuple[int, int],
                 mlp_ratio: float = 4.0, moe: dict | None = None, numerics: str = "exact"):
        super().__init__()
        name, options = parse_layer(mechanism)
        spec = get_spec(name)
        if spec.layout not in ("seq", "2d"):
            raise ValueError(f"EdgeMoEBlock: needs a sequence or 2-D mechanism (layout 'seq' or '2d'), "
                             f"{name!r} has layout {spec.layout!r}")
        if name == "mhsa":
            options.setdefault("qkv_bias", True)                    # M3ViT: qkv_bias=True
        if numerics == "edgemoe":
            if name != "mhsa" and "softmax" not in options:
                raise NotImplementedError(f"EdgeMoEBlock: numerics='edgemoe' swaps the attention softmax, which "
                                          f"only mechanism 'mhsa' (softmax=) supports here; got mechanism {name!r}")
            options.setdefault("softmax", "edgemoe")
        self.mechanism, self.layout, self.grid = name, spec.layout, grid
        self.norm1 = nn.LayerNorm(dim)
        self.attn = create(name, dim, num_heads, **options)
        self.norm2 = nn.LayerNorm(dim)
        if moe is None:
            self.mlp = FeedForward(dim, int(dim * mlp_ratio), numerics=numerics)
        else:
            self.mlp = TaskMoE(dim, numerics=numerics, **moe)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, TaskMoE)

    def forward(self, x: Tensor, task: int, *, dispatch: str = "queues") -> Tensor:
        B, N, C = x.shape
        h = self.norm1(x)
        if self.layout == "2d":
            H, W = self.grid
            h = self.attn(h.reshape(B, H, W, C)).reshape(B, N, C)       # (B, H, W, C) -> (B, N, C)
        else:
            h = self.attn(h)
        x = x + h
        h = self.norm2(x)
        x = x + (self.mlp(h, task, dispatch=dispatch) if self.is_moe else self.mlp(h))
        return x


class EdgeMoEViT(nn.Module):
    """Multi-task ViT for dense prediction: images (B, H, W) or (B, 1, H, W) and a task -> (B, out_task, H, W).

    tasks: {name: output channels}, e.g. {"seg": 11, "depth": 1}. `layers`: one mechanism per block
    (an int = that many "mhsa"). Block i is a TaskMoE block when i is odd and num_experts > 0
    (a single block is then MoE itself; num_experts=0: a dense ViT, the baselines). numerics: "exact" | "edgemoe" for every
    attention softmax and GELU (`set_numerics` switches a trained model).
    """

    def __init__(self, tasks: dict[str, int], dim: int = 96, num_heads: int = 4,
                 layers: int | Sequence = 6, *, img_size: int = 28, patch: int = 4, in_chans: int = 1,
                 mlp_ratio: float = 4.0, num_experts: int = 16, top_k: int = 2, expert_ratio: float = 2.0,
                 noisy: bool = True, numerics: str = "exact"):
        super().__init__()
        if not isinstance(tasks, dict) or not tasks or any(
                not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 1 for k, v in tasks.items()):
            raise ValueError(f"EdgeMoEViT: tasks must be a non-empty dict {{name: output channels >= 1}}, got {tasks!r}")
        _positive_int("EdgeMoEViT", "dim", dim)
        _positive_int("EdgeMoEViT", "patch", patch)
        _positive_int("EdgeMoEViT", "in_chans", in_chans)
        _positive_int("EdgeMoEViT", "num_experts", num_experts, 0)
        _check_numerics("EdgeMoEViT", numerics)
        if img_size % patch:
            raise ValueError(f"EdgeMoEViT: patch={patch} must divide img_size={img_size}")
        if isinstance(layers, int) and not isinstance(layers, bool):
            layers = ["mhsa"] * layers
        layers = list(layers)
        if not layers:
            raise ValueError("EdgeMoEViT: needs at least one layer, got an empty list")
        if not mlp_ratio > 0 or not expert_ratio > 0:
            raise ValueError(f"EdgeMoEViT: mlp_ratio and expert_ratio must be > 0, got {mlp_ratio}, {expert_ratio}")
        self.task_names = list(tasks)
        self.task_channels = dict(tasks)
        self.dim, self.num_heads, self.patch, self.img_size, self.in_chans = dim, num_heads, patch, img_size, in_chans
        self.grid = (img_size // patch, img_size // patch)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.mlp_hidden = int(dim * mlp_ratio)
        self.expert_hidden = int(dim * expert_ratio)
        self.num_experts, self.top_k = num_experts, top_k
        self.numerics = numerics
        moe = dict(hidden_dim=self.expert_hidden, num_experts=num_experts, num_tasks=len(tasks), top_k=top_k,
                   noisy=noisy) if num_experts > 0 else None
        self.patch_embed = nn.Linear(in_chans * patch * patch, dim)     # = Conv2d(k=p, stride=p) on patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        # M3ViT: block i is MoE when i is odd; a one-block model (ours) makes its only block MoE.
        moe_at = {i for i in range(len(layers)) if i % 2 == 1} or {0}
        self.blocks = nn.ModuleList(
            EdgeMoEBlock(dim, num_heads, mechanism=layer, grid=self.grid, mlp_ratio=mlp_ratio,
                         moe=moe if i in moe_at else None, numerics=numerics)
            for i, layer in enumerate(layers))
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleDict({name: nn.Linear(dim, out * patch * patch) for name, out in tasks.items()})
        self.balance_loss: Tensor | None = None
        self.reset_usage()

    # -- tasks, numerics, counters ------------------------------------------------------------
    def task_index(self, task) -> int:
        if isinstance(task, str):
            if task not in self.task_channels:
                raise ValueError(f"EdgeMoEViT: unknown task {task!r}; expected one of {self.task_names}")
            return self.task_names.index(task)
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(self.task_names):
            raise ValueError(f"EdgeMoEViT: task must be a name in {self.task_names} or an index in "
                             f"[0, {len(self.task_names)}), got {task!r}")
        return task

    @property
    def moe_blocks(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if b.is_moe]

    def set_numerics(self, numerics: str) -> None:
        """Switch every attention softmax (mhsa) and every GELU to `numerics` ("exact" | "edgemoe")."""
        _check_numerics("EdgeMoEViT.set_numerics", numerics)
        for block in self.blocks:
            if block.mechanism != "mhsa" and numerics == "edgemoe":
                raise NotImplementedError(f"EdgeMoEViT.set_numerics: mechanism {block.mechanism!r} has no "
                                          "switchable softmax (only mhsa)")
            if block.mechanism == "mhsa":
                block.attn.softmax = numerics
        for module in self.modules():
            if isinstance(module, Gelu):
                module.numerics = numerics
        self.numerics = numerics

    def reset_usage(self) -> None:
        """Zero the expert-usage counters: tokens[task] (L_moe, E), images[task], experts_per_image[task] (L_moe,)."""
        L = len(self.moe_blocks)
        T, E = len(self.task_names), max(self.num_experts, 1)
        self._tokens = torch.zeros(T, L, E, dtype=torch.long)
        self._loaded = torch.zeros(T, L, dtype=torch.long)      # sum over images of distinct experts used
        self._images = torch.zeros(T, dtype=torch.long)

    def usage(self) -> dict:
        """{"tokens": (tasks, moe layers, E) routed token-slots, "experts_per_image": (tasks, moe layers)
        mean distinct experts an image loads, "images": (tasks,)} since the last reset_usage()."""
        images = self._images.clamp_min(1).to(torch.float64)
        return {"tokens": self._tokens.clone(), "experts_per_image": self._loaded.to(torch.float64) / images[:, None],
                "images": self._images.clone(), "tasks": list(self.task_names), "moe_blocks": self.moe_blocks}

    def _record_usage(self, task: int) -> None:
        for j, i in enumerate(self.moe_blocks):
            idx = self.blocks[i].mlp.last_indices.cpu()                          # (B, N, k)
            B = idx.shape[0]
            self._tokens[task, j] += torch.bincount(idx.reshape(-1), minlength=self.num_experts)
            hit = torch.zeros(B, self.num_experts, dtype=torch.bool)
            hit.scatter_(1, idx.reshape(B, -1), True)                           # (B, E) experts each image uses
            self._loaded[task, j] += hit.sum()
        if self.moe_blocks:
            self._images[task] += self.blocks[self.moe_blocks[0]].mlp.last_indices.shape[0]

    def flops(self, task=0) -> dict[str, int]:
        """Matmul FLOPs (2 per multiply-add) of one image's eval forward for `task`, by part, and "total".

        Analytic: every token runs exactly top_k experts, so the expert FLOPs do not depend on the
        routing. Attention is counted for mhsa (qkv, q k^T, probs v, proj); other mechanisms raise.
        """
        t = self.task_index(task)
        N, C, p = self.num_tokens, self.dim, self.patch
        parts = {"patch_embed": 2 * N * self.in_chans * p * p * C, "attention": 0, "mlp": 0, "experts": 0,
                 "gates": 0, "head": 2 * N * C * self.task_channels[self.task_names[t]] * p * p}
        for block in self.blocks:
            if block.mechanism != "mhsa":
                raise NotImplementedError(f"EdgeMoEViT.flops: counts mhsa attention only, got {block.mechanism!r}")
            attn = block.attn
            qkv_out = attn.qkv.out_features
            parts["attention"] += 2 * N * C * qkv_out + 2 * 2 * N * N * C + 2 * N * C * C
            if block.is_moe:
                parts["experts"] += N * self.top_k * 2 * (2 * C * self.expert_hidden)
                parts["gates"] += 2 * N * C * self.num_experts
            else:
                parts["mlp"] += 2 * (2 * N * C * self.mlp_hidden)
        parts["total"] = sum(parts.values())
        return parts

    # -- forward ------------------------------------------------------------------------------
    def patchify(self, images: Tensor) -> Tensor:
        """(B, H, W) or (B, c, H, W) -> patch rows (B, N, c p p)."""
        if images.dim() == 3:
            images = images[:, None]                                              # (B, 1, H, W)
        if images.dim() != 4 or images.shape[1:] != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(f"EdgeMoEViT: expected images (B, {self.img_size}, {self.img_size}) or "
                             f"(B, {self.in_chans}, {self.img_size}, {self.img_size}), got {tuple(images.shape)}")
        B, c, H, W = images.shape
        p, (gh, gw) = self.patch, self.grid
        x = images.reshape(B, c, gh, p, gw, p)                                   # (B, c, gh, p, gw, p)
        x = x.permute(0, 2, 4, 1, 3, 5)                                           # (B, gh, gw, c, p, p)
        return x.reshape(B, gh * gw, c * p * p)                                   # (B, N, c p p)

    def unpatchify(self, y: Tensor, out: int) -> Tensor:
        """Per-token pixel outputs (B, N, out p p) -> (B, out, H, W)."""
        B = y.shape[0]
        p, (gh, gw) = self.patch, self.grid
        y = y.reshape(B, gh, gw, out, p, p)                                       # (B, gh, gw, out, p, p)
        y = y.permute(0, 3, 1, 4, 2, 5)                                           # (B, out, gh, p, gw, p)
        return y.reshape(B, out, gh * p, gw * p)                                  # (B, out, H, W)

    def _prefix(self, images: Tensor) -> Tensor:
        """Embedding and the blocks before the first MoE block (task-independent): (B, N, C)."""
        x = self.patch_embed(self.patchify(images).to(self.pos_embed.dtype)) + self.pos_embed   # (B, N, C)
        for block in self.blocks[:self._shared]:
            x = block(x, 0)
        return x

    def _suffix(self, x: Tensor, task: int, dispatch: str) -> Tensor:
        """The blocks from the first MoE block on, for `task`, then the final norm: (B, N, C) -> (B, N, C)."""
        for block in self.blocks[self._shared:]:
            x = block(x, task, dispatch=dispatch)
        moe = [self.blocks[i].mlp.balance_loss for i in self.moe_blocks]
        self.balance_loss = torch.stack(moe).sum() if moe else x.new_zeros(())
        if self.moe_blocks and not self.training:
            self._record_usage(task)
        return self.norm(x)

    @property
    def _shared(self) -> int:
        return self.moe_blocks[0] if self.moe_blocks else len(self.blocks)

    def features(self, images: Tensor, task, *, dispatch: str = "queues") -> Tensor:
        """The backbone for `task`: images -> normalised tokens (B, N, C)."""
        return self._suffix(self._prefix(images), self.task_index(task), dispatch)

    def forward(self, images: Tensor, task, *, dispatch: str = "queues") -> Tensor:
        t = self.task_index(task)
        name = self.task_names[t]
        tokens = self.features(images, t, dispatch=dispatch)                      # (B, N, C)
        return self.unpatchify(self.heads[name](tokens), self.task_channels[name])   # (B, out, H, W)

    def forward_all(self, images: Tensor, *, dispatch: str = "queues") -> tuple[dict[str, Tensor], Tensor]:
        """Every task's output and the summed balance loss. The blocks before the first MoE block run
        once for all tasks (they are task-independent); a dense model runs its whole backbone once."""
        shared = self._prefix(images)                                             # (B, N, C)
        outs, losses = {}, []
        for t, name in enumerate(self.task_names):
            if self.moe_blocks or t == 0:
                tokens = self._suffix(shared, t, dispatch)                        # (B, N, C)
                losses.append(self.balance_loss)
            outs[name] = self.unpatchify(self.heads[name](tokens), self.task_channels[name])
        return outs, torch.stack(losses).sum()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["EdgeMoEViT", "EdgeMoEBlock", "TaskMoE", "TaskGate", "FeedForward", "Gelu", "cv_squared",
           "count_params", "NUMERICS", "DISPATCHES", "BALANCE_WEIGHT"]
