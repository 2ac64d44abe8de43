"""Attention sinks: Gu et al.'s Sink^eps score and Wong et al.'s secondary-sink detector.

    scores, states = measure(model, inputs)            # one forward inside `capture`
    scores.model_score()                               # Sink^0.3 of the first token
    found = secondary_sinks(states.hidden[0], mlp_out=states.mlp_out[0])
    found.sinks                                        # [Sink(position, layers, kind, ...)]
    run("smollm2", out=Path("probe-results/sinks"))    # table (markdown + JSON) and PNGs

Sink^eps. Source: Gu et al. 2025, "When Attention Sink Emerges in Language Models: An Empirical
View" (ICLR 2025, arXiv 2410.10781), Section 3 (the sink metric); official code
sail-sg/Attention-Sink, `eval_sink_open_source.py::compute_attention_sink`.
    alpha^{l,h}_k = mean of A^{l,h}_{i,k} over the queries i that can see key k
                    (causal: the T - k + 1 queries i >= k; for the first token all T queries)
    Sink^eps_k   = (1 / (L H)) * #{(l, h): alpha^{l,h}_k > eps},        eps = 0.3
The paper reports Sink^eps of the first token as the model's score; over several sequences the
official code averages the indicator over sequences too (we average per-sequence scores, the
same number). "The queries that can see k" are read off the mask itself (the scores hook is
-inf or the dtype's minimum where a query may not attend), so a sliding-window layer (Gemma3)
averages over the window's queries and a bidirectional encoder (BERT, DINOv2) over all queries;
padded queries are left out, and a key no query can see gets NaN.

Secondary sinks. Source: Wong et al. 2025, "On the Existence and Behaviour of Secondary
Attention Sinks" (arXiv 2512.22213); official code JeffreyWong20/Secondary-Attention-Sinks,
`src/hidden_state_base.py` (`hidden_state_norm_detection`, `sink_labeling_machine`),
`src/mlp_base.py` (MLP alignment), `02.hierarchical_levels.ipynb` (levels).
    h^l_t              the residual stream after layer l (hook_resid_post), l = 0..L-1
    clipper            n_l = ||h^l_BOS||, d_l = n_{l+1} - n_l; start = argmax d + 1, end = the
                       layer after the largest fall that follows (argmin of d from start on);
                       only layers [start, end) are searched ("enable_sink_clipper")
    sink in layer l    |cos(h^l_t, h^l_BOS)| > 0.9, for tokens t after the BOS
    lifetime           the number of layers a token is a sink in; creation layer: the first
    level              the pair (creation layer, lifetime); `levels()` counts them (Fig. 2)
    kind               "primary" when lifetime >= primary_min, "noise" when <= noise_max,
                       "secondary" between; the BOS itself is "bos"
    MLP alignment      at a sink's creation layer, cos(mlp_out^l_t, mlp_out^l_BOS): the official
                       mlp_base.py compares the MLP output ("down") of the sink with the BOS's
                       in the same layer (Sec. 4: "MLPs map token representations to vectors
                       that align with the direction of the primary sink of that layer"); we
                       also give cos(mlp_out^l_t, h^l_BOS) and ||mlp_out^l_t|| (the paper's
                       norm that sets the sink score and the lifetime).
Deviations, each a parameter:
  - Thresholds relative to depth. The official labels use constants: secondary when
    4 < lifetime < L - 15, primary when lifetime >= L - 15. With L = 18 (Gemma3) nothing can be
    secondary (lifetime > 4 and < 3), with L = 6 (MiniLM) every lifetime is "primary". Here
    noise_max = max(1, floor(noise_frac * L)) and primary_min = max(noise_max + 1,
    ceil(primary_frac * L)), with noise_frac = 0.15 and primary_frac = 0.5, which give exactly
    the official 4 and 15 at L = 30 (SmolLM2's depth). At L = 18: noise <= 2, primary >= 9.
  - High norm. Where every token aligns with the BOS (a shared massive direction: seen on
    Gemma3), |cos| > 0.9 says nothing. criterion="auto" (the default) uses the official cosine
    test in every layer where at most crowd_frac (0.5) of the tokens pass it, and in a crowded
    layer also requires the token's norm to exceed norm_ratio (3.0) times the median token
    norm of that layer. criterion="norm" is the norm test alone: the high-norm tokens of ViTs
    (Darcet et al. 2024, "Vision Transformers Need Registers", Sec. 2: outlier tokens with
    about 10x the norm of the others); "cos" is the official test alone; "cos+norm" both.
  - The clipper's end when the BOS norm never falls after its largest rise: the official
    argmin then stops at the smallest rise; here the clipper runs to the last layer.
  - h^l is taken before the final norm for every layer (the official code reads transformers'
    hidden_states, whose last entry is after the model's final norm).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from attnlab._io import save_figure
from attnlab.probes.capture import Capture, capture
from attnlab.probes.inputs import default_text_path, read_text, sample_images  # noqa: F401  (re-exported)

EPS = 0.3                  # Gu et al.'s threshold
COS_THRESHOLD = 0.9        # Wong et al.'s |cos(h_t, h_BOS)| threshold
PRIMARY_FRAC = 0.5         # primary when lifetime >= ceil(0.5 L)   (official: L - 15; equal at L = 30)
NOISE_FRAC = 0.15          # noise when lifetime <= floor(0.15 L)  (official: 4; equal at L = 30)
NORM_RATIO = 3.0           # high norm: ||h_t|| > 3 x the layer's median token norm
CROWD_FRAC = 0.5           # "auto": a layer where more than half the tokens align is crowded
CRITERIA = ("auto", "cos", "norm", "cos+norm")


# ------------------------------------------------------------------------------------------ Sink^eps

def visible_from_scores(scores: Tensor) -> Tensor:
    """(B, h, N, M) scores (mask added) -> bool, True where the query may attend to the key.

    HuggingFace's eager mask adds the dtype's minimum, attnlab's reference path -inf; either is
    below half the minimum, which no real score reaches.
    """
    return scores > torch.finfo(scores.dtype).min / 2


def received_attention(pattern: Tensor, visible: Tensor | None = None, query_mask: Tensor | None = None) -> Tensor:
    """alpha (B, h, M): the mean attention each key receives over the queries that can see it.

    pattern (B, h, N, M); visible: bool broadcastable to it (None: every query sees every key);
    query_mask: (B, N) bool, False for padded queries. A key seen by no query gets NaN.
    """
    p = pattern.float()
    v = torch.ones_like(p, dtype=torch.bool) if visible is None else visible.expand_as(p)
    if query_mask is not None:
        v = v & query_mask.bool()[:, None, :, None]
    count = v.sum(-2)                                                  # (B, h, M)
    total = (p * v).sum(-2)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


@dataclass
class SinkScores:
    """Gu et al.'s scores of one batch. alpha (B, L, h, N): mean attention received (NaN: unseen)."""

    alpha: Tensor
    eps: float = EPS

    def above(self, eps: float | None = None) -> Tensor:
        """(B, L, h, N) float: 1 where alpha > eps, 0 below, NaN where the key is unseen."""
        eps = self.eps if eps is None else eps
        hit = (self.alpha > eps).float()
        return torch.where(torch.isnan(self.alpha), torch.full_like(hit, float("nan")), hit)

    def per_token(self, eps: float | None = None) -> Tensor:
        """Sink^eps_k (N,): the fraction of (layer, head) pairs with alpha > eps, mean over the batch."""
        return self.above(eps).mean((1, 2)).nanmean(0)

    def per_layer(self, eps: float | None = None) -> Tensor:
        """(L, N): the fraction of heads of each layer with alpha > eps, mean over the batch."""
        return self.above(eps).mean(2).nanmean(0)

    def per_head(self, eps: float | None = None) -> Tensor:
        """(L, h, N): the fraction of sequences in which the head gives the key alpha > eps."""
        return self.above(eps).nanmean(0)

    def model_score(self, eps: float | None = None, token: int = 0) -> float:
        """Sink^eps of the first token (or `token`): the number Gu et al. report per model."""
        return float(self.per_token(eps)[token])


@dataclass
class States:
    """What one forward recorded besides the scores: (B, L, N, C) residual stream and MLP outputs."""

    hidden: Tensor
    mlp_out: Tensor | None


def _forward(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _chain(first, then):
    """An edit that runs `first` and hands its result to `then` (a reduction returning None)."""
    def fn(x: Tensor, hook):
        out = first(x, hook)
        then(x if out is None else out, hook)
        return out
    return fn


@torch.no_grad()
def measure(model: nn.Module, inputs, *, eps: float = EPS, query_mask: Tensor | None = None,
            states: bool = True, edits: dict | None = None) -> tuple[SinkScores, States | None]:
    """One forward of `model` on `inputs` (a dict of keyword arguments, a tensor or a tuple).

    The attention patterns are reduced to alpha layer by layer while the model runs (nothing of
    size N x N is kept), with the mask read from each layer's scores. With `states`, the
    residual stream (hook_resid_post) and MLP outputs (hook_mlp_out) of every layer are kept.
    query_mask defaults to inputs["attention_mask"] when there is one. edits: capture edits
    ({name: fn(tensor, hook)}) applied first, so that the scores describe the edited model.
    """
    if query_mask is None and isinstance(inputs, dict) and inputs.get("attention_mask") is not None:
        query_mask = inputs["attention_mask"].bool()
    visible: dict[int, Tensor] = {}
    alpha: dict[int, Tensor] = {}

    def on_scores(scores: Tensor, hook) -> None:
        visible[hook.layer] = visible_from_scores(scores)

    def on_pattern(pattern: Tensor, hook) -> None:
        if hook.layer not in visible:
            raise ValueError(f"sinks: layer {hook.layer} gave an attention pattern without scores, so the "
                             "queries that can see each key are unknown")
        alpha[hook.layer] = received_attention(pattern, visible.pop(hook.layer), query_mask)

    num_layers = Capture(model).num_layers
    probe: dict = {}
    for l in range(num_layers):
        probe[f"blocks.{l}.attn.hook_scores"] = on_scores
        probe[f"blocks.{l}.attn.hook_pattern"] = on_pattern
    for name, first in (edits or {}).items():                          # the caller's edit, then ours
        probe[name] = first if name not in probe else _chain(first, probe[name])
    wanted = ["blocks.*.hook_resid_post", "blocks.*.hook_mlp_out"] if states else []
    with capture(model, names=wanted, edits=probe) as cap:
        _forward(model, inputs)
    missing = [l for l in range(num_layers) if l not in alpha]
    if len(missing) == num_layers:
        raise ValueError(f"sinks: no layer of {type(model).__name__} produced an attention pattern")
    if missing:
        raise ValueError(f"sinks: layers {missing} produced no attention pattern (no softmax attention there)")
    scores = SinkScores(torch.stack([alpha[l] for l in range(num_layers)], 1), eps)      # (B, L, h, N)
    if not states:
        return scores, None
    hidden = torch.stack([cap[f"blocks.{l}.hook_resid_post"].float() for l in range(num_layers)], 1)
    mlp = None
    if all(f"blocks.{l}.hook_mlp_out" in cap for l in range(num_layers)):
        mlp = torch.stack([cap[f"blocks.{l}.hook_mlp_out"].float() for l in range(num_layers)], 1)
    return scores, States(hidden, mlp)


# ------------------------------------------------------------------------------------------ secondary sinks

def sink_clipper(bos_norm: Tensor) -> tuple[int, int]:
    """Layers [start, end) between the largest rise of the BOS norm and the largest fall after it.

    hidden_state_base.py: start = argmax(diff) + 1, end = argmin(diff[start:]) + start + 1.
    Deviation: when no fall follows the rise (diff[start:] >= 0, or nothing left), end = L.
    """
    L = int(bos_norm.numel())
    if L < 2:
        return 0, L
    diff = bos_norm[1:] - bos_norm[:-1]                                # diff[l] = n[l+1] - n[l]
    start = int(torch.argmax(diff)) + 1
    rest = diff[start:]
    if rest.numel() == 0 or float(rest.min()) >= 0:
        return start, L
    return start, int(torch.argmin(rest)) + start + 1


def kind_thresholds(num_layers: int, *, primary_frac: float = PRIMARY_FRAC,
                    noise_frac: float = NOISE_FRAC) -> tuple[int, int]:
    """(noise_max, primary_min) for a model of `num_layers` layers (see the module docstring)."""
    noise_max = max(1, math.floor(noise_frac * num_layers + 1e-9))
    primary_min = max(noise_max + 1, math.ceil(primary_frac * num_layers - 1e-9))
    return noise_max, primary_min


def sink_kind(lifetime: int, num_layers: int, *, primary_frac: float = PRIMARY_FRAC,
              noise_frac: float = NOISE_FRAC) -> str:
    """"primary", "secondary" or "noise" by lifetime, relative to depth (sink_labeling_machine)."""
    noise_max, primary_min = kind_thresholds(num_layers, primary_frac=primary_frac, noise_frac=noise_frac)
    if lifetime >= primary_min:
        return "primary"
    if lifetime <= noise_max:
        return "noise"
    return "secondary"


@dataclass
class Sink:
    """One token that is a sink in some layers. layers: sorted layer indices."""

    position: int
    layers: list[int]
    kind: str
    token: str | None = None
    mean_abs_cos: float | None = None         # |cos(h_t, h_BOS)| over its layers
    norm_ratio: float | None = None           # max over its layers of ||h_t|| / median ||h||
    mlp_cos: float | None = None              # cos(mlp_out_t, mlp_out_BOS) at the creation layer
    mlp_cos_hidden: float | None = None       # cos(mlp_out_t, h_BOS) at the creation layer
    mlp_norm_ratio: float | None = None       # ||mlp_out_t|| / median ||mlp_out|| at the creation layer
    sink_score: float | None = None           # alpha (mean attention received) over heads and its layers

    @property
    def creation_layer(self) -> int:
        return self.layers[0]

    @property
    def lifetime(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict:
        d = {"position": self.position, "token": self.token, "kind": self.kind,
             "creation_layer": self.creation_layer, "lifetime": self.lifetime, "layers": self.layers}
        for k in ("mean_abs_cos", "norm_ratio", "mlp_cos", "mlp_cos_hidden", "mlp_norm_ratio", "sink_score"):
            v = getattr(self, k)
            d[k] = None if v is None or math.isnan(v) else round(float(v), 4)
        return d


@dataclass
class SecondarySinks:
    """The detector's result for one sequence. Arrays are (L,) or (L, N), float32."""

    bos: int
    clip: tuple[int, int]
    bos_norm: Tensor
    cos: Tensor                     # cos(h^l_t, h^l_BOS), signed
    norm_ratio: Tensor              # ||h^l_t|| / median_{t != BOS} ||h^l_t||
    sink: Tensor                    # bool (L, N): the criterion holds (inside the clipper, t > BOS)
    crowded_layers: list[int]       # criterion "auto": layers where the norm test was added
    criterion: str
    thresholds: dict
    sinks: list[Sink] = field(default_factory=list)
    mlp_cos: Tensor | None = None           # cos(mlp_out^l_t, mlp_out^l_BOS)
    mlp_cos_hidden: Tensor | None = None    # cos(mlp_out^l_t, h^l_BOS)
    mlp_norm_ratio: Tensor | None = None    # ||mlp_out^l_t|| / median ||mlp_out^l||

    @property
    def num_layers(self) -> int:
        return int(self.bos_norm.numel())

    def of_kind(self, kind: str) -> list[Sink]:
        return [s for s in self.sinks if s.kind == kind]

    def levels(self) -> dict[tuple[int, int], int]:
        """{(creation layer, lifetime): count} over every sink, the BOS included (Fig. 2)."""
        out: dict[tuple[int, int], int] = {}
        for s in self.sinks:
            key = (s.creation_layer, s.lifetime)
            out[key] = out.get(key, 0) + 1
        return out

    def max_abs_cos(self, layers: Sequence[int] | None = None) -> float:
        """The largest |cos(h_t, h_BOS)| of any token after the BOS, over `layers` (default: the clipper)."""
        start, end = self.clip
        layers = list(range(start, end)) if layers is None else list(layers)
        if not layers or self.cos.shape[1] <= self.bos + 1:
            return float("nan")
        return float(self.cos[layers, self.bos + 1:].abs().max())

    def to_dict(self) -> dict:
        return {"bos": self.bos, "clip": list(self.clip), "criterion": self.criterion,
                "thresholds": self.thresholds, "crowded_layers": self.crowded_layers,
                "bos_norm": [round(float(x), 4) for x in self.bos_norm],
                "max_abs_cos_in_clip": _num(self.max_abs_cos()),
                "sinks": [s.to_dict() for s in self.sinks],
                "levels": [{"creation_layer": c, "lifetime": n, "count": k}
                           for (c, n), k in sorted(self.levels().items())]}


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else round(x, 4)


def _cos(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine of a (..., N, C) with b (..., C), in float64 (0 where a row is zero)."""
    a, b = a.double(), b.double()
    num = (a * b.unsqueeze(-2)).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1, keepdim=True)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).float()


def _median_ratio(x: Tensor, bos: int) -> Tensor:
    """(L, N, C) -> (L, N): each token's norm over the layer's median token norm (BOS left out)."""
    norms = x.double().norm(dim=-1)                                   # (L, N)
    others = torch.cat([norms[:, :bos], norms[:, bos + 1:]], 1) if norms.shape[1] > 1 else norms
    med = others.median(dim=1, keepdim=True).values
    return (norms / med.clamp_min(1e-300)).float()


def pick_bos(hidden: Tensor, candidates: Sequence[int]) -> int:
    """Of several candidate positions, the one with the largest norm averaged over layers (official)."""
    cands = list(candidates)
    mean_norm = hidden[:, cands].double().norm(dim=-1).mean(0)         # (len(cands),)
    return cands[int(torch.argmax(mean_norm))]


def secondary_sinks(hidden: Tensor, *, bos: int | Sequence[int] = 0, mlp_out: Tensor | None = None,
                    alpha: Tensor | None = None, tokens: Sequence[str] | None = None,
                    cos_threshold: float = COS_THRESHOLD, criterion: str = "auto", norm_ratio: float = NORM_RATIO,
                    crowd_frac: float = CROWD_FRAC, primary_frac: float = PRIMARY_FRAC,
                    noise_frac: float = NOISE_FRAC, clip: bool = True) -> SecondarySinks:
    """Wong et al.'s detector on one sequence.

    hidden: (L, N, C) residual stream after each layer; mlp_out: (L, N, C) what each layer's MLP
    added (for the alignment columns); alpha: (L, h, N) mean attention received (for each sink's
    score); tokens: N strings for the table. bos: the primary sink's position, or candidates of
    which the highest-norm one is taken. clip=False searches every layer.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (L, N, C) for one sequence, got shape {tuple(hidden.shape)}")
    L, N, _ = hidden.shape
    bos = pick_bos(hidden, bos) if isinstance(bos, (list, tuple)) else int(bos)
    if not 0 <= bos < N:
        raise ValueError(f"bos position {bos} is outside the {N} tokens")
    h = hidden.float()
    bos_norm = h[:, bos].double().norm(dim=-1).float()                 # (L,)
    start, end = sink_clipper(bos_norm) if clip else (0, L)
    cos = _cos(h, h[:, bos])                                           # (L, N)
    ratio = _median_ratio(h, bos)                                      # (L, N)
    aligned = cos.abs() > cos_threshold
    high = ratio > norm_ratio
    after = torch.zeros(N, dtype=torch.bool)
    after[bos + 1:] = True                                             # the official loop: t > BOS
    in_clip = torch.zeros(L, dtype=torch.bool)
    in_clip[start:end] = True
    crowded: list[int] = []
    if criterion == "cos":
        test = aligned
    elif criterion == "norm":
        test = high
    elif criterion == "cos+norm":
        test = aligned & high
    else:
        frac = (aligned & after).sum(1).float() / max(1, int(after.sum()))          # (L,)
        crowd = frac > crowd_frac
        crowded = [l for l in range(L) if bool(crowd[l] & in_clip[l])]
        test = torch.where(crowd[:, None], aligned & high, aligned)
    sink = test & after[None, :] & in_clip[:, None]                    # (L, N)

    mlp_cos = mlp_cos_h = mlp_ratio = None
    if mlp_out is not None:
        if mlp_out.shape != hidden.shape:
            raise ValueError(f"mlp_out must have hidden's shape {tuple(hidden.shape)}, got {tuple(mlp_out.shape)}")
        m = mlp_out.float()
        mlp_cos, mlp_cos_h, mlp_ratio = _cos(m, m[:, bos]), _cos(m, h[:, bos]), _median_ratio(m, bos)

    noise_max, primary_min = kind_thresholds(L, primary_frac=primary_frac, noise_frac=noise_frac)
    thresholds = {"noise_max": noise_max, "primary_min": primary_min, "cos": cos_threshold,
                  "norm_ratio": norm_ratio, "crowd_frac": crowd_frac, "primary_frac": primary_frac,
                  "noise_frac": noise_frac}

    def describe(pos: int, layers: list[int], kind: str) -> Sink:
        s = Sink(pos, layers, kind, token=None if tokens is None else str(tokens[pos]))
        if layers:
            s.mean_abs_cos = float(cos[layers, pos].abs().mean())
            s.norm_ratio = float(ratio[layers, pos].max())
            c = layers[0]
            if mlp_cos is not None:
                s.mlp_cos, s.mlp_cos_hidden = float(mlp_cos[c, pos]), float(mlp_cos_h[c, pos])
                s.mlp_norm_ratio = float(mlp_ratio[c, pos])
            if alpha is not None:
                s.sink_score = float(alpha[layers][:, :, pos].float().nanmean())
        return s

    sinks = [describe(bos, list(range(start, end)), "bos")]
    for pos in range(N):
        layers = [int(l) for l in torch.nonzero(sink[:, pos]).flatten()]
        if layers:
            sinks.append(describe(pos, layers, sink_kind(len(layers), L, primary_frac=primary_frac,
                                                         noise_frac=noise_frac)))
    return SecondarySinks(bos=bos, clip=(start, end), bos_norm=bos_norm, cos=cos, norm_ratio=ratio, sink=sink,
                          crowded_layers=crowded, criterion=criterion, thresholds=thresholds, sinks=sinks,
                          mlp_cos=mlp_cos, mlp_cos_hidden=mlp_cos_h, mlp_norm_ratio=mlp_ratio)


def merge_levels(results: Sequence[SecondarySinks]) -> dict[tuple[int, int], int]:
    """Levels counted over several sequences (the official heatmap pools every sample)."""
    out: dict[tuple[int, int], int] = {}
    for r in results:
        for k, v in r.levels().items():
            out[k] = out.get(k, 0) + v
    return out


# ------------------------------------------------------------------------------------------ run: the report

MODELS = ("smollm2", "gemma3", "minilm", "dinov2", "causallm")


def _assets():
    try:
        from attnlab.probes import assets
    except ImportError as e:
        raise RuntimeError(f"sinks: the real models need attnlab.probes.assets, which is not available ({e})") from e
    return assets


def _token_label(tokenizer, i: int) -> str:
    text = tokenizer.decode([int(i)])
    return repr(text)[1:-1] if text.strip() else repr(text)


@dataclass
class Prepared:
    """A model with its inputs: what `run` needs besides the thresholds."""

    name: str
    model: nn.Module
    inputs: Any
    labels: list[list[str]]               # per sequence, per token
    sequences: list[str]                  # a name per sequence
    bos: int = 0
    criterion: str = "auto"
    note: str = ""


def _train_char_lm(model: nn.Module, data: Tensor, *, steps: int, seq: int, batch: int, seed: int) -> float:
    """A few AdamW steps of next-character prediction on `data` (1-D ids); returns the last loss."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        x = torch.stack([data[s:s + seq] for s in starts])                         # (batch, seq)
        y = torch.stack([data[s + 1:s + seq + 1] for s in starts])
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def prepare(name: str, *, text_path=None, tokens: int = 512, windows: int = 1, device: str = "cpu",
            seed: int = 0, train_steps: int = 0) -> Prepared:
    """Load a named model (see MODELS) and build its inputs: `windows` consecutive windows of the
    text of `tokens` tokens each (the special tokens included), or the sample images (dinov2).
    causallm: an attnlab CausalLM trained for `train_steps` steps on the text's first 90%."""
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    names = [f"window{w}" for w in range(windows)] if windows > 1 else ["text"]
    if name in ("smollm2", "gemma3"):
        assets = _assets()
        model, tok = assets.load_smollm2() if name == "smollm2" else assets.load_gemma3()
        bos_id = assets.SMOLLM2_BOS if name == "smollm2" else tok.bos_token_id
        n = tokens - 1
        ids = tok(read_text(text_path)[: 12 * tokens * windows], add_special_tokens=False,
                  return_tensors="pt")["input_ids"][0]
        if ids.numel() < n * windows:
            raise ValueError(f"sinks: the text gives {ids.numel()} tokens, fewer than {windows} x {n}")
        bos = torch.full((windows, 1), bos_id)
        ids = torch.cat([bos, ids[: n * windows].view(windows, n)], 1)             # (windows, tokens): BOS first
        labels = [[_token_label(tok, i) for i in row] for row in ids]
        bos_name = "<|im_start|> (id 1) prepended as BOS" if name == "smollm2" else f"<bos> (id {bos_id}) first"
        # Gemma-3: the decoder stack alone (model.model): the 262k-vocab head is not needed for attention
        body = model if name == "smollm2" else model.model
        return Prepared(name, body.to(device), dict(input_ids=ids.to(device), use_cache=False), labels, names,
                        note=f"{windows} window(s) of tinyshakespeare's first {n * windows} tokens, {bos_name}")
    if name == "minilm":
        assets = _assets()
        model, tok = assets.load_minilm()
        n = min(tokens, assets.MINILM_MAX_LENGTH) - 2
        ids = tok(read_text(text_path)[: 12 * (n + 2) * windows], add_special_tokens=False, verbose=False,
                  return_tensors="pt")["input_ids"][0]
        if ids.numel() < n * windows:
            raise ValueError(f"sinks: the text gives {ids.numel()} tokens, fewer than {windows} x {n}")
        cls, sep = torch.full((windows, 1), tok.cls_token_id), torch.full((windows, 1), tok.sep_token_id)
        ids = torch.cat([cls, ids[: n * windows].view(windows, n), sep], 1)        # [CLS] ... [SEP]
        labels = [[_token_label(tok, i) for i in row] for row in ids]
        inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
        return Prepared(name, model.to(device), {k: v.to(device) for k, v in inputs.items()}, labels, names,
                        note=f"{windows} window(s) of tinyshakespeare's first {n * windows} tokens, [CLS] first, "
                             "[SEP] last")
    if name == "dinov2":
        assets = _assets()
        model = assets.load_dinov2()
        images, image_names, src = sample_images(4)
        pixels = assets.dinov2_preprocess(images, 224)
        side = pixels.shape[-1] // assets.DINOV2_PATCH
        labels = [["CLS"] + [f"p{r},{c}" for r in range(side) for c in range(side)] for _ in image_names]
        return Prepared(name, model.to(device), dict(pixel_values=pixels.to(device)), labels, image_names,
                        criterion="norm",
                        note=f"{src} at 224 x 224: CLS + {side * side} patch tokens; high-norm criterion")
    if name == "causallm":
        from attnlab.models import CausalLM
        text = read_text(text_path)
        vocab = sorted(set(text))
        index = {ch: i for i, ch in enumerate(vocab)}
        data = torch.tensor([index[ch] for ch in text])
        if data.numel() < tokens * windows:
            raise ValueError(f"sinks: the text has {data.numel()} characters, fewer than {windows} x {tokens}")
        torch.manual_seed(seed)
        model = CausalLM(len(vocab), 64, 4, 4, max_len=max(tokens, 128))
        loss = None
        if train_steps > 0:
            train = data[: int(0.9 * data.numel())]
            seq = min(tokens, train.numel() - 2)                 # train at the length it is probed at
            loss = _train_char_lm(model, train, steps=train_steps, seq=seq, batch=8, seed=seed)
        model.eval()
        ids = data[: tokens * windows].view(windows, tokens)
        labels = [[repr(vocab[i])[1:-1] for i in row] for row in ids]
        trained = (f"trained {train_steps} steps of 8 x {tokens} characters (last loss {loss:.2f})" if loss is not None
                   else "random init")
        return Prepared(name, model.to(device), ids.to(device), labels, names,
                        note=f"attnlab CausalLM (4 layers x 4 heads, width 64, seed {seed}, {trained}) on "
                             f"{windows} window(s) of tinyshakespeare's first {tokens * windows} characters")
    raise ValueError(f"sinks: unknown model {name!r}; known: {', '.join(MODELS)} (or pass a model and inputs)")


@dataclass
class Report:
    """What `run` computed for one model (before writing)."""

    prepared: Prepared
    scores: SinkScores
    found: list[SecondarySinks]           # per sequence, with the clipper
    unclipped: list[SecondarySinks]       # per sequence, every layer searched
    num_heads: int


def analyse(prepared: Prepared, *, eps: float = EPS, cos_threshold: float = COS_THRESHOLD,
            criterion: str | None = None, norm_ratio: float = NORM_RATIO, primary_frac: float = PRIMARY_FRAC,
            noise_frac: float = NOISE_FRAC) -> Report:
    scores, states = measure(prepared.model, prepared.inputs, eps=eps)
    crit = criterion or prepared.criterion
    opts = dict(bos=prepared.bos, cos_threshold=cos_threshold, criterion=crit, norm_ratio=norm_ratio,
                primary_frac=primary_frac, noise_frac=noise_frac)
    found, unclipped = [], []
    for b in range(states.hidden.shape[0]):
        mlp = None if states.mlp_out is None else states.mlp_out[b]
        labels = prepared.labels[b] if b < len(prepared.labels) else None
        for clip, dest in ((True, found), (False, unclipped)):
            dest.append(secondary_sinks(states.hidden[b], mlp_out=mlp, alpha=scores.alpha[b], tokens=labels,
                                        clip=clip, **opts))
    return Report(prepared, scores, found, unclipped, scores.alpha.shape[2])


def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _f(x, spec: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _kinds(results: Sequence[SecondarySinks]) -> dict[str, int]:
    out = {"primary": 0, "secondary": 0, "noise": 0}
    for r in results:
        for s in r.sinks:
            if s.kind in out:
                out[s.kind] += 1
    return out


def _mlp_contrast(r: SecondarySinks) -> tuple[float, float]:
    """Mean cos(mlp_out_t, mlp_out_BOS) of the non-noise sinks at their creation layers, and the
    mean |cos| of the other tokens (t > BOS, not sinks there) in the same layers."""
    if r.mlp_cos is None:
        return float("nan"), float("nan")
    sinks = [s for s in r.sinks if s.kind in ("primary", "secondary")]
    if not sinks:
        return float("nan"), float("nan")
    at = [r.mlp_cos[s.creation_layer, s.position] for s in sinks]
    others = []
    for l in sorted({s.creation_layer for s in sinks}):
        keep = ~r.sink[l]
        keep[: r.bos + 1] = False
        others.append(r.mlp_cos[l, keep].abs())
    rest = torch.cat(others) if others else torch.empty(0)
    return float(torch.stack(at).mean()), float(rest.mean()) if rest.numel() else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        v = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(v)
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in torch.unique(v):                                 # ties share their mean rank
            tie = v == value
            r[tie] = r[tie].mean()
        return r
    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float("nan") if den == 0 else float((a * b).sum()) / den


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + [
        "| " + " | ".join(_md(c) for c in row) + " |" for row in rows]


_CRITERION = {"auto": "the official cosine test; in a layer where more than {crowd_frac:.0%} of the tokens pass it, "
                      "also norm > {norm_ratio} x the layer's median token norm",
              "cos": "the official cosine test alone",
              "norm": "instead of the cosine: norm > {norm_ratio} x the layer's median token norm",
              "cos+norm": "the cosine test and norm > {norm_ratio} x the layer's median token norm"}


def markdown(rep: Report, eps: float) -> str:
    p, sc = rep.prepared, rep.scores
    L, h, N = sc.alpha.shape[1:]
    per_token = sc.per_token(eps)
    heads0 = int((sc.alpha[0, :, :, p.bos] > eps).sum())
    lines = [f"# Attention sinks: {p.name}", "",
             f"{type(p.model).__name__}, {L} layers x {h} heads; {len(p.sequences)} sequence(s) of {N} tokens "
             f"({', '.join(p.sequences)}). {p.note}.", "",
             "## Sink^eps (Gu et al. 2025, arXiv 2410.10781, Sec. 3)", "",
             f"alpha^(l,h)_k: the mean attention key k receives over the queries that can see it; Sink^{eps}_k: the "
             f"fraction of the {L * h} (layer, head) pairs with alpha > {eps}, averaged over the sequences.", "",
             f"**Model score: Sink^{eps}(first token) = {per_token[0]:.3f}** ({heads0} of {L * h} heads in "
             f"{p.sequences[0]}).", ""]
    mean_alpha = sc.alpha.nanmean(0).mean((0, 1))                                   # (N,)
    key = torch.nan_to_num(per_token, nan=-1.0).double() * 10 + torch.nan_to_num(mean_alpha, nan=0.0).double()
    top = torch.argsort(key, descending=True)[:8].tolist()                         # by Sink^eps, then mean alpha
    lines += _table(["position", "token", f"Sink^{eps}", "mean alpha over (l, h)"],
                    [[k, p.labels[0][k] if p.labels else "", _f(float(per_token[k])), _f(float(mean_alpha[k]))]
                     for k in top])
    r0, u0 = rep.found[0], rep.unclipped[0]
    after = slice(p.bos + 1, None)
    has_after = N > p.bos + 1
    a0 = sc.alpha[0, :, :, p.bos]                                                   # (L, h)
    lines += ["", f"Per layer ({p.sequences[0]}): alpha of the first token (mean and max over heads) and its heads "
              f"with alpha > {eps}; ||h_BOS||; the largest |cos(h_t, h_BOS)| and norm ratio of the tokens after it; "
              "the tokens that are sinks there (every layer searched).", ""]
    lines += _table(["layer", "alpha_0 mean", "alpha_0 max", "heads > eps", "norm(h_BOS)", "max abs cos",
                     "max norm ratio", "sinks", "in clipper"],
                    [[l, _f(float(a0[l].mean())), _f(float(a0[l].max())), int((a0[l] > eps).sum()),
                      _f(float(r0.bos_norm[l]), ".1f"),
                      _f(float(r0.cos[l, after].abs().max()) if has_after else None),
                      _f(float(r0.norm_ratio[l, after].max()) if has_after else None, ".2f"),
                      int(u0.sink[l].sum()), "yes" if r0.clip[0] <= l < r0.clip[1] else ""] for l in range(L)])
    th = r0.thresholds
    lines += ["", "## Secondary sinks (Wong et al. 2025, arXiv 2512.22213; official "
              "JeffreyWong20/Secondary-Attention-Sinks)", "",
              f"The official test: a token is a sink in a layer when |cos(h_t, h_BOS)| > {th['cos']}. Criterion "
              f"`{r0.criterion}`: {_CRITERION[r0.criterion].format(**th)}. Kinds by lifetime, relative to depth: "
              f"noise <= {th['noise_max']}, secondary {th['noise_max'] + 1}..{th['primary_min'] - 1}, primary >= "
              f"{th['primary_min']} layers (noise_frac {th['noise_frac']}, primary_frac {th['primary_frac']}; the "
              "official constants 4 and L - 15 are these at L = 30).", ""]
    rows = []
    for name, r, u in zip(p.sequences, rep.found, rep.unclipped):
        k, ku = _kinds([r]), _kinds([u])
        rows.append([name, f"{r.clip[0]}..{r.clip[1] - 1}", ", ".join(map(str, r.crowded_layers)) or "-",
                     _f(r.max_abs_cos()), k["primary"], k["secondary"], k["noise"], ku["primary"], ku["secondary"],
                     ku["noise"]])
    lines += _table(["sequence", "clipper (layers)", "crowded layers", "max abs cos in clipper", "primary",
                     "secondary", "noise", "every layer: primary", "secondary", "noise"], rows)
    for title, results in (("inside the clipper (official)", rep.found),
                           ("with every layer searched (clip=False)", rep.unclipped)):
        found = [(name, s) for name, r in zip(p.sequences, results) for s in r.sinks if s.kind != "noise"]
        found.sort(key=lambda x: (x[1].kind != "bos", -x[1].lifetime, x[1].position))
        rows = [[name, s.position, s.token or "", s.kind, s.creation_layer, s.lifetime, _f(s.mean_abs_cos),
                 _f(s.norm_ratio, ".2f"), _f(s.mlp_cos), _f(s.mlp_cos_hidden), _f(s.mlp_norm_ratio, ".2f"),
                 _f(s.sink_score), _f(float(per_token[s.position]))] for name, s in found[:25]]
        lines += ["", f"### Sinks {title}", ""]
        lines += _table(["sequence", "position", "token", "kind", "creation layer", "lifetime", "mean abs cos",
                         "norm ratio", "MLP cos (BOS MLP)", "MLP cos (h_BOS)", "MLP norm ratio", "sink score",
                         f"Sink^{eps}"], rows)
        if len(found) > 25:
            lines.append(f"\n{len(found) - 25} more in the JSON.")
        contrast = [c for c in (_mlp_contrast(r) for r in results) if not math.isnan(c[0])]
        if contrast:
            mean_sink = sum(a for a, _ in contrast) / len(contrast)
            rest = [b for _, b in contrast if not math.isnan(b)]
            lines += ["", f"MLP alignment: at their creation layers the primary and secondary sinks' MLP outputs have "
                      f"cos {mean_sink:.3f} (mean) with the BOS's MLP output; the other tokens' |cos| in the same "
                      f"layers: {_f(sum(rest) / len(rest) if rest else None)}."]
        secondary = [s for _, s in found if s.kind == "secondary" and s.sink_score is not None
                     and s.mlp_norm_ratio is not None]
        if len(secondary) >= 3:
            rho = spearman([s.mlp_norm_ratio for s in secondary], [s.sink_score for s in secondary])
            lines += ["", f"Norm and score (Wong et al.'s finding 2): Spearman rho {rho:.2f} between the MLP output "
                      f"norm at creation and the sink score, over the {len(secondary)} secondary sinks."]
    lines += ["", "Sink score: alpha averaged over the heads and the sink's layers. Norm ratio: ||h_t|| over the "
              "layer's median token norm (the max over its layers). MLP columns: at the creation layer.", ""]
    return "\n".join(lines)


def _plot_levels(rep: Report, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    L = rep.scores.alpha.shape[1]
    th = rep.found[0].thresholds
    grids = []
    for results in (rep.found, rep.unclipped):
        grid = torch.zeros(L + 1, L)                                    # [lifetime, creation layer]
        for (c, n), k in merge_levels(results).items():
            grid[n, c] += k
        grids.append(grid)
    norm = LogNorm(vmin=1, vmax=max(2.0, max(float(g.max()) for g in grids)))
    fig = Figure(figsize=(13, 5.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, grid, results, title in ((axes[0], grids[0], rep.found, "inside the BOS-norm clipper (official)"),
                                     (axes[1], grids[1], rep.unclipped, "every layer searched")):
        shown = grid.numpy().copy()
        shown[shown == 0] = float("nan")
        im = ax.imshow(shown, origin="lower", aspect="auto", cmap="viridis", norm=norm,
                       extent=(-0.5, L - 0.5, -0.5, L + 0.5), interpolation="nearest")
        for c in range(L):
            for n in range(1, L + 1):
                if grid[n, c] > 0:
                    dark = norm(float(grid[n, c])) < 0.6                       # viridis: light above
                    ax.text(c, n, str(int(grid[n, c])), ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
        bos = {(r.sinks[0].creation_layer, r.sinks[0].lifetime) for r in results if r.sinks and r.sinks[0].layers}
        if bos:
            ax.scatter([c for c, _ in bos], [n for _, n in bos], s=160, facecolors="none", edgecolors="red",
                       marker="o", label="the BOS (primary sink)")
        ax.axhline(th["noise_max"] + 0.5, color="tab:gray", ls="--", lw=1, label=f"noise <= {th['noise_max']}")
        ax.axhline(th["primary_min"] - 0.5, color="tab:red", ls="--", lw=1, label=f"primary >= {th['primary_min']}")
        ax.set_title(title)
        ax.set_xlabel("creation layer (first layer the token is a sink in)")
        ax.set_xlim(-0.5, L - 0.5)
        ax.set_ylim(0.5, L + 0.5)
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel("lifetime (layers the token is a sink in)")
    fig.colorbar(im, ax=list(axes), label="sinks (count, log scale)")
    fig.suptitle(f"{rep.prepared.name}: sink levels over {len(rep.found)} sequence(s); criterion "
                 f"{rep.found[0].criterion}, secondary between the dashed lines")
    save_figure(fig, path, dpi=110)


def _plot_overview(rep: Report, path: Path, eps: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    p, sc, r, u = rep.prepared, rep.scores, rep.found[0], rep.unclipped[0]
    L, h, N = sc.alpha.shape[1:]
    fig = Figure(figsize=(15, 9), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots(2, 2)
    im = ax[0, 0].imshow(sc.alpha[:, :, :, p.bos].nanmean(0).T.numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1,
                         origin="lower")
    ax[0, 0].set_title(f"alpha of the first token per (layer, head); Sink^{eps} = {sc.model_score(eps):.3f}")
    ax[0, 0].set_xlabel("layer")
    ax[0, 0].set_ylabel("head")
    fig.colorbar(im, ax=ax[0, 0], label="mean attention received")
    layers = range(L)
    ax[0, 1].semilogy(layers, r.bos_norm.numpy(), "o-", label="||h_BOS||")
    med = (r.bos_norm / r.norm_ratio[:, p.bos]).numpy()
    ax[0, 1].semilogy(layers, med, "s-", label="median token norm")
    ax[0, 1].axvspan(r.clip[0] - 0.5, r.clip[1] - 0.5, color="tab:green", alpha=0.15, label="clipper")
    ax[0, 1].set_title("residual-stream norms (first sequence)")
    ax[0, 1].set_xlabel("layer")
    ax[0, 1].set_ylabel("l2 norm")
    ax[0, 1].legend()
    after = slice(p.bos + 1, None)
    if N > p.bos + 1:
        ax[1, 0].plot(layers, r.cos[:, after].abs().max(1).values.numpy(), "o-", label="max |cos(h_t, h_BOS)|")
        ax[1, 0].axhline(r.thresholds["cos"], color="tab:red", ls="--", label="threshold")
        ax[1, 0].axvspan(r.clip[0] - 0.5, r.clip[1] - 0.5, color="tab:green", alpha=0.15)
        tw = ax[1, 0].twinx()
        tw.plot(layers, r.norm_ratio[:, after].max(1).values.numpy(), "s:", color="tab:purple", label="max norm ratio")
        tw.set_ylabel("max ||h_t|| / median", color="tab:purple")
        lines = ax[1, 0].get_legend_handles_labels()
        extra = tw.get_legend_handles_labels()
        ax[1, 0].legend(lines[0] + extra[0], lines[1] + extra[1], loc="lower left", fontsize=8)
    ax[1, 0].set_ylim(0, 1.02)
    ax[1, 0].set_xlabel("layer")
    ax[1, 0].set_ylabel("|cos|")
    ax[1, 0].set_title("tokens after the BOS: alignment and norm")
    im = ax[1, 1].imshow(r.cos.abs().T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower",
                         interpolation="nearest")
    ys, xs = torch.nonzero(u.sink.T, as_tuple=True)
    ax[1, 1].scatter(xs.numpy(), ys.numpy(), s=6, c="red", marker="x", label="sink (every layer)")
    ax[1, 1].set_title("|cos(h_t, h_BOS)| per layer and token; x: sinks")
    ax[1, 1].set_xlabel("layer")
    ax[1, 1].set_ylabel("token position")
    if len(ys):
        ax[1, 1].legend(loc="upper right")
    fig.colorbar(im, ax=ax[1, 1], label="|cos|")
    fig.suptitle(f"{p.name}: attention sinks ({p.sequences[0]})")
    save_figure(fig, path, dpi=100)


def to_json(rep: Report, eps: float) -> dict:
    p, sc = rep.prepared, rep.scores
    L, h, N = sc.alpha.shape[1:]
    return {
        "model": p.name, "class": type(p.model).__name__, "layers": L, "heads": h, "tokens": N,
        "sequences": p.sequences, "note": p.note, "eps": eps,
        "sink_eps": {"model_score": round(sc.model_score(eps), 4),
                     "per_token": [_num(x) for x in sc.per_token(eps)],
                     "per_layer_first_token": [_num(x) for x in sc.per_layer(eps)[:, p.bos]],
                     "per_head_first_token": [[_num(x) for x in row] for row in sc.per_head(eps)[:, :, p.bos]],
                     "alpha_first_token": [[_num(x) for x in row] for row in sc.alpha[:, :, :, p.bos].nanmean(0)]},
        "secondary": [dict(sequence=name, **r.to_dict()) for name, r in zip(p.sequences, rep.found)],
        "secondary_every_layer": [dict(sequence=name, **r.to_dict()) for name, r in zip(p.sequences, rep.unclipped)],
        "labels": p.labels[0] if p.labels else None,
    }


def run(model: str | nn.Module, *, out: Path, inputs=None, name: str | None = None, labels=None,
        text_path=None, tokens: int = 512, windows: int = 1, train_steps: int = 0, eps: float = EPS,
        cos_threshold: float = COS_THRESHOLD, criterion: str | None = None, norm_ratio: float = NORM_RATIO,
        primary_frac: float = PRIMARY_FRAC, noise_frac: float = NOISE_FRAC, bos: int = 0, device: str = "cpu",
        progress: Callable[[str], None] | None = None) -> dict:
    """The sinks probe on one model: writes sinks-<name>.md, .json, -levels.png and -overview.png in `out`.

    model: a name in MODELS (the real models need attnlab.probes.assets and their packages; text
    from `text_path`, default ../shared/data/tinyshakespeare/input.txt, cut into `windows`
    windows of `tokens` tokens; causallm trains `train_steps` steps first, 0: random init) or an
    nn.Module with `inputs` (a dict of keyword arguments, or a tensor), optional `labels` (per
    sequence, per token) and `bos` (the primary sink's position). criterion: None takes the
    model's default ("norm" for dinov2, "auto" otherwise). progress(stage) is called before each
    stage. Returns the JSON summary, with the paths written under "files".
    """
    say = progress or (lambda stage: None)
    if isinstance(model, str):
        say(f"loading {model}")
        prepared = prepare(model, text_path=text_path, tokens=tokens, windows=windows, device=device,
                           train_steps=train_steps)
    else:
        if inputs is None:
            raise ValueError("sinks.run: a model object needs inputs=")
        prepared = Prepared(name or type(model).__name__, model, inputs, list(labels or []), [], bos=bos,
                            criterion="auto", note="inputs given by the caller")
    if criterion is not None and criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    prepared.bos = bos if not isinstance(model, str) else prepared.bos
    say("forward and detection")
    rep = analyse(prepared, eps=eps, cos_threshold=cos_threshold, criterion=criterion, norm_ratio=norm_ratio,
                  primary_frac=primary_frac, noise_frac=noise_frac)
    if not prepared.sequences:
        prepared.sequences = [f"seq{b}" for b in range(len(rep.found))]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"sinks-{prepared.name}"
    files = {"markdown": out / f"{stem}.md", "json": out / f"{stem}.json", "levels": out / f"{stem}-levels.png",
             "overview": out / f"{stem}-overview.png"}
    say("writing")
    from attnlab._io import write_text
    summary = to_json(rep, eps)
    summary["files"] = {k: str(v) for k, v in files.items()}
    write_text(files["markdown"], markdown(rep, eps))
    write_text(files["json"], json.dumps(summary, indent=1) + "\n")
    _plot_levels(rep, files["levels"])
    _plot_overview(rep, files["overview"], eps)
    return summary


__all__ = ["EPS", "COS_THRESHOLD", "CRITERIA", "MODELS", "SinkScores", "States", "Sink", "SecondarySinks",
           "Prepared", "Report", "visible_from_scores", "received_attention", "measure", "sink_clipper",
           "kind_thresholds", "sink_kind", "pick_bos", "secondary_sinks", "merge_levels", "spearman",
           "default_text_path", "read_text", "sample_images", "prepare", "analyse", "markdown", "to_json", "run"]
