"""SoftPAG and HeadHunter: perturbation guidance through chosen attention heads, and the greedy
search that chooses them.

Paper: Ahn, Kang, Lee, Kim, Jang, Min, Lee, Paul & Kim, "Where and How to Perturb: On the Design
of Perturbation Guidance in Diffusion and Flow Models" (NeurIPS 2025; first posted as
"Fine-Grained Perturbation Guidance via Attention Head Selection", arXiv 2506.10978). Official
code: cvlab-kaist/HeadHunter (read, not copied). PAG itself: Ahn et al., "Self-Rectifying
Diffusion Sampling with Perturbed-Attention Guidance" (ECCV 2024): a second forward whose
self-attention map is the identity, and guidance away from its prediction.

    soft_pag_edits(heads, u)   capture edits of hook_pattern: A <- (1 - u) A + u I on the chosen
                               heads (SoftPAG; the official README's linear interpolation, the
                               default of `[PROB_PERTURB]attention_identity@scale=u` in
                               diffusers/.../attention_processor.py). u = 1 is PAG's identity map
                               (each query attends only to itself, so the head's output z equals
                               its value v); u = 0 changes nothing. Layer-level PAG = every head of
                               the layer ({layer: None}).
    guided_eps(model, x, t, y, heads, u, w, cfg_scale)
                               eps = eps_u + s (eps_c - eps_u) + w (eps_c - eps_p): classifier-free
                               guidance first (s = cfg_scale, eps_u at the null class), then
                               perturbation guidance away from eps_p, the conditional prediction
                               under the edits. This is the order and the operands of the official
                               pipeline (diffusers/.../pipeline_stable_diffusion_3.py: `noise_pred
                               = noise_pred_uncond + guidance_scale * (noise_pred_text -
                               noise_pred_uncond)`, then `noise_pred + (noise_pred_text -
                               noise_pred_perturbed) * perturb_guidance_scale`, the perturbed pass
                               on the conditional prompt). Without CFG (s = 1) it is
                               (1 + w) eps_c - w eps_p.
    ddim_sample(eps_fn, schedule, shape, steps, eta)
                               DDIM (Song, Meng & Ermon 2021, Eq. 12, with sigma of Eq. 16; eta = 1
                               is DDPM-like ancestral sampling) on "trailing" timesteps (T-1 first;
                               Lin et al. 2024, Table 2), x0 clipped to [-clip, clip] with eps
                               recomputed from the clipped x0 (diffusers' DDIM with
                               use_clipped_model_output).
    head_hunter(candidates, objective, rounds, top_k)
                               HeadHunter's greedy search (official pipeline_distributed.py): each
                               round scores objective(selected + [c]) for every candidate c not yet
                               selected, and adds the top_k of them, for `rounds` rounds. The
                               objective is pluggable (the paper's is PickScore of the samples).
    softpag_nll(model, ids, heads, u)
                               a causal LM's next-token NLL (nats) under the same edits: SoftPAG on
                               a language model as a stand-in where no diffusion model installs.
    run(model, out=...)        NLL vs u on a causal LM (default SmolLM2-135M): one head per layer,
                               every head, and layer-level PAG layer by layer; writes perturb.md,
                               perturb.json and perturb_nll.png.

Exactness: the edit is computed as (1 - u) * A + u * I, so u = 0 returns A bit for bit and u = 1
returns I bit for bit (0 * A = 0 for finite A). `guided_eps` runs its conditional, unconditional
and perturbed inputs in ONE batched forward inside one capture (so all three take the same
eager attention path) and perturbs only the perturbed rows, as diffusers' PAG pipelines batch
[uncond, cond, perturbed].
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab._io import save_figure, write_text
from attnlab.probes.capture import Edit, Hook, capture



# --------------------------------------------------------------------------- the perturbation

def heads_by_layer(heads) -> dict[int, list[int] | None]:
    """{layer: [head, ...] or None (every head)} from that form or from [(layer, head), ...]
    (a (layer, None) item also means every head of the layer)."""
    if isinstance(heads, dict):
        out = {}
        for layer, hs in heads.items():
            out[int(layer)] = None if hs is None else sorted({int(h) for h in hs})
        return out
    out: dict[int, list[int] | None] = {}
    for item in heads:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise TypeError(f"heads must be {{layer: [heads] or None}} or [(layer, head), ...], got item {item!r}")
        layer, head = int(item[0]), item[1]
        if head is None or out.get(layer, []) is None:
            out[layer] = None
        else:
            out[layer] = sorted(set(out.get(layer, [])) | {int(head)})
    return out


def layer_heads(layers: Iterable[int]) -> dict[int, None]:
    """Layer-level PAG: every head of each of `layers`."""
    return {int(l): None for l in layers}


def identity_pattern(N: int, M: int, *, dtype=torch.float32, device=None) -> Tensor:
    """(N, M) with a 1 where query i meets its own position: key M - N + i (M > N under a KV cache)."""
    if M < N:
        raise ValueError(f"identity_pattern: {N} queries cannot each find their own key among {M}")
    eye = torch.zeros(N, M, dtype=dtype, device=device)
    i = torch.arange(N, device=device)
    eye[i, i + (M - N)] = 1
    return eye


def soft_pag_edits(heads, u: float, *, rows: slice | Sequence[int] | Tensor | None = None) -> dict[str, Edit]:
    """capture edits applying SoftPAG, A <- (1 - u) A + u I, to the pattern of `heads`.

    heads: {layer: [head, ...] or None (all heads: layer-level PAG)} or [(layer, head), ...].
    u in [0, 1]: 0 leaves A exactly, 1 is PAG's identity attention. rows: the batch rows to
    perturb (None: all), so that one batched forward can carry clean and perturbed inputs."""
    u = float(u)
    if not 0.0 <= u <= 1.0:
        raise ValueError(f"soft_pag_edits: u must lie in [0, 1] (0: no change, 1: identity attention), got {u}")
    edits = {}
    for layer, hs in heads_by_layer(heads).items():
        def fn(a: Tensor, hook: Hook, hs=hs) -> Tensor:
            B, h, N, M = a.shape                                           # (B, h, N, M)
            if hs is not None and hs and max(hs) >= h:
                raise IndexError(f"soft_pag_edits: head {max(hs)} asked of layer {hook.layer} with {h} heads")
            chosen = torch.zeros(B, h, dtype=torch.bool, device=a.device)
            rows_index = torch.arange(B, device=a.device) if rows is None else torch.arange(B, device=a.device)[rows]
            heads_index = torch.arange(h, device=a.device) if hs is None else torch.tensor(hs, device=a.device,
                                                                                          dtype=torch.long)
            chosen[rows_index[:, None], heads_index[None, :]] = True
            mixed = (1.0 - u) * a + u * identity_pattern(N, M, dtype=a.dtype, device=a.device)
            return torch.where(chosen[:, :, None, None], mixed, a)
        edits[f"blocks.{layer}.attn.hook_pattern"] = fn
    return edits


# --------------------------------------------------------------------------- guidance

def guided_eps(model: nn.Module, x: Tensor, t: Tensor, y: Tensor, heads=None, u: float = 1.0, w: float = 0.0, *,
               cfg_scale: float = 1.0, null_class: int | None = None, record: list | None = None) -> Tensor:
    """The guided noise prediction eps_u + s (eps_c - eps_u) + w (eps_c - eps_p) (see the module doc).

    model(x, t, y) -> eps, an nn.Module capture can read (e.g. attnlab.models.DiT). x (B, ...),
    t (B,) or a scalar, y (B,). The unconditional pass runs only when cfg_scale != 1 (at
    null_class, default model.null_class), the perturbed one only when w != 0 and heads are
    given. record: a list to append ||eps_c - eps_p|| / ||eps_c|| to (the relative size of the
    perturbation's change), when the perturbed pass runs."""
    B = x.shape[0]
    t = t.expand(B) if t.dim() == 0 else t
    use_cfg = float(cfg_scale) != 1.0
    use_pag = float(w) != 0.0 and heads is not None and len(heads_by_layer(heads)) > 0
    xs, ys = [x], [y]
    if use_cfg:
        null = getattr(model, "null_class", None) if null_class is None else null_class
        if null is None:
            raise ValueError("guided_eps: classifier-free guidance needs null_class= (the model has no null_class)")
        xs.append(x)
        ys.append(torch.full_like(y, int(null)))
    if use_pag:
        xs.append(x)
        ys.append(y)
    edits = soft_pag_edits(heads, u, rows=slice((len(xs) - 1) * B, len(xs) * B)) if use_pag else {}
    with capture(model, names=[], edits=edits):
        out = model(torch.cat(xs), t.repeat(len(xs)), torch.cat(ys))
    parts = out.split(B)
    eps_c = parts[0]
    eps = eps_c
    if use_cfg:
        eps = parts[1] + float(cfg_scale) * (eps_c - parts[1])
    if use_pag:
        eps_p = parts[-1]
        eps = eps + float(w) * (eps_c - eps_p)
        if record is not None:
            record.append(float((eps_c - eps_p).detach().norm() / eps_c.detach().norm().clamp_min(1e-12)))
    return eps


@dataclass
class Guidance:
    """An eps_fn(x, t) for `ddim_sample`: `guided_eps` with fixed labels and settings.

    heads=None or w=0: no perturbation guidance; cfg_scale=1: no classifier-free guidance.
    `history` collects ||eps_c - eps_p|| / ||eps_c|| per call."""

    model: nn.Module
    y: Tensor
    heads: Any = None
    u: float = 1.0
    w: float = 0.0
    cfg_scale: float = 1.0
    null_class: int | None = None
    history: list = field(default_factory=list)

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return guided_eps(self.model, x, t, self.y, self.heads, self.u, self.w, cfg_scale=self.cfg_scale,
                          null_class=self.null_class, record=self.history)

    @property
    def mean_relative_change(self) -> float:
        return sum(self.history) / len(self.history) if self.history else 0.0


# --------------------------------------------------------------------------- sampler

def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` timesteps from T-1 down, evenly spaced ("trailing": T-1, T-1-T/steps, ...)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"ddim: steps must lie in [1, {num_timesteps}], got {steps}")
    return [num_timesteps - 1 - round(i * num_timesteps / steps) for i in range(steps)]


@torch.no_grad()
def ddim_sample(eps_fn: Callable[[Tensor, Tensor], Tensor], schedule, shape: Sequence[int], *, steps: int = 20,
                eta: float = 0.0, generator: torch.Generator | None = None, clip: float | None = 1.0,
                x_T: Tensor | None = None, device=None, dtype=torch.float32) -> Tensor:
    """Sample x_0 (shape) with DDIM from x_T ~ N(0, I) (or x_T given).

    eps_fn(x_t, t (B,) long) -> eps; schedule: anything with `.alpha_bar` (T,) and `.timesteps`
    (attnlab.models.NoiseSchedule). Per step t -> s (s the next timestep, alpha_bar = 1 after the
    last):  x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t), clipped;  eps re-derived from it;
    sigma = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s);
    x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - sigma^2) eps + sigma z."""
    if eta < 0:
        raise ValueError(f"ddim_sample: eta must be >= 0, got {eta}")
    alpha_bar = schedule.alpha_bar
    ts = ddim_timesteps(schedule.timesteps, steps)
    x = torch.randn(tuple(shape), generator=generator, dtype=dtype, device=device) if x_T is None else x_T.clone()
    B = x.shape[0]
    for i, t in enumerate(ts):
        ab_t = float(alpha_bar[t])
        ab_s = float(alpha_bar[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = eps_fn(x, torch.full((B,), t, dtype=torch.long, device=x.device))
        x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
            eps = (x - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        sigma = eta * math.sqrt((1 - ab_s) / (1 - ab_t)) * math.sqrt(max(0.0, 1 - ab_t / ab_s))
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(0.0, 1 - ab_s - sigma ** 2)) * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x


# --------------------------------------------------------------------------- HeadHunter

@dataclass
class HuntRound:
    round: int
    scores: dict                 # candidate -> objective(selected before this round + [candidate])
    chosen: list                 # the top_k added this round, best first
    selected: list               # every candidate selected so far


@dataclass
class HuntResult:
    selected: list               # in the order chosen
    rounds: list[HuntRound]
    evaluations: int             # objective calls

    def to_json(self) -> dict:
        return {"selected": [list(c) if isinstance(c, tuple) else c for c in self.selected],
                "evaluations": self.evaluations,
                "rounds": [{"round": r.round, "chosen": [list(c) if isinstance(c, tuple) else c for c in r.chosen],
                            "scores": [[list(c) if isinstance(c, tuple) else c, s] for c, s in r.scores.items()]}
                           for r in self.rounds]}


def head_hunter(candidates: Sequence[Hashable], objective: Callable[[list], float], rounds: int, top_k: int, *,
                maximize: bool = True, progress: Callable[[int, int, str], None] | None = None) -> HuntResult:
    """HeadHunter's greedy search (official pipeline_distributed.py: generate_images /
    select_topk_heads): for each of `rounds` rounds, objective(selected + [c]) for every candidate c
    not yet selected; the top_k best (ties: candidate order) join `selected`.

    candidates: e.g. [(layer, head), ...]; objective: a set (list, in selection order) -> score,
    higher is better unless maximize=False. Stops early when no candidate is left."""
    if rounds < 1 or top_k < 1:
        raise ValueError(f"head_hunter: rounds and top_k must be >= 1, got {rounds} and {top_k}")
    candidates = list(candidates)
    if len(set(candidates)) != len(candidates):
        raise ValueError("head_hunter: candidates must be distinct")
    selected: list = []
    history: list[HuntRound] = []
    calls = 0
    total = sum(max(0, len(candidates) - r * top_k) for r in range(rounds))
    for r in range(rounds):
        pool = [c for c in candidates if c not in selected]
        if not pool:
            break
        scores = {}
        for c in pool:
            scores[c] = float(objective(selected + [c]))
            calls += 1
            if progress is not None:
                progress(calls, total, f"HeadHunter round {r + 1}/{rounds}")
        ranked = sorted(pool, key=lambda c: -scores[c] if maximize else scores[c])   # stable: ties keep order
        chosen = ranked[:top_k]
        selected += chosen
        history.append(HuntRound(r, scores, chosen, list(selected)))
    return HuntResult(selected, history, calls)


# --------------------------------------------------------------------------- the language stand-in

def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    out = model(input_ids=ids) if _is_hf(model) else model(ids)
    return out.logits if hasattr(out, "logits") else out


def _is_hf(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


@torch.no_grad()
def softpag_nll(model: nn.Module, ids: Tensor, heads, u: float) -> float:
    """Mean next-token NLL (nats) of a causal LM on ids (B, N) with SoftPAG(u) on `heads`
    (a HuggingFace causal LM, or attnlab's CausalLM: ids -> logits). heads=None or {}: unedited,
    through capture all the same (the same attention path as the edited runs)."""
    edits = soft_pag_edits(heads, u) if heads else {}
    with capture(model, names=[], edits=edits):
        logits = _logits(model, ids)                                            # (B, N, V)
    return float(F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten()))


def _num_layers_heads(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "num_hidden_layers"):
        return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
    blocks = model.body.blocks if hasattr(model, "body") else model.blocks
    return len(blocks), int(blocks[0].attn.num_heads)


def _plot_nll(doc: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    per_layer = doc.get("per_layer_pag")
    fig = Figure(figsize=(11 if per_layer else 6, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2 if per_layer else 1, 1)
    us = doc["u"]
    for key, label in (("one_head_per_layer", f"head {doc['head']} of every layer"),
                       ("all_heads", "every head of every layer")):
        ax.plot(us, doc[key], marker="o", label=label)
    ax.axhline(doc["base_nll"], color="0.4", linestyle="--", linewidth=1, label="unedited")
    ax.set_xlabel("u  (A <- (1-u) A + u I)")
    ax.set_ylabel("next-token NLL (nats)")
    ax.set_yscale("log")
    ax.set_title(f"{doc['model']}: SoftPAG strength vs NLL", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if per_layer:
        ax2 = fig.add_subplot(1, 2, 2)
        ax2.bar(range(len(per_layer)), [v - doc["base_nll"] for v in per_layer], color="tab:red")
        ax2.set_xlabel("layer given identity attention in every head (layer-level PAG, u = 1)")
        ax2.set_ylabel("NLL rise over unedited (nats)")
        ax2.set_title("layer-level PAG, one layer at a time", fontsize=10)
        ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)


def _markdown(doc: dict) -> str:
    lines = [f"# SoftPAG on a language model: {doc['model']}", "",
             f"{doc['layers']} layers x {doc['heads']} heads; {doc['tokens']} tokens of {doc['text']}; "
             f"next-token NLL in nats (unedited: {doc['base_nll']:.4f}); {doc['seconds']:.0f} s.", "",
             "SoftPAG (Ahn et al. 2025, cvlab-kaist/HeadHunter): A <- (1-u) A + u I on the chosen heads' "
             "attention maps; u = 1 is PAG's identity attention (each token attends only to itself).", "",
             f"| u | head {doc['head']} of every layer | every head of every layer |", "| --- | --- | --- |"]
    for u, a, b in zip(doc["u"], doc["one_head_per_layer"], doc["all_heads"]):
        lines.append(f"| {u:g} | {a:.4f} | {b:.4f} |")
    if doc.get("per_layer_pag"):
        lines += ["", "Layer-level PAG (every head of one layer at u = 1), NLL rise over unedited:", "",
                  "| layer | NLL | rise |", "| --- | --- | --- |"]
        for l, v in enumerate(doc["per_layer_pag"]):
            lines.append(f"| {l} | {v:.4f} | {v - doc['base_nll']:+.4f} |")
    lines += ["", "Files: " + ", ".join(Path(f).name for f in doc["files"]), ""]
    return "\n".join(lines)


def run(model_name_or_model="smollm2", *, out: Path, tokenizer=None, ids: Tensor | None = None,
        text_path=None, tokens: int = 256, us: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), head: int = 0,
        per_layer: bool = True, progress: Callable[..., None] | None = None) -> dict:
    """SoftPAG's NLL vs u on a causal LM; writes perturb.md, perturb.json and perturb_nll.png into `out`.

    model_name_or_model: "smollm2" or "gemma3" (attnlab.probes.assets), a HuggingFace causal-LM folder, or a
    model (a HuggingFace causal LM with tokenizer=, or any causal LM with ids= given). The text is
    tinyshakespeare (../shared/data, or text_path): BOS (where the tokenizer has one) + the first
    `tokens` tokens. Sweeps u over `us` on head `head` of every layer and on every head; with
    per_layer, also layer-level PAG (u = 1 on every head) one layer at a time.
    Returns the JSON document, with "files"."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = str(model_name_or_model) if isinstance(model_name_or_model, (str, Path)) else \
        type(model_name_or_model).__name__
    bos = None
    if isinstance(model_name_or_model, (str, Path)):
        from attnlab.probes import assets
        model, tokenizer, name, bos = assets.load_causal_lm(model_name_or_model)
    else:
        model = model_name_or_model
    model.eval()
    text_name = "the given ids"
    if ids is None:
        if tokenizer is None:
            raise ValueError("perturb.run: give tokenizer= (or ids=) with a model object")
        from attnlab.probes.inputs import default_text_path, read_text
        text = read_text(text_path)
        text_name = Path(text_path or default_text_path()).name
        ids = tokenizer(text[:tokens * 12], return_tensors="pt")["input_ids"]
        if bos is None:
            bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and int(ids[0, 0]) != bos:
            ids = torch.cat([torch.tensor([[bos]]), ids], dim=1)
        ids = ids[:, :tokens]
    L, h = _num_layers_heads(model)
    if not 0 <= head < h:
        raise ValueError(f"perturb.run: head {head} does not exist in a model of {h} heads per layer")
    us = [float(u) for u in us]
    jobs = len(us) * 2 + 1 + (L if per_layer else 0)
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, jobs, what)

    base = softpag_nll(model, ids, None, 0.0)
    tick("unedited")
    one, every = [], []
    for u in us:
        one.append(softpag_nll(model, ids, {l: [head] for l in range(L)}, u))
        tick(f"u={u:g}, one head per layer")
        every.append(softpag_nll(model, ids, layer_heads(range(L)), u))
        tick(f"u={u:g}, every head")
    layers = []
    if per_layer:
        for l in range(L):
            layers.append(softpag_nll(model, ids, layer_heads([l]), 1.0))
            tick(f"layer {l} PAG")
    files = [str(out / "perturb.md"), str(out / "perturb.json"), str(out / "perturb_nll.png")]
    doc = {"probe": "perturb", "model": name, "layers": L, "heads": h, "tokens": int(ids.shape[1]),
           "text": text_name, "head": head, "u": us, "base_nll": base, "one_head_per_layer": one,
           "all_heads": every, "per_layer_pag": layers or None,
           "source": "SoftPAG A <- (1-u) A + u I (Ahn et al. 2025, cvlab-kaist/HeadHunter README, "
                     "attention_processor.py @scale=u); PAG's identity map at u = 1 (Ahn et al. 2024)",
           "seconds": time.perf_counter() - t0, "files": files}
    _plot_nll(doc, out / "perturb_nll.png")
    write_text(out / "perturb.json", json.dumps(doc, indent=1) + "\n")
    write_text(out / "perturb.md", _markdown(doc))
    return doc


__all__ = ["soft_pag_edits", "heads_by_layer", "layer_heads", "identity_pattern", "guided_eps", "Guidance",
           "ddim_timesteps", "ddim_sample", "head_hunter", "HuntResult", "HuntRound", "softpag_nll", "run"]
