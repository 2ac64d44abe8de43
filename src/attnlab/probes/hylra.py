"""HyLRA: hybrid layer-reuse attention for a pretrained causal LM (profile, policy, block-sparse inference).

Paper: "HyLRA: Hybrid Layer Reuse Attention" (2026, arXiv 2602.00777): sensitive layers keep full
attention, the others attend to top-k key blocks, and tolerant layers reuse the block indices an
earlier layer chose instead of computing their own; the policy comes from an offline profile and a
dynamic programme. Released code: ModelEngine-Group/unified-cache-management, where the method is
"RALS" (`ucm/sparse/gsa_on_device/tools/main.py`, class RALS; runtime in `gsa_on_device.py`,
`hamming_topk.py`). Paper names vs code names: sensitive = "rollback" layers, fresh top-k =
"hamming" layers, reuse = "skip" layers.

What is the code's and what is ours:

| step | released code | here |
| --- | --- | --- |
| data | post-RoPE q, k dumped from vLLM decode steps of one long prompt | the last `steps` query positions of one prefill (teacher-forced decode steps), via attnlab.probes.capture's hook_q/hook_k |
| sparsity ratio | per KV head, step, layer: softmax of each query head of the group, summed over the group, summed into 64-token blocks; sorted; ratio = searchsorted(cumsum, 0.9, right) / blocks | the same (`block_ratio90`) |
| outlier handling | per KV head and layer, clip over steps to [Q1 - 1.5 IQR, Q3 + 1.5 IQR]; mean over steps, then over KV heads | the same (`iqr_clip`) |
| overlap | per KV head and step: group-mean attention in blocks, sink and recent blocks forced, top `budget / block` blocks; O[i, j] = mean over steps of overlap / size of j's set, i < j; diagonal 1; heads merged by min | the same (`overlap_matrix`); the budget, sink and recent sizes are scaled to 512-2048-token contexts (the code's defaults: 2048, 64-128 and 512 tokens at 32k) |
| sensitive layers | the ceil(L (1 - sparsity)) layers with the largest ratio | the same (`sensitive_layers`) |
| policy | rows and columns of sensitive layers zeroed; DP over segments (a layer reuses its segment's head, the most recent fresh layer), lexicographic max of (min overlap, sum), at most ceil(L sparsity 0.3) + R fresh layers | the same (`best_path`); checked against brute force in the tests |
| prefill | full attention everywhere | `prefill="full"` (the code) or `"sparse"` (ours: the same block choice per query block, the query block's mean query scoring the key blocks; not in the code) |
| decode scores | group-mean query and keys hashed to 64 sign bits (random orthogonal projection); a block's score is its best token's Hamming distance, the best KV head's | exact dot products (group-mean query . key), best token, best KV head: fastlm.BlockTopK; no hashing (a cheaper score is a deviation left for later) |
| kept blocks | topk / block blocks, 1 sink block and 4 recent blocks always; one set for every head | the same, one set for every head; the budget is a parameter |
| policy file | JSON: token budget, rollback layer list, a per-layer skip flag (the source layer is implied: the last computed one) | the same fields (`vllm_hash_attention_*` names kept) plus ours: the source of each reuse, the profile and the sizes |

Decode and prefill go through attnlab.probes.fastlm (SDPA on the gathered blocks; nothing N x N).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from attnlab._io import save_figure
from attnlab.probes import fastlm

RATIO_MASS = 0.9          # the code's coverage threshold (compute_ratio90)
HAMMING_FRACTION = 0.3    # the code's computed_ratio_of_hamming_layers


# --------------------------------------------------------------------------- profile

def _block_sums(p: Tensor, block: int) -> Tensor:
    """(..., n) attention over n keys -> (..., ceil(n / block)) block sums (the last block zero-padded)."""
    n = p.shape[-1]
    nb = math.ceil(n / block)
    p = torch.nn.functional.pad(p, (0, nb * block - n))
    return p.view(*p.shape[:-1], nb, block).sum(-1)


def block_ratio90(p: Tensor, block: int, mass: float = RATIO_MASS) -> Tensor:
    """The code's sparsity ratio of attention rows p (..., n): the number of blocks, largest first,
    whose cumulative share stays <= mass, over the number of blocks (compute_ratio90)."""
    b = _block_sums(p.double(), block)
    b = b.sort(-1, descending=True).values
    b = b / b.sum(-1, keepdim=True)
    c = b.cumsum(-1)
    count = (c <= mass).sum(-1)               # searchsorted(cumsum, mass, side="right")
    return count.double() / b.shape[-1]


def iqr_clip(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """Clip x along `axis` to [Q1 - 1.5 IQR, Q3 + 1.5 IQR] (remove_outliers_iqr clips, it does not drop)."""
    q1, q3 = np.percentile(x, 25, axis=axis, keepdims=True), np.percentile(x, 75, axis=axis, keepdims=True)
    iqr = q3 - q1
    return np.clip(x, q1 - 1.5 * iqr, q3 + 1.5 * iqr)


def topk_blocks(scores: Tensor, k: int, sink_blocks: int, recent_blocks: int) -> Tensor:
    """(..., nb) block scores -> (..., nb) bool: the top k with the first sink and last recent forced."""
    s = scores.clone()
    nb = s.shape[-1]
    if k >= nb:
        raise ValueError(f"top-k blocks: k ({k}) must be smaller than the number of blocks ({nb}); "
                         "raise the profile length or lower the budget")
    s[..., :sink_blocks] = float("inf")
    if recent_blocks:
        s[..., nb - recent_blocks:] = float("inf")
    idx = s.topk(k, dim=-1).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)


@dataclass
class Profile:
    """Per-layer sparsity ratio (mean over steps and KV heads after IQR clipping) and the layer overlap."""

    ratio: np.ndarray               # (L,)
    ratio_per_head: np.ndarray      # (Hkv, L) after clipping, mean over steps
    overlap: np.ndarray             # (L, L), heads merged by min; upper triangle and diagonal
    overlap_per_head: np.ndarray    # (Hkv, L, L)
    block: int
    budget: int
    sink: int
    recent: int
    tokens: int
    steps: int

    def to_json(self) -> dict:
        return {"ratio": self.ratio.tolist(), "ratio_per_head": self.ratio_per_head.tolist(),
                "overlap": self.overlap.tolist(), "block": self.block, "budget": self.budget, "sink": self.sink,
                "recent": self.recent, "tokens": self.tokens, "steps": self.steps}


def profile_from_qk(qs: Sequence[Tensor], ks: Sequence[Tensor], *, steps: int = 64, block: int = 64,
                    budget: int = 512, sink: int = 64, recent: int = 128, scaling: float | None = None) -> Profile:
    """The profile from each layer's post-RoPE queries qs[l] (N, Hq, D) and keys ks[l] (N, Hkv, D).

    The last `steps` positions are the decode steps: step t's query at position p attends to keys
    [0, p]. Ratio: group-summed softmax, blocks, ratio90 per (KV head, step, layer); IQR-clipped over
    steps per (KV head, layer); mean over steps, then KV heads. Overlap: group-mean attention in
    blocks, the top budget / block blocks with sink and recent blocks forced, per (KV head, step, layer)."""
    L = len(qs)
    if L == 0 or len(ks) != L:
        raise ValueError(f"profile: expected one q and one k per layer, got {len(qs)} and {len(ks)}")
    N, Hq, D = qs[0].shape
    Hkv = ks[0].shape[1]
    if Hq % Hkv:
        raise ValueError(f"profile: {Hq} query heads are not a multiple of {Hkv} KV heads")
    g = Hq // Hkv
    if not 0 < steps < N:
        raise ValueError(f"profile: steps must be in [1, {N - 1}] for {N} tokens, got {steps}")
    scale = scaling if scaling is not None else D ** -0.5
    k_blocks = budget // block
    ratios = np.zeros((Hkv, steps, L))
    overlap = np.zeros((Hkv, L, L))
    first = N - steps
    if k_blocks >= math.ceil((first + 1) / block):
        raise ValueError(f"profile: a budget of {budget} tokens ({k_blocks} blocks of {block}) covers the whole "
                         f"prefix of the first step ({first + 1} tokens); profile longer texts or lower the budget")
    for t in range(steps):
        p = first + t                                                     # the query position of this step
        masks = []
        for l in range(L):
            q = qs[l][p].double().view(Hkv, g, D)                          # (Hkv, g, D)
            k = ks[l][: p + 1].double().permute(1, 0, 2)                   # (Hkv, p+1, D)
            a = torch.softmax(torch.einsum("hgd,hnd->hgn", q, k) * scale, -1)   # (Hkv, g, p+1)
            ratios[:, t, l] = block_ratio90(a.sum(1), block).numpy()
            b = _block_sums(a.mean(1), block)                              # (Hkv, nb)
            nb = b.shape[-1]
            masks.append(topk_blocks(b, k_blocks, math.ceil(sink / block) if sink else 0,
                                     min(nb - 1, recent // block)))
        m = torch.stack(masks, 1).double()                                # (Hkv, L, nb)
        inter = torch.einsum("hin,hjn->hij", m, m)                        # (Hkv, L, L)
        overlap += (inter / m.sum(-1).unsqueeze(1)).numpy()               # / |mask_j|
    overlap /= steps
    overlap = np.triu(overlap, 1)
    for h in range(Hkv):
        np.fill_diagonal(overlap[h], 1.0)
    clipped = np.stack([iqr_clip(ratios[h], axis=0) for h in range(Hkv)])   # (Hkv, steps, L)
    per_head = clipped.mean(1)                                            # (Hkv, L)
    return Profile(per_head.mean(0), per_head, overlap.min(0), overlap, block, budget, sink, recent, N, steps)


def profile(model, ids: Tensor, **kwargs) -> Profile:
    """Profile a HuggingFace causal LM on ids (1, N) through capture's post-RoPE hook_q / hook_k."""
    from attnlab.probes.capture import capture
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"profile: ids must be (1, N), got {tuple(ids.shape)}")
    with torch.no_grad(), capture(model, names="blocks.*.attn.hook_[qk]") as cap:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    L = sum(1 for name in cap.keys() if name.endswith("hook_q"))
    qs = [cap[f"blocks.{l}.attn.hook_q"][0] for l in range(L)]            # (N, Hq, D)
    ks = [cap[f"blocks.{l}.attn.hook_k"][0] for l in range(L)]            # (N, Hkv, D)
    attn = fastlm.attention_modules(model)[0]
    return profile_from_qk(qs, ks, scaling=getattr(attn, "scaling", None), **kwargs)


# --------------------------------------------------------------------------- policy

def sensitive_layers(ratio: Sequence[float], sparsity: float) -> list[int]:
    """The ceil(L (1 - sparsity)) layers with the largest ratio (calRollBackLayers), sorted."""
    if not 0 < sparsity <= 1:
        raise ValueError(f"sparsity must be in (0, 1], got {sparsity}")
    r = np.asarray(ratio)
    R = math.ceil(len(r) * (1 - sparsity) - 1e-9)
    return sorted(int(i) for i in np.argsort(-r, kind="stable")[:R])


def best_path(tables: Sequence[np.ndarray], max_changes: int) -> tuple[list[int], tuple[float, float]]:
    """The code's DP (best_path_min_sum): a path of segments, each started by a fresh layer that the
    following layers of the segment reuse; maximise (min, sum) of the reuse scores lexicographically
    (a fresh layer scores its diagonal, 1), with at most max_changes fresh layers after layer 0.

    tables: (L, L) overlap tables (several calibration sets: the min and the sum over them).
    Returns (config, (min, sum)): config[j] = -1 if layer j is fresh, else the layer it reuses."""
    A = np.stack([np.asarray(t, dtype=float) for t in tables])         # (T, L, L)
    L = A.shape[1]
    m, s = A.min(0), A.sum(0)
    NEG = (-math.inf, -math.inf)
    C = max(0, int(max_changes))
    dp = [[[NEG] * (C + 1) for _ in range(L)] for _ in range(L)]
    back: dict[tuple[int, int, int], tuple[int, int]] = {}
    dp[0][0][0] = (m[0, 0], s[0, 0])
    for j in range(1, L):
        for c in range(C + 1):
            for i in range(j):                                         # stay in i's segment
                prev = dp[j - 1][i][c]
                if prev[0] == -math.inf:
                    continue
                cand = (min(prev[0], m[i, j]), prev[1] + s[i, j])
                if cand > dp[j][i][c]:
                    dp[j][i][c], back[(j, i, c)] = cand, (i, c)
            if c > 0:                                                  # layer j starts a segment
                for k in range(j):
                    prev = dp[j - 1][k][c - 1]
                    if prev[0] == -math.inf:
                        continue
                    cand = (min(prev[0], m[j, j]), prev[1] + s[j, j])
                    if cand > dp[j][j][c]:
                        dp[j][j][c], back[(j, j, c)] = cand, (k, c - 1)
    best, arg = NEG, None
    for i in range(L):
        for c in range(C + 1):
            if dp[L - 1][i][c] > best:
                best, arg = dp[L - 1][i][c], (i, c)
    config = [-1] * L
    i, c = arg
    for j in range(L - 1, 0, -1):
        config[j] = -1 if i == j else i
        i, c = back[(j, i, c)]
    return config, (float(best[0]), float(best[1]))


@dataclass
class Policy:
    """Which layers attend fully, which choose fresh top-k blocks, which reuse (and whose)."""

    num_layers: int
    sensitive: list[int]
    source: list[int]                  # -1: fresh (or full if sensitive); else the layer reused
    budget: int = 512
    block: int = 64
    sink_blocks: int = 1
    recent_blocks: int = 2
    prefill: str = "sparse"
    score: tuple[float, float] = (math.nan, math.nan)
    profile: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.source) != self.num_layers:
            raise ValueError(f"policy: {len(self.source)} sources for {self.num_layers} layers")
        for j, i in enumerate(self.source):
            if i != -1 and not 0 <= i < j:
                raise ValueError(f"policy: layer {j} reuses layer {i}; a layer can only reuse an earlier one")

    @property
    def reuse(self) -> list[bool]:
        return [i != -1 for i in self.source]

    def fresh_layers(self) -> list[int]:
        return [j for j in range(self.num_layers) if self.source[j] == -1 and j not in self.sensitive]

    def plan(self) -> fastlm.Plan:
        """The fastlm plan: sensitive -> Full; fresh -> BlockTopK; reuse -> Reuse of the last fresh layer.

        A layer that reuses a sensitive (full) layer has no blocks to reuse: it computes its own (the
        DP avoids this path: those overlaps are zeroed)."""
        rules: dict[int, fastlm.Rule] = {}
        topk = fastlm.BlockTopK(k_blocks=max(self.budget // self.block, self.sink_blocks + self.recent_blocks),
                                block=self.block, sink_blocks=self.sink_blocks, recent_blocks=self.recent_blocks,
                                prefill=self.prefill)
        last_fresh = None
        for j in range(self.num_layers):
            if j in self.sensitive:
                rules[j] = fastlm.Full()
            elif self.source[j] == -1 or self.source[j] in self.sensitive or last_fresh is None:
                rules[j] = topk
                last_fresh = j
            else:
                if self.source[j] != last_fresh:
                    raise ValueError(f"policy: layer {j} reuses layer {self.source[j]}, but the last fresh layer "
                                     f"before it is {last_fresh} (reuse is of the most recent fresh layer)")
                rules[j] = fastlm.Reuse()
        return fastlm.Plan(rules)

    def to_json(self) -> dict:
        return {
            # the released code's runtime fields (GSAOnDeviceConfig)
            "vllm_hash_attention_topk": self.budget,
            "vllm_hash_attention_rollback_layers": list(self.sensitive),
            "vllm_hash_attention_skip_layers": self.reuse,
            "chunk_size": self.block,
            # ours
            "num_layers": self.num_layers, "source": list(self.source), "sink_blocks": self.sink_blocks,
            "recent_blocks": self.recent_blocks, "prefill": self.prefill, "score": list(self.score),
            "profile": self.profile,
        }

    @classmethod
    def from_json(cls, obj: dict) -> "Policy":
        need = ("vllm_hash_attention_topk", "vllm_hash_attention_rollback_layers", "vllm_hash_attention_skip_layers")
        missing = [k for k in need if k not in obj]
        if missing:
            raise ValueError(f"HyLRA policy JSON: missing {missing}")
        skip = list(obj["vllm_hash_attention_skip_layers"])
        sensitive = [int(x) for x in obj["vllm_hash_attention_rollback_layers"]]
        source = obj.get("source")
        if source is None:                          # the code's file: a skip layer reuses the last fresh one
            source, last = [], None
            for j, s in enumerate(skip):
                fresh = not s or last is None
                source.append(-1 if fresh else last)
                if fresh and j not in sensitive:
                    last = j
        return cls(num_layers=int(obj.get("num_layers", len(skip))), sensitive=sensitive,
                   source=[int(x) for x in source], budget=int(obj["vllm_hash_attention_topk"]),
                   block=int(obj.get("chunk_size", 64)), sink_blocks=int(obj.get("sink_blocks", 1)),
                   recent_blocks=int(obj.get("recent_blocks", 2)), prefill=str(obj.get("prefill", "sparse")),
                   score=tuple(obj.get("score", (math.nan, math.nan))), profile=dict(obj.get("profile", {})))

    def save(self, path: str | Path) -> Path:
        from attnlab._io import write_text
        path = Path(path)
        write_text(path, json.dumps(self.to_json(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        return cls.from_json(json.loads(Path(path).read_text()))


def make_policy(prof: Profile, *, sparsity: float = 0.9, hamming_fraction: float = HAMMING_FRACTION,
                max_changes: int | None = None, sink_blocks: int = 1, recent_blocks: int = 2,
                prefill: str = "sparse") -> Policy:
    """The code's policy from a profile: sensitive layers, their rows/columns zeroed, the DP."""
    L = len(prof.ratio)
    sens = sensitive_layers(prof.ratio, sparsity)
    table = prof.overlap.copy()
    for r in sens:
        table[r, :] = 0
        table[:, r] = 0
    np.fill_diagonal(table, 1.0)
    C = max_changes if max_changes is not None else math.ceil(L * sparsity * hamming_fraction - 1e-9) + len(sens)
    source, score = best_path([table], C)
    return Policy(L, sens, source, budget=prof.budget, block=prof.block, sink_blocks=sink_blocks,
                  recent_blocks=recent_blocks, prefill=prefill, score=score,
                  profile={"ratio": prof.ratio.tolist(), "max_changes": C, "sparsity": sparsity,
                           "tokens": prof.tokens, "steps": prof.steps})


# --------------------------------------------------------------------------- report

def plot_profile(path: Path, prof: Profile, policy: Policy) -> Path:
    """Per-layer sparsity ratio (sensitive layers marked) and the overlap table with the chosen path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    L = len(prof.ratio)
    colors = ["C3" if l in policy.sensitive else ("C0" if policy.source[l] == -1 else "C7") for l in range(L)]
    ax.bar(range(L), prof.ratio, color=colors)
    for h in range(prof.ratio_per_head.shape[0]):
        ax.plot(range(L), prof.ratio_per_head[h], lw=0.8, color="k", alpha=0.4)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"blocks for 90% of the mass / blocks (block {prof.block})")
    ax.set_title("sparsity ratio (red: sensitive, blue: fresh top-k, grey: reuse)", fontsize=9)
    im = bx.imshow(prof.overlap, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(im, ax=bx, fraction=0.046)
    for j, i in enumerate(policy.source):
        if i >= 0:
            bx.plot(j, i, "rx", ms=5)
    bx.set_xlabel("layer j (reuses)")
    bx.set_ylabel("layer i (chose)")
    bx.set_title(f"top-{prof.budget // prof.block} block overlap |i & j| / |j| (x: the policy's reuse)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)
    return path


def run(model_name_or_model="smollm2", *, out: Path, tokenizer=None, tokens: int = 2048, continuation: int = 64,
        greedy: int = 32, budget: float = 0.25, block: int = 64, sparsity: float = 0.9, steps: int = 64,
        sink: int = 64, recent: int = 128, text_path=None, progress=None) -> dict:
    """Profile, policy and a measurement against the unmodified model; writes hylra.md, hylra.json,
    hylra-policy.json and hylra-profile.png into `out`. The profile reads the text's first 90%, the
    measurement one window of its last 10% (BOS + tokens - 1, then `continuation` teacher-forced
    tokens and `greedy` greedy ones). model_name_or_model: "smollm2", a HuggingFace causal-LM folder
    or a model (with tokenizer=)."""
    import time
    from attnlab._io import write_text
    from attnlab.probes.inputs import read_text, token_window
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def say(what):
        if progress is not None:
            progress(what)

    from attnlab.probes.assets import causal_lm
    model, tokenizer, name, bos = causal_lm(model_name_or_model, tokenizer, what="hylra.run")
    text = read_text(text_path)
    cut = int(0.9 * len(text))

    def encode(chunk: str, n: int) -> Tensor:
        return token_window(tokenizer, chunk, n, bos=bos, what="hylra.run")

    calib = encode(text[: 12 * tokens], tokens)
    evals = encode(text[cut: cut + 12 * (tokens + continuation)], tokens + continuation)
    prefix, cont = evals[:, :tokens], evals[:, tokens:]
    budget_tokens = max(4 * block, int(round(budget * tokens / block)) * block)
    say("profiling")
    t0 = time.perf_counter()
    prof = profile(model, calib, steps=min(steps, tokens // 4), block=block, budget=budget_tokens, sink=sink,
                   recent=recent)
    profile_s = time.perf_counter() - t0
    pol = make_policy(prof, sparsity=sparsity, prefill="full")
    pol.save(out / "hylra-policy.json")
    fig = plot_profile(out / "hylra-profile.png", prof, pol)
    rows = {}
    for label, plan in (("dense", None), ("hylra", pol.plan()),
                        ("hylra-sparse", Policy.from_json({**pol.to_json(), "prefill": "sparse"}).plan())):
        say(f"measuring {label}")
        rows[label] = fastlm.run_once(model, prefix, cont, greedy_tokens=greedy, plan=plan)
    base = rows["dense"]
    L = len(prof.ratio)
    doc = {"probe": "hylra", "model": name, "layers": L, "tokens": tokens, "budget": budget_tokens, "block": block,
           "sparsity": sparsity, "profile": prof.to_json(), "policy": pol.to_json(), "profile_s": profile_s,
           "results": {k: {**v.to_json(), "agreement": list(fastlm.agreement(v.greedy, base.greedy))}
                       for k, v in rows.items()}}
    lines = [f"# HyLRA on {name}", "",
             f"{L} layers; profile on the first {tokens} tokens of the text's first 90% ({prof.steps} decode steps, "
             f"{profile_s:.0f} s); measured on {tokens} tokens of its last 10% + {continuation} teacher-forced and "
             f"{greedy} greedy tokens; one run each (see the fast_inference claim for paired, repeated timings).", "",
             f"Policy (budget {budget_tokens} tokens = {budget_tokens // block} blocks of {block}; sparsity {sparsity:g}: "
             f"{len(pol.sensitive)} sensitive layers {pol.sensitive}; at most {pol.profile['max_changes']} fresh "
             f"layers; (min, sum) overlap {pol.score[0]:.3f}, {pol.score[1]:.2f}): `{pol.plan().describe(L)}` "
             "(F full, T fresh top-k, r reuse).", "",
             "| variant | prefill s | attention s at prefill | decode ms/token | NLL | NLL change | greedy agreement |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, v in rows.items():
        a, p = fastlm.agreement(v.greedy, base.greedy)
        att = "-" if math.isnan(v.attention_prefill_s) else f"{v.attention_prefill_s:.2f}"
        lines.append(f"| {k} | {v.prefill_s:.2f} | {att} | {1000 * v.decode_s_per_token:.1f} | {v.nll:.4f} | "
                     f"{v.nll - base.nll:+.4f} | {100 * a:.0f}% (prefix {p}) |")
    lines += ["", f"![profile]({fig.name})", "",
              "Files: hylra.md, hylra.json, hylra-policy.json (the released code's fields + ours), hylra-profile.png", ""]
    write_text(out / "hylra.json", json.dumps(doc, indent=1) + "\n")
    write_text(out / "hylra.md", "\n".join(lines))
    doc["files"] = [str(out / f) for f in ("hylra.md", "hylra.json", "hylra-policy.json", "hylra-profile.png")]
    doc["seconds"] = time.perf_counter() - t_start
    return doc


__all__ = ["block_ratio90", "iqr_clip", "topk_blocks", "Profile", "profile_from_qk", "profile",
           "sensitive_layers", "best_path", "Policy", "make_policy", "plot_profile", "run"]
