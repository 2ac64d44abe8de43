"""Flux Attention: a learned per-layer router that sends each layer, per prompt, to full or sparse
attention, trained against a budget with a Lagrangian.

Paper: Qiu, Hong, Yang, Wang, Liu, Dang, Li & Zhang, "Flux Attention: Context-Aware Hybrid
Attention for Efficient LLMs Inference" (2026, arXiv 2604.07394). Official code:
qqtang-code/FluxAttention @031f22f7 (read, not copied): `fluxattn/training/modeling_flash_llama.py`
(`AttentionRouter`, `LlamaAttention.interpolated_attention`, the sparsity loss), `lh_trainer.py`
(`get_current_tau`, the lambda optimizer group), `run_scripts/qwen_parallel.sh`,
`training/eval/modeling_flash_llama.py` (inference). Built on attnlab.probes.fastlm: a router's
decision is written into the fastlm `Plan` as `Full()` or the sparse rule.

    LayerRouter(head_dim)      one per layer, the official two-stage MLP: feature Linear(D, 8D) -
                               SiLU - Linear(8D, 2D); head Linear(2D, 4D) - SiLU - Linear(4D, D) -
                               SiLU - Linear(D, 2). The last layer's weight is 0 and its bias
                               [0, 4.5], so every layer starts at full attention (class 1 = FA).
    pool_queries(q, pool)      the router's input: the layer's pre-RoPE query states (B, N, Hq, D)
                               averaged over the first `pool` and the last `pool` tokens, then over
                               the heads -> (B, D). pool = 150 as in the code (`pool_size`).
    FluxRouting(model, routers, sparse=Streaming(64, 256))
                               inference: a forward hook on every attention layer's `q_proj` (it
                               runs before that layer's attention) routes the layer at prefill
                               (argmax, no noise) and writes Full() or `sparse` into
                               `plan.rules[layer]`; decode steps keep the decision (the official
                               code routes once at prefill and stores z in the layer's cache; the
                               cache is not truncated). `.decisions`, `.sparse_fraction`.
    MixRule(sparse)            the training rule: out = z * FA(q, k, v) + (1 - z) * SA(q, k, v)
                               with the layer's straight-through gate z (B,), both attentions
                               computed (official `interpolated_attention`).
    train(model, tokenizer_or_ids, target, steps, seq_len)
                               Gumbel-softmax with hard straight-through (z = hard + soft -
                               soft.detach(), the FA component), tau cosine 1.5 -> 1.0 over the
                               first 60% of the steps then 1.0; loss = next-token cross-entropy +
                               lambda1 |s - t| + lambda2 (s - t)^2, s = the fraction of layers routed
                               sparse (per sample, then averaged over the batch); lambda1, lambda2
                               start at 0 and take gradient ASCENT (AdamW, maximize=True, lr 1e-3);
                               routers AdamW lr 5e-4, betas (0.9, 0.95), weight decay 0.1; warmup
                               20% then cosine (the script's schedule, applied to both groups as a
                               HF Trainer scheduler does).
    save_routers / load_routers
                               safetensors (loading never unpickles) + a JSON sidecar (config).
    evaluate / sweep           all-full vs all-sparse vs the trained routing through
                               fastlm.run_once: prefill s, decode s/token, continuation NLL,
                               greedy agreement with all-full; rows as a list of dicts.

Data: tinyshakespeare (attnlab.probes.inputs.read_text()); the first 90% of its characters are
the training split, the last 10% the evaluation split (`split_text`); training never reads the
evaluation text.

Deviations from the released code, all deliberate:
- The base model is frozen (the issue asks for it, and the paper says "frozen LLM"); the official
  script has freeze_weights=false and also trains q/k/v_proj (lr 1e-5).
- Sparse attention: fastlm.Streaming(sink=64, window=256) by default (a parameter), because the
  SmolLM2 contexts here are 512-2048 tokens; the official default is block-streaming with a
  128-token sink and a 2048-token local window. Like the official kernel, fastlm's prefill is
  block-granular (64-token blocks; the official blocks are 128); its decode is token-exact.
- Pooling: the official code pools the context+question span given by the data's `range_ids`
  (training) or the whole prompt (inference). Our training data are plain LM windows, so the span
  is the whole window (the router sees the window's last tokens, whose next-token loss it also
  influences: a mild leak the official prompt/answer split avoids). Prompts shorter than 2 * pool
  are averaged over all their tokens (the official slices would overlap or wrap).
- One task: lambda1 and lambda2 are scalars (the code keeps one pair per task, 5 tasks) and the
  target t is one number from step 0 (the code's warmup ratio is 0 too).
- The loss is the mean next-token cross-entropy over all positions of each window (the official
  SFT loss is over answer tokens, token-scaled). No sequence packing, batch of `batch` windows.
- Inference with a batch: the decision is per prompt and the fastlm Plan is per layer, so
  FluxRouting takes one prompt at a time (B = 1) and raises otherwise; training handles B > 1.

- Learning rates: the defaults are the official ones (routers 5e-4, lambdas 1e-3, warmup 20% +
  cosine). At those rates lambda1 grows by about 1e-3 a step (Adam), so over a few dozen steps s
  does not leave 0 (the tiny-model test, and the official run has 300 steps of 48 long
  sequences). Short runs here pass router_lr=5e-3, lambda_lr=0.1, schedule="constant" and say so.

Exactness (tests/probes/test_flux.py): routers at init route every layer to Full and give the
unmodified SDPA model's logits bit for bit (prefill and 5 decode steps); all layers forced sparse
give a fastlm Plan of the sparse rule on every layer bit for bit, and so does any mix of layers;
the training forward at z = 1 (z = 0) gives the all-full (all-sparse) logits bit for bit, because
z = hard + (soft - soft.detach()) is exactly 0 or 1 (the official bracketing; hard + soft -
soft.detach() is not) and 1 * x + 0 * y = x.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.probes import fastlm as fl

FORMAT = "attnlab.probes.flux/routers"
VERSION = 1
FA, SA = 1, 0                                  # router classes: 1 = full attention, 0 = sparse


def default_sparse() -> fl.Rule:
    """The sparse rule for SmolLM2's short contexts: 64 sink tokens + a 256-token window."""
    return fl.Streaming(sink=64, window=256)


# --------------------------------------------------------------------------- the router

class LayerRouter(nn.Module):
    """The official AttentionRouter (use_softmax=true): pooled query (B, D) -> logits (B, 2).

    Class 1 = full attention. Initialised as the official `reset_parameters`: the head's first two
    linears Kaiming-uniform (a = sqrt 5) with zero bias, the last linear's weight 0 and bias [0, 4.5]
    (softmax 0.989 on FA); the feature MLP keeps PyTorch's default init."""

    def __init__(self, head_dim: int):
        super().__init__()
        if int(head_dim) < 1:
            raise ValueError(f"LayerRouter: head_dim must be positive, got {head_dim}")
        D = self.head_dim = int(head_dim)
        self.feature = nn.Sequential(nn.Linear(D, 8 * D), nn.SiLU(), nn.Linear(8 * D, 2 * D))
        self.head = nn.Sequential(nn.Linear(2 * D, 4 * D), nn.SiLU(), nn.Linear(4 * D, D), nn.SiLU(),
                                  nn.Linear(D, 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for i in (0, 2):
            nn.init.kaiming_uniform_(self.head[i].weight, a=math.sqrt(5))
            nn.init.zeros_(self.head[i].bias)
        self.set_constant(full=True)

    @torch.no_grad()
    def set_constant(self, full: bool, margin: float = 4.5) -> "LayerRouter":
        """Route every input the same way: last weight 0, bias [0, margin] (full) or [margin, 0]."""
        last = self.head[4]
        last.weight.zero_()
        last.bias.zero_()
        last.bias[FA if full else SA] = float(margin)
        return self

    def forward(self, pooled: Tensor) -> Tensor:
        if pooled.dim() != 2 or pooled.shape[1] != self.head_dim:
            raise ValueError(f"LayerRouter: expected pooled queries (B, {self.head_dim}), got {tuple(pooled.shape)}")
        return self.head(self.feature(pooled.float()))                            # (B, 2)


def make_routers(model) -> nn.ModuleList:
    """One LayerRouter per attention layer of `model`, at the official init (every layer FA)."""
    mods = fl.attention_modules(model)
    return nn.ModuleList(LayerRouter(_head_dim(mods[0])) for _ in mods)


def _head_dim(attn) -> int:
    d = getattr(attn, "head_dim", None)
    if d is None:
        c = attn.config
        d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return int(d)


def pool_queries(q: Tensor, pool: int = 150) -> Tensor:
    """(B, N, Hq, D) pre-RoPE queries -> (B, D): the mean over the first and the last `pool` tokens
    (both slices together, as the official `_segment_pooling`), then over heads. N < 2 * pool: the
    mean over all N tokens."""
    if q.dim() != 4:
        raise ValueError(f"pool_queries: expected queries (B, N, Hq, D), got {tuple(q.shape)}")
    if int(pool) < 1:
        raise ValueError(f"pool_queries: pool must be positive, got {pool}")
    N = q.shape[1]
    span = q if N < 2 * pool else torch.cat([q[:, :pool], q[:, N - pool:]], 1)   # (B, <=2*pool, Hq, D)
    return span.float().mean(1).mean(1)                                            # (B, D)


def gumbel_gate(logits: Tensor, tau: float, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Hard straight-through Gumbel-softmax on (B, 2) logits: (z, z_soft), each (B,), the FA component.

    z is exactly 0 or 1 in the forward (hard + (soft - soft.detach()), the official bracketing) and has the soft gradient."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device if generator is None else "cpu")
    u = u.to(logits.device)
    eps = 1e-8
    g = -torch.log(-torch.log(u + eps) + eps)
    soft = F.softmax((logits + g) / tau, dim=-1)                                    # (B, 2)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    z = hard + (soft - soft.detach())                                             # == hard exactly
    return z[:, FA], soft[:, FA]


def tau_at(step: int, steps: int, tau_max: float = 1.5, tau_min: float = 1.0, decay: float = 0.6) -> float:
    """The official `get_current_tau`: cosine from tau_max to tau_min over the first `decay` of the
    steps, then tau_min."""
    T = max(1, int(round(decay * steps)))
    if step >= T:
        return float(tau_min)
    return float(tau_min + 0.5 * (tau_max - tau_min) * (1 + math.cos(math.pi * step / T)))


# --------------------------------------------------------------------------- hooks and rules

def _check_routers(model, routers) -> list:
    mods = fl.attention_modules(model)
    if not isinstance(routers, (nn.ModuleList, list, tuple)) or len(routers) != len(mods):
        got = len(routers) if hasattr(routers, "__len__") else type(routers).__name__
        raise ValueError(f"flux: expected one LayerRouter per attention layer ({len(mods)}), got {got}")
    d = _head_dim(mods[0])
    for l, r in enumerate(routers):
        if not isinstance(r, LayerRouter) or r.head_dim != d:
            raise ValueError(f"flux: router {l} must be a LayerRouter(head_dim={d}), got "
                             f"{type(r).__name__}(head_dim={getattr(r, 'head_dim', None)})")
    for m in mods:
        if not isinstance(getattr(m, "q_proj", None), nn.Module):
            raise ValueError(f"flux: attention module {type(m).__name__} has no q_proj (a HuggingFace Llama-style "
                             "model is expected: model.model.layers[l].self_attn.q_proj)")
    return mods


def _check_sparse(sparse) -> fl.Rule:
    if not isinstance(sparse, fl.Rule) or isinstance(sparse, (fl.Reuse, MixRule)) or isinstance(sparse, fl.Full):
        raise ValueError(f"flux: sparse must be a fastlm sparse Rule (Streaming, BlockTopK), got {sparse!r}")
    return sparse


@contextmanager
def _q_hooks(mods, on_query) -> Iterator[None]:
    """Forward hooks on every layer's q_proj calling on_query(layer, q (B, N, Hq, D) pre-RoPE)."""
    handles = []
    for m in mods:
        D, layer = _head_dim(m), int(m.layer_idx)

        def hook(_mod, _inp, out, layer=layer, D=D):
            B, N = out.shape[0], out.shape[1]
            on_query(layer, out.view(B, N, -1, D))                                 # (B, N, Hq, D)
        handles.append(m.q_proj.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class FluxRouting:
    """Inference routing of `model` by `routers` (argmax at prefill, kept for the decode steps).

        routing = FluxRouting(model, routers)
        with routing:                                # fast_attention(model, routing.plan) + hooks
            logits, cache = fastlm.prefill(model, ids)
        fastlm.run_once(model, ids, cont, plan=routing.plan, model_hooks=routing.hooks)

    A forward with more than one token (a prefill), or the first forward, routes every layer;
    one-token forwards (decode) keep the decisions. `decisions[l]` is True where layer l is sparse.
    """

    def __init__(self, model, routers, sparse: fl.Rule | None = None, *, pool: int = 150):
        self.mods = _check_routers(model, routers)
        self.model, self.routers = model, routers
        self.sparse = _check_sparse(sparse if sparse is not None else default_sparse())
        if int(pool) < 1:
            raise ValueError(f"FluxRouting: pool must be positive, got {pool}")
        self.pool = int(pool)
        self.plan = fl.Plan({l: fl.Full() for l in range(len(self.mods))})
        self.decisions: dict[int, bool] = {}
        self.logits: dict[int, Tensor] = {}
        self.prefills = 0
        self._stack = None

    @property
    def sparse_fraction(self) -> float:
        """The realised fraction of layers routed sparse (NaN before the first prefill)."""
        if not self.decisions:
            return math.nan
        return sum(self.decisions.values()) / len(self.decisions)

    def describe(self) -> str:
        return "".join("S" if self.decisions.get(l) else "F" for l in range(len(self.mods)))

    @torch.no_grad()
    def _route(self, layer: int, q: Tensor) -> None:
        if q.shape[1] == 1 and layer in self.decisions:
            return                                                                  # decode: keep it
        if q.shape[0] != 1:
            raise ValueError(f"FluxRouting: one prompt at a time (B = 1), got a batch of {q.shape[0]}: the "
                             "routing decision is per prompt and a fastlm Plan is per layer")
        if layer == 0:
            self.prefills += 1
        router = self.routers[layer]
        logits = router(pool_queries(q, self.pool))                                 # (1, 2)
        sparse = int(logits.argmax(-1)) == SA
        self.logits[layer] = logits[0].detach()
        self.decisions[layer] = sparse
        self.plan.rules[layer] = self.sparse if sparse else fl.Full()

    def hooks(self):
        """The q_proj hooks alone (for fastlm.run_once's model_hooks)."""
        return _q_hooks(self.mods, self._route)

    def __enter__(self) -> "FluxRouting":
        from contextlib import ExitStack
        stack = ExitStack()
        try:
            stack.enter_context(fl.fast_attention(self.model, self.plan))
            stack.enter_context(self.hooks())
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        for r in self.routers:
            r.eval()
        return self

    def __exit__(self, *exc) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()


class MixRule(fl.Rule):
    """Training: out = z * FA + (1 - z) * SA with the layer's gate z (B,) from `plan.state["flux_z"]`.

    Both attentions are computed (fastlm.dense_attention and the sparse rule); z = 1 gives FA and
    z = 0 gives SA exactly (1 * x + 0 * y = x for finite y). Differentiable in z and q, k, v."""

    kind = "flux_mix"

    def __init__(self, sparse: fl.Rule):
        self.sparse = _check_sparse(sparse)

    def __call__(self, q, k, v, scaling, plan, layer):
        z = plan.state.get("flux_z", {}).get(layer)
        if z is None:
            raise RuntimeError(f"flux MixRule at layer {layer}: no gate was set (the q_proj hook did not run)")
        full = fl.dense_attention(q, k, v, scaling)                                 # (B, Hq, q, D)
        part = self.sparse(q, k, v, scaling, plan, layer)
        zb = z.to(full.dtype).view(-1, 1, 1, 1)                                     # (B, 1, 1, 1)
        return zb * full + (1 - zb) * part

    def key_fraction(self, nq, nk):
        return math.nan

    def to_json(self):
        return {"kind": self.kind, "sparse": self.sparse.to_json()}


@dataclass
class Gates:
    """What one training forward routed: z (L, B) straight-through gates, soft (L, B), logits (L, B, 2)."""

    z: Tensor
    soft: Tensor
    logits: Tensor

    def sparsity(self) -> Tensor:
        """s per sample (B,): the fraction of layers routed sparse, 1 - mean over layers of z."""
        return 1 - self.z.mean(0)


def flux_forward(model, ids: Tensor, routers, *, tau: float = 1.0, sparse: fl.Rule | None = None,
                 pool: int = 150, generator: torch.Generator | None = None, labels: bool = True):
    """One training forward of `model` on ids (B, N) with every layer mixing FA and SA by its gate.

    Returns (logits (B, N, V), Gates). Gradients reach the routers through z (the base model is
    not touched: freeze it yourself, or use `train`)."""
    mods = _check_routers(model, routers)
    rule = MixRule(sparse if sparse is not None else default_sparse())
    if ids.dim() != 2:
        raise ValueError(f"flux_forward: expected ids (B, N), got {tuple(ids.shape)}")
    plan = fl.Plan({l: rule for l in range(len(mods))})
    zs: dict[int, Tensor] = {}
    softs: dict[int, Tensor] = {}
    lgs: dict[int, Tensor] = {}
    plan.state["flux_z"] = zs

    def on_query(layer, q):
        logits = routers[layer](pool_queries(q, pool))                              # (B, 2)
        z, soft = gumbel_gate(logits, tau, generator=generator)
        zs[layer], softs[layer], lgs[layer] = z, soft, logits

    with fl.fast_attention(model, plan), _q_hooks(mods, on_query):
        out = model(input_ids=ids, use_cache=False)
    L = len(mods)
    if len(zs) != L:
        raise RuntimeError(f"flux_forward: {len(zs)} of {L} layers were routed (q_proj hooks missing?)")
    gates = Gates(torch.stack([zs[l] for l in range(L)]), torch.stack([softs[l] for l in range(L)]),
                  torch.stack([lgs[l] for l in range(L)]))
    return out.logits, gates


# --------------------------------------------------------------------------- data

def split_text(text: str, train_fraction: float = 0.9) -> tuple[str, str]:
    """(first 90% of the characters, last 10%): the training and the evaluation text."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    cut = int(len(text) * train_fraction)
    return text[:cut], text[cut:]


def text_ids(tokenizer, part: str, *, text: str | None = None) -> Tensor:
    """1-D token ids of tinyshakespeare's (or `text`'s) "train" or "eval" split, no special tokens."""
    if part not in ("train", "eval"):
        raise ValueError(f"text_ids: part must be 'train' or 'eval', got {part!r}")
    if text is None:
        from attnlab.probes.inputs import read_text
        text = read_text()
    train_text, eval_text = split_text(text)
    chosen = train_text if part == "train" else eval_text
    return tokenizer(chosen, add_special_tokens=False, return_tensors="pt")["input_ids"][0]


def _windows(ids: Tensor, seq_len: int, batch: int, bos: int | None, g: torch.Generator) -> Tensor:
    n = seq_len - (bos is not None)
    starts = torch.randint(0, ids.numel() - n + 1, (batch,), generator=g)
    rows = torch.stack([ids[int(s): int(s) + n] for s in starts])                  # (batch, n)
    if bos is not None:
        rows = torch.cat([torch.full((batch, 1), int(bos), dtype=rows.dtype), rows], 1)
    return rows                                                                     # (batch, seq_len)


# --------------------------------------------------------------------------- training

@dataclass
class TrainConfig:
    target: float
    steps: int
    seq_len: int
    batch: int = 1
    pool: int = 150
    router_lr: float = 5e-4
    lambda_lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup: float = 0.2
    schedule: str = "cosine"                # "cosine" (warmup then cosine to 0, official) or "constant"
    tau_max: float = 1.5
    tau_min: float = 1.0
    tau_decay: float = 0.6
    bos: int | None = None
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 <= float(self.target) <= 1.0:
            raise ValueError(f"train: target must be a fraction of layers in [0, 1], got {self.target}")
        for name in ("steps", "seq_len", "batch", "pool"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train: {name} must be positive, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"train: seq_len must be at least 2 (a next token), got {self.seq_len}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"train: schedule must be 'cosine' or 'constant', got {self.schedule!r}")

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["betas"] = list(self.betas)
        return d


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if cfg.schedule == "constant":
        return 1.0
    w = int(cfg.warmup * cfg.steps)
    if step < w:
        return (step + 1) / (w + 1)
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, cfg.steps - w)))


@contextmanager
def _frozen(model) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(was_training)


def train(model, tokenizer_or_ids, target: float, steps: int, seq_len: int, *, routers=None,
          sparse: fl.Rule | None = None, batch: int = 1, pool: int = 150, router_lr: float = 5e-4,
          lambda_lr: float = 1e-3, schedule: str = "cosine", bos: int | None = None, seed: int = 0,
          text: str | None = None, log=None, **extra) -> tuple[nn.ModuleList, list[dict]]:
    """Train Flux routers on a frozen `model` towards a sparse-layer fraction `target`.

    tokenizer_or_ids: a tokenizer (its ids of the TRAINING split of tinyshakespeare, or of `text`:
    the first 90% of the characters) or 1-D ids to draw windows from (the caller's training data).
    Windows of `seq_len` tokens (BOS first when `bos` is given), `batch` per step, drawn at random.
    Returns (routers in eval mode, history: one dict per step with loss, ce, lagrangian, s, target,
    lambda1, lambda2, tau, lr, seconds). `extra`: other TrainConfig fields (betas, weight_decay,
    warmup, tau_max, tau_min, tau_decay)."""
    cfg = TrainConfig(target=float(target), steps=int(steps), seq_len=int(seq_len), batch=int(batch), pool=int(pool),
                      router_lr=router_lr, lambda_lr=lambda_lr, schedule=schedule, bos=bos, seed=seed, **extra)
    cfg.validate()
    sparse = _check_sparse(sparse if sparse is not None else default_sparse())
    if isinstance(tokenizer_or_ids, Tensor):
        ids = tokenizer_or_ids
        if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"train: expected 1-D integer token ids, got {ids.dtype} {tuple(ids.shape)}")
    else:
        ids = text_ids(tokenizer_or_ids, "train", text=text)
    need = cfg.seq_len - (bos is not None)
    if ids.numel() < need:
        raise ValueError(f"train: {ids.numel()} training tokens, fewer than one window of {need}")
    device = next(model.parameters()).device
    ids = ids.long()
    routers = routers if routers is not None else make_routers(model)
    _check_routers(model, routers)
    routers.to(device).train()
    lam = nn.Parameter(torch.zeros(2, device=device))                               # (lambda1, lambda2)
    opt_r = torch.optim.AdamW(routers.parameters(), lr=cfg.router_lr, betas=cfg.betas,
                              weight_decay=cfg.weight_decay)
    opt_l = torch.optim.AdamW([lam], lr=cfg.lambda_lr, betas=cfg.betas, weight_decay=0.0, maximize=True)
    g_data = torch.Generator().manual_seed(cfg.seed)
    g_noise = torch.Generator().manual_seed(cfg.seed + 1)
    history: list[dict] = []
    with _frozen(model):
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            f = _lr_factor(step, cfg)
            for o, lr in ((opt_r, cfg.router_lr), (opt_l, cfg.lambda_lr)):
                for grp in o.param_groups:
                    grp["lr"] = lr * f
            tau = tau_at(step, cfg.steps, cfg.tau_max, cfg.tau_min, cfg.tau_decay)
            x = _windows(ids, cfg.seq_len, cfg.batch, bos, g_data).to(device)     # (batch, seq_len)
            logits, gates = flux_forward(model, x, routers, tau=tau, sparse=sparse, pool=cfg.pool,
                                         generator=g_noise)
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten())
            s = gates.sparsity()                                                    # (batch,)
            diff = s - cfg.target
            lag = (lam[0] * diff.abs() + lam[1] * diff.pow(2)).mean()
            loss = ce + lag
            opt_r.zero_grad(set_to_none=True)
            opt_l.zero_grad(set_to_none=True)
            loss.backward()
            opt_r.step()
            opt_l.step()
            lam_now = lam.detach()
            row = {"step": step, "loss": float(loss.detach()), "ce": float(ce.detach()),
                   "lagrangian": float(lag.detach()), "s": float(s.detach().mean()), "target": cfg.target,
                   "lambda1": float(lam_now[0]), "lambda2": float(lam_now[1]),
                   "tau": tau, "lr": cfg.router_lr * f, "seconds": time.perf_counter() - t0}
            history.append(row)
            if log is not None:
                log(row)
    routers.eval()
    routers.flux_config = {"train": cfg.to_json(), "sparse": sparse.to_json(), "pool": cfg.pool}
    return routers, history


# --------------------------------------------------------------------------- save / load

def _paths(path) -> tuple[Path, Path]:
    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def save_routers(routers, path, *, sparse: fl.Rule | None = None, pool: int | None = None,
                 extra: dict | None = None) -> tuple[Path, Path]:
    """Write PATH.safetensors (tensors "layer{l}.<param>") and PATH.json (format, layers, head_dim,
    sparse rule, pool, training config, `extra`). Returns both paths."""
    from safetensors.torch import save_file
    if not isinstance(routers, (nn.ModuleList, list, tuple)) or not routers or \
            not all(isinstance(r, LayerRouter) for r in routers):
        raise ValueError(f"save_routers: expected a non-empty list of LayerRouter, got {type(routers).__name__}")
    found = getattr(routers, "flux_config", {}) or {}
    sparse_json = sparse.to_json() if sparse is not None else found.get("sparse", default_sparse().to_json())
    meta = {"format": FORMAT, "version": VERSION, "layers": len(routers), "head_dim": routers[0].head_dim,
            "sparse": sparse_json, "pool": int(pool if pool is not None else found.get("pool", 150)),
            "train": found.get("train"), "extra": extra or {}}
    tensors = {f"layer{l}.{k}": v.detach().cpu().contiguous() for l, r in enumerate(routers)
               for k, v in r.state_dict().items()}
    from attnlab._io import atomic_write, write_text
    st, js = _paths(path)
    st.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(st, lambda tmp: save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)}))
    write_text(js, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return st, js


def load_routers(path) -> tuple[nn.ModuleList, dict]:
    """(routers in eval mode, config) from save_routers' files; config["sparse_rule"] is the fastlm
    Rule. Loading reads safetensors only (never unpickles)."""
    from safetensors.torch import load_file
    st, js = _paths(path)
    for p in (st, js):
        if not p.is_file():
            raise FileNotFoundError(f"load_routers: {p} not found (save_routers writes PATH.safetensors + PATH.json)")
    meta = json.loads(js.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"load_routers: {js} is not a {FORMAT} v{VERSION} file (format {meta.get('format')!r}, "
                         f"version {meta.get('version')!r})")
    L, D = int(meta["layers"]), int(meta["head_dim"])
    tensors = load_file(str(st))
    routers = nn.ModuleList(LayerRouter(D) for _ in range(L))
    expect = {f"layer{l}.{k}" for l, r in enumerate(routers) for k in r.state_dict()}
    if set(tensors) != expect:
        missing, unexpected = sorted(expect - set(tensors))[:4], sorted(set(tensors) - expect)[:4]
        raise ValueError(f"load_routers: {st} does not hold {L} routers of head_dim {D}: missing {missing}, "
                         f"unexpected {unexpected}")
    for l, r in enumerate(routers):
        sd = {k: tensors[f"layer{l}.{k}"] for k in r.state_dict()}
        for k, v in sd.items():
            if v.shape != r.state_dict()[k].shape:
                raise ValueError(f"load_routers: layer{l}.{k} has shape {tuple(v.shape)}, expected "
                                 f"{tuple(r.state_dict()[k].shape)} for head_dim {D}")
        r.load_state_dict(sd)
    routers.eval()
    meta["sparse_rule"] = fl.rule_from_json(meta["sparse"])
    routers.flux_config = {"train": meta.get("train"), "sparse": meta["sparse"], "pool": meta["pool"]}
    return routers, meta


# --------------------------------------------------------------------------- evaluation

def heldout(tokenizer, prefix: int = 2048, continuation: int = 64, *, bos: int | None = None,
            text: str | None = None) -> tuple[Tensor, Tensor]:
    """(ids (1, prefix), continuation (1, continuation)) from the start of the EVALUATION split
    (the last 10% of the characters), BOS first when given."""
    ids = text_ids(tokenizer, "eval", text=text)
    n = prefix - (bos is not None)
    if ids.numel() < n + continuation:
        raise ValueError(f"heldout: the evaluation split gives {ids.numel()} tokens, fewer than {n} + {continuation}")
    head = ids[:n]
    if bos is not None:
        head = torch.cat([torch.tensor([int(bos)]), head])
    return head.view(1, -1), ids[n:n + continuation].view(1, -1)


def evaluate(model, ids: Tensor, continuation: Tensor, routers, *, sparse: fl.Rule | None = None,
             pool: int = 150, greedy_tokens: int = 32) -> list[dict]:
    """all-full vs all-sparse vs the routing by `routers`, each through fastlm.run_once on one prefix.

    Rows: routing, sparse_fraction, layers ("F"/"S" per layer), prefill_s, decode_s_per_token, nll,
    agreement and common_prefix (greedy tokens vs all-full), kv_bytes, attention_prefill_s,
    attention_decode_s."""
    mods = _check_routers(model, routers)
    L = len(mods)
    sparse = _check_sparse(sparse if sparse is not None else default_sparse())
    runs = []
    for name, plan in (("all-full", fl.Plan({l: fl.Full() for l in range(L)})),
                       ("all-sparse", fl.Plan({l: sparse for l in range(L)}))):
        m = fl.run_once(model, ids, continuation, greedy_tokens=greedy_tokens, plan=plan)
        runs.append((name, m, 0.0 if name == "all-full" else 1.0, plan.describe(L).replace(" ", "")))
    routing = FluxRouting(model, routers, sparse, pool=pool)
    m = fl.run_once(model, ids, continuation, greedy_tokens=greedy_tokens, plan=routing.plan,
                    model_hooks=routing.hooks)
    runs.append(("flux", m, routing.sparse_fraction, routing.describe()))
    ref = runs[0][1].greedy
    rows = []
    for name, m, frac, layers in runs:
        agree, prefix = fl.agreement(m.greedy, ref)
        rows.append({"routing": name, "sparse_fraction": frac, "layers": layers, "prefill_s": m.prefill_s,
                     "decode_s_per_token": m.decode_s_per_token, "nll": m.nll, "agreement": agree,
                     "common_prefix": prefix, "kv_bytes": m.kv_bytes, "attention_prefill_s": m.attention_prefill_s,
                     "attention_decode_s": m.attention_decode_s, "prefix_tokens": int(ids.shape[1]),
                     "continuation_tokens": int(continuation.shape[1])})
    return rows


def sweep(model=None, tokenizer=None, *, target: float = 0.5, steps: int = 60, seq_len: int = 512,
          prefix: int = 2048, continuation: int = 64, greedy_tokens: int = 32, sparse: fl.Rule | None = None,
          pool: int = 150, routers=None, bos: int | None = None, seed: int = 0, log=None, text: str | None = None,
          **train_kwargs) -> dict:
    """Train routers (unless `routers` is given) on the training split, then `evaluate` on the start
    of the evaluation split. model None: SmolLM2-135M (attnlab.probes.assets, float32, BOS id 1).

    Returns {"rows": evaluate's rows, "train": {"history", "seconds_per_step", "steps", "target",
    "final_s"}, "config": {...}}."""
    if model is None:
        from attnlab.probes import assets
        model, tokenizer = assets.load_smollm2()
        bos = assets.SMOLLM2_BOS if bos is None else bos
    if tokenizer is None:
        raise ValueError("sweep: a tokenizer is needed with a given model")
    model.eval()
    sparse = sparse if sparse is not None else default_sparse()
    info: dict[str, Any] = {"history": [], "seconds_per_step": math.nan, "steps": 0, "target": target}
    if routers is None:
        routers, hist = train(model, tokenizer, target, steps, seq_len, sparse=sparse, pool=pool, bos=bos,
                              seed=seed, log=log, text=text, **train_kwargs)
        secs = [h["seconds"] for h in hist]
        info = {"history": hist, "steps": len(hist), "target": target, "final_s": hist[-1]["s"],
                "seconds_per_step": sum(secs[1:]) / max(1, len(secs) - 1) if len(secs) > 1 else secs[0]}
    ids, cont = heldout(tokenizer, prefix, continuation, bos=bos, text=text)
    rows = evaluate(model, ids, cont, routers, sparse=sparse, pool=pool, greedy_tokens=greedy_tokens)
    config = {"target": target, "seq_len": seq_len, "prefix": prefix, "continuation": continuation,
              "greedy_tokens": greedy_tokens, "sparse": sparse.to_json(), "pool": pool, "bos": bos, "seed": seed}
    return {"rows": rows, "train": info, "config": config, "routers": routers}


def run(model_name_or_model="smollm2", *, out, tokenizer=None, routers_path=None, target: float = 0.5,
        steps: int = 60, seq_len: int = 512, tokens: int = 2048, continuation: int = 64, greedy: int = 32,
        sink: int = 64, window: int = 256, seed: int = 0, router_lr: float = 5e-3, lambda_lr: float = 0.1,
        schedule: str = "constant", text_path=None, progress=None) -> dict:
    """`attnlab probe flux`: train routers on the frozen model (or load them from `routers_path`,
    save_routers' files), then all-full vs all-sparse vs the routed model on the start of the
    evaluation split. Writes flux.md, flux.json and (when trained) flux-routers.safetensors/.json.
    The learning rates default to the short-run ones of the fast_inference claim (10x and 100x the
    official 5e-4 and 1e-3, constant: the official values are for 300 steps of 48 long sequences, and
    at 60 steps they leave the routers where they started, every layer full)."""
    from attnlab._io import write_text
    from attnlab.probes.inputs import read_text
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    say = progress or (lambda *a: None)
    from attnlab.probes.assets import causal_lm
    model, tokenizer, name, bos = causal_lm(model_name_or_model, tokenizer, what="flux.run")
    text = read_text(text_path)
    sparse = fl.Streaming(sink=sink, window=window)
    routers = None
    if routers_path is not None:
        routers, meta = load_routers(routers_path)
        sparse = meta["sparse_rule"]
    files = []

    def log(h):
        say(f"training routers, step {h.get('step', '?')}/{steps}")

    result = sweep(model.eval(), tokenizer, target=target, steps=steps, seq_len=seq_len, prefix=tokens,
                   continuation=continuation, greedy_tokens=greedy, sparse=sparse, routers=routers, bos=bos,
                   seed=seed, text=text, log=log, router_lr=router_lr, lambda_lr=lambda_lr, schedule=schedule)
    if routers is None:
        files += [str(f) for f in save_routers(result["routers"], out / "flux-routers", sparse=sparse,
                                               extra={"model": name, "target": target, "steps": steps})]
    rows, info = result["rows"], result["train"]
    dense = rows[0]
    trained = (f"routers trained {info['steps']} steps of {seq_len}-token windows of the training split "
               f"(router lr {router_lr:g}, multiplier lr {lambda_lr:g}, {schedule}; target sparse fraction "
               f"{target:g}, final {info.get('final_s', float('nan')):.2f})"
               if routers is None else f"routers loaded from {routers_path}")
    lines = [f"# Flux routing on {name}", "",
             f"{trained}; sparse rule: {sparse.to_json()}; measured on {tokens} tokens of the evaluation split + "
             f"{continuation} teacher-forced and {greedy} greedy tokens, one run each (the fast_inference claim "
             "has paired, repeated timings).", "",
             "| routing | sparse layers | layers (F full, S sparse) | prefill s | decode ms/token | NLL | NLL change "
             "| greedy agreement vs all-full |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['routing']} | {r['sparse_fraction']:.2f} | `{r['layers']}` | {r['prefill_s']:.2f} | "
                     f"{1000 * r['decode_s_per_token']:.1f} | {r['nll']:.4f} | {r['nll'] - dense['nll']:+.4f} | "
                     f"{100 * r['agreement']:.0f}% (prefix {r['common_prefix']}) |")
    doc = {"probe": "flux", "model": name, "rows": rows, "train": info, "config": result["config"],
           "seconds": time.perf_counter() - t0}
    write_text(out / "flux.json", json.dumps(doc, indent=1, default=str) + "\n")
    write_text(out / "flux.md", "\n".join(lines + [""]))
    doc["files"] = [str(out / "flux.md"), str(out / "flux.json")] + files
    return doc


__all__ = ["LayerRouter", "make_routers", "pool_queries", "gumbel_gate", "tau_at", "FluxRouting", "MixRule",
           "Gates", "flux_forward", "split_text", "text_ids", "TrainConfig", "train", "save_routers",
           "load_routers", "heldout", "evaluate", "sweep", "run", "default_sparse", "FA", "SA"]
