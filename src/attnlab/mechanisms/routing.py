"""Routing attention: content-based sparse attention through online k-means (Routing Transformer).

Paper: Efficient Content-Based Sparse Attention with Routing Transformers (Roy, Saffar,
Vaswani, Grangier; TACL 2021, arXiv 2003.05997).
Released code followed (read for this file): google-research/google-research
routing_transformer/utils.py: `clustered_local_attention_helper` (layer-norm q and k without
scale, route queries and keys separately, one dense attention per cluster, scatter back),
`nearest_neighbor` (similarity <z, mu_c>, nearest = argmax), `gather_cluster_attention_items`
(each cluster takes `attention_window` tokens by `tf.math.top_k` over the token-centroid
similarity, sorted by position), `cluster_items` (centroids = LayerNorm of a N(0, 1) draw),
`online_kmeans` (EMA of the nearest-assigned members), `scatter_cluster_items` (a query in
several clusters gets the sum of its outputs over count + 0.01); and lucidrains/routing-transformer
routing_transformer/routing_transformer.py: `distribution` (the same top-w, sorted), `kmeans_iter`
(the new centroid is the normalised sum of its nearest members, F.normalize of the sum) and
`Kmeans.update` (EMA toward it).

    Q, K <- LayerNorm(Q), LayerNorm(K)        (no scale or bias: the shared Q/K space of the routing)
    s_c(z) = <z, mu_c>                         similarity to each of the num_clusters centroids mu_c
    X'_i = mean over the clusters c holding query i of
           sum_{j in K_c (, j <= i causal)} softmax_j(Q_i K_j^T / sqrt(d)) V_j
    mu_c <- decay mu_c + (1 - decay) sqrt(d) S_c / |S_c|,  S_c = sum of the layer-normed queries and
           keys whose nearest centroid is mu_c (training only; sqrt(d) is the norm of a layer-normed
           vector, so the target lies on the sphere the tokens and the initial centroids lie on)

The centroids are a buffer `centroids` (routing heads, num_clusters, d), one set per head,
shared by queries and keys, never a parameter: they change only by the moving average above,
in training mode, under no_grad, after the current call has been routed with the old values.

Computation, O(N^1.5 d) with num_clusters ~ sqrt(N): each cluster holds exactly
w = ceil(capacity * N / num_clusters) query slots and w key slots, so attention is one batched
dense (num_clusters, w, w) call of `attnlab.ops.attention` per head, and the results are
scattered back to the tokens' positions. Which tokens fill the slots (`variant`):
- "auto" (default): "nearest" for a call that may not see the future (is_causal=True, or an
  attn_mask under which no query may attend a later key: an explicit causal mask), "topk" for
  every other call.
- "topk": the balanced assignment of the released code: cluster c takes the w queries, and
  separately the w keys, with the largest <z, mu_c> (`gather_cluster_attention_items`), so every
  cluster is full, and a token can land in several clusters or in none. A query in several
  clusters gets the mean of its per-cluster outputs. Non-causal only: whether a past token is
  among a cluster's top w depends on the future tokens, so with is_causal the future would reach
  the past through the routing; an explicit variant="topk" raises NotImplementedError for
  is_causal=True (the released code trains its decoder this way: its causal mask is
  `attention_bias_lower_triangle` over the slots inside a cluster, which leaves the membership
  itself to the whole sequence). Likewise an explicit causal attn_mask with variant="topk" is
  applied inside the clusters but leaves the membership to the whole sequence ("auto" routes
  such a call with "nearest").
- "nearest": the truly causal variant for language models. Each query and each key goes to its
  nearest centroid only (argmax_c <z, mu_c>, the paper's formula), and a cluster keeps its first
  w members in sequence order, so the membership of token i depends on tokens <= i only and
  composes with any mask. What it drops against "topk": (1) the balance: a cluster holds at most
  w members and may hold fewer, and the tokens that reach a full cluster are not routed (the cap
  keeps the cost at num_clusters * w^2; `capacity` > 1 drops fewer); (2) overlap: a token is in
  at most one cluster; (3) with is_causal, a query whose cluster holds no key at or before it
  sees nothing. The released code has no such variant for training.
A query that is not routed (or whose clusters hold no key it may see) gets a zero output from
the routing heads; the local heads still see it. `module.unrouted_fraction` (a float) is that
share of the non-padding queries of the routing heads in the last forward (measured, not
estimated; nan before the first call). Measured at initialisation (`attnlab info routing`:
random x, dim 64, 8 heads, N = 1024, 32 clusters): "topk" leaves about 38% of the queries
unrouted, "nearest" about 17% (21% causal). Balanced top-w does not route every query: the
released code's zero output (sum / (0 + 0.01)) for those queries is reproduced here.
Local heads: heads 0..local_heads-1 use blocked local attention (like the released code's
local heads, blocks with a one-block flange): the sequence is cut into blocks of window_size;
a query attends every key of its own block and of the previous block, and of the next block
when not causal; causal keeps key <= query. The other heads are routing heads. Default: half
of the heads local (the paper tunes the split and the layers with routing per task).
Causal: key position <= query position inside each cluster, by original positions.
attn_mask: any mask of the attnlab conventions, applied inside each cluster. A token that no
query may attend (its key column fully masked: padding) is routed neither as a key nor as a
query, so padding can never take a cluster slot (its routing-head output is zero). No KV cache.

Status: routing ("topk" as released, "nearest" causal), masks, EMA centroids, local/routing mix.
Choosing num_clusters: the cost is ~ N * num_clusters * d (routing) + N^2 d / num_clusters
(attention) per routing head, smallest at num_clusters ~ sqrt(N) (the paper uses sqrt(N)).
The centroids fix the count at construction: pick it for the lengths you run (default 16,
around sqrt(256)..sqrt(1024); 64 for N ~ 4096).

Deviations:
- Centroid update: the arXiv text writes mu <- lambda mu + (1 - lambda)/2 sum_{i: mu(Q_i)=mu} Q_i
  + (1 - lambda)/2 sum_{j: mu(K_j)=mu} K_j, a sum whose size grows with the number of members.
  The google-research `online_kmeans` keeps moving averages of the member sums and of the member
  counts and divides them (VQ-VAE style; its count average starts at zero, so the first updates
  inflate the centroids' norms). Here, as lucidrains' `kmeans_iter` + `Kmeans.update`, the target
  is the normalised member sum (queries and keys together, padding excluded, nearest assignment
  in every variant), scaled to the layer-norm radius sqrt(d) because the tokens here are
  layer-normed rather than L2-normalised; one EMA step per training forward (lucidrains averages
  the targets of several forwards and applies them after backward). A cluster with no member
  keeps its centroid. No all-reduce across processes.
- Similarity: the inner product <z, mu_c> as in the released code (on layer-normed z it ranks
  like the Euclidean distance up to the centroids' norms).
- Centroid init: LayerNorm of a standard normal draw (as the released code); `routing_seed`
  makes it reproducible without touching the global RNG. (lucidrains inits from data.)
- Queries and keys have separate projections (the released code can tie them, `share_qk`);
  both are layer-normed without affine parameters and the normed values are also used for the
  scores of the routing heads, as in the released code. Local heads use the raw projections.
- A query in several clusters ("topk") gets the plain mean of its per-cluster outputs; the
  released code divides the sum by (count + 0.01), 1% smaller for a query in one cluster
  (lucidrains' `scatter_mean` uses + 1e-5). A cluster where the mask hides every key from the
  query adds nothing to its mean.
- The commitment loss of the released code (which pulls Q and K toward their centroids) is
  not computed; the relative position embeddings of its local heads are not included.
- Routing scores are computed in float32 (float64 for float64 input), from the projections
  recomputed in float32 for lower-precision input, so a bf16 forward routes like a float32 one.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.cache import KVCache
from attnlab.masks import check_attn_mask
from attnlab._checks import check_dims, check_dropout, check_features, check_tokens
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

VARIANTS = ("auto", "topk", "nearest")


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"routing: {name} must be {bound}, got {value!r}")
    return value


def _hides_the_future(seen: Tensor) -> bool:
    """seen (B|1, h|1, N|1, M) bool "may attend": True when no query may attend a later key (an
    explicit causal mask), so that the call's routing must not depend on the future either."""
    Nm, M = seen.shape[-2:]
    if Nm == 1:                                   # the same row for every query: key padding
        return M <= 1
    later = torch.ones(Nm, M, dtype=torch.bool, device=seen.device).triu(1)
    return not bool((seen & later).any())


def _gather_mask(mask: Tensor, qpos: Tensor, kpos: Tensor) -> Tensor:
    """mask (B, R, Nm, Mm), Nm/Mm in {1, N}; qpos (b, r, G, wq), kpos (b, r, G, wk) positions
    (b, r broadcastable to B, R) -> mask[b, r, qpos_i, kpos_j] as (B, R, G, wq|1, wk|1)."""
    B, R, Nm, Mm = mask.shape
    bi = torch.arange(B, device=mask.device).view(B, 1, 1, 1, 1)
    hi = torch.arange(R, device=mask.device).view(1, R, 1, 1, 1)
    zero = torch.zeros(1, 1, 1, 1, 1, dtype=torch.long, device=mask.device)
    qi = qpos[..., :, None] if Nm > 1 else zero
    ki = kpos[..., None, :] if Mm > 1 else zero
    return mask[bi, hi, qi, ki]


@register(MechanismSpec(
    name="routing", paper="Efficient Content-Based Sparse Attention with Routing Transformers", year=2021,
    family="sparse", layout="seq", time="O(N k d + N^2 d / k), k clusters; O(N^1.5 d) at k ~ sqrt(N)",
    memory="O(N^2 / k) scores per head; O(N^1.5) at k ~ sqrt(N)", exact=False,
    causal=True, attn_mask=True, kv_cache=False, backends=("sdpa", "reference"),
    url="https://arxiv.org/abs/2003.05997", variants=VARIANTS, provenance="official-code",
    source="google-research/google-research routing_transformer/utils.py::gather_cluster_attention_items "
           "(top-w routing), ::clustered_local_attention_helper; lucidrains/routing-transformer "
           "routing_transformer/routing_transformer.py::kmeans_iter (EMA toward the normalised member sums)",
    test_kwargs=dict(num_clusters=2, local_heads=1, window_size=4, qkv_bias=True)))
class RoutingAttention(nn.Module):
    """x (B, N, C) -> (B, N, C): local heads 0..local_heads-1, routing heads after them.

    Hooks (attnlab.hooks): q, k, v, out of all heads; scores and probs per kind of head, in the
    layout each attends in, on the eager path (`backend="reference"`). `hook_names` is per
    instance (a split without local or routing heads has no such scores).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, variant: str = "auto", num_clusters: int = 16,
                 capacity: float = 1.0, local_heads: int | None = None, window_size: int = 64,
                 decay: float = 0.999, scale: float | None = None, routing_seed: int | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        self.head_dim = d = check_dims("routing", dim, num_heads)
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise ValueError(f"routing: variant must be one of {VARIANTS}, got {variant!r}")
        _check_int("num_clusters", num_clusters, 1)
        local_heads = num_heads // 2 if local_heads is None else local_heads
        _check_int("local_heads", local_heads, 0, num_heads)
        _check_int("window_size", window_size, 1)
        if isinstance(capacity, bool) or not isinstance(capacity, (int, float)) or not capacity > 0 \
                or math.isinf(capacity):
            raise ValueError(f"routing: capacity must be a finite number > 0, got {capacity!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"routing: decay must be in [0, 1), got {decay!r}")
        check_dropout("routing", attn_drop=attn_drop, proj_drop=proj_drop)
        if routing_seed is not None and (isinstance(routing_seed, bool) or not isinstance(routing_seed, int)):
            raise TypeError(f"routing: routing_seed must be an int or None, got {type(routing_seed).__name__}")
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.variant, self.num_clusters, self.capacity = variant, num_clusters, float(capacity)
        self.local_heads, self.routing_heads = local_heads, num_heads - local_heads
        self.window_size, self.decay = window_size, float(decay)
        self.scale, self.backend, self.attn_drop = scale, backend, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        gen = None if routing_seed is None else torch.Generator().manual_seed(routing_seed)
        init = F.layer_norm(torch.randn(self.routing_heads, num_clusters, d, generator=gen), (d,))
        self.register_buffer("centroids", init.to(**factory))    # (R, num_clusters, d), EMA only
        self.hook_q = HookPoint()    # (B, h, N, d), projections (routing heads are layer-normed after)
        self.hook_k = HookPoint()    # (B, h, N, d), projections (routing heads are layer-normed after)
        self.hook_v = HookPoint()    # (B, h, N, d)
        # Scores and probs in the blocked layouts the two kinds of head attend in (eager path only,
        # backend="reference"); scores are the softmax input, -inf where masked.
        self.hook_scores_local = HookPoint()   # (B L, nb, W, 3W) (2W causal): blocks of W queries, 3 key blocks
        self.hook_probs_local = HookPoint()    # (B L, nb, W, 3W) (2W causal)
        self.hook_scores_routed = HookPoint()  # (B, R c, w, w): the w query slots x w key slots per cluster
        self.hook_probs_routed = HookPoint()   # (B, R c, w, w)
        self.hook_out = HookPoint()  # (B, h, N, d), per-head outputs before proj
        # Which hooks fire depends on the split: local ones need local_heads > 0, routed ones
        # routing heads (num_heads - local_heads > 0).
        local = ("hook_scores_local", "hook_probs_local") if self.local_heads else ()
        routed = ("hook_scores_routed", "hook_probs_routed") if self.routing_heads else ()
        self.eager_hook_names = (*local, *routed)
        self.hook_names = ("hook_q", "hook_k", "hook_v", *self.eager_hook_names, "hook_out")
        self.optional_hook_names = tuple(n for n in ("hook_scores_local", "hook_probs_local", "hook_scores_routed",
                                                     "hook_probs_routed") if n not in self.eager_hook_names)
        self._unrouted: Tensor | None = None   # (2,) int64: [unrouted, non-padding] queries, last forward

    @property
    def unrouted_fraction(self) -> float:
        """Share of the non-padding queries that the routing heads of the last forward left without
        output (in no cluster, or seeing no key in any of theirs), over samples and routing heads.
        Measured in the forward; nan before the first call, 0.0 without routing heads."""
        if self._unrouted is None:
            return math.nan
        missed, total = self._unrouted.tolist()    # read (and synchronised) only when asked
        return missed / total if total else 0.0

    def routing_variant(self, is_causal: bool) -> str:
        """The assignment a call uses: "auto" is "nearest" for a call that may not see the future
        (is_causal, or a mask that hides every later key) and "topk" otherwise."""
        if self.variant == "auto":
            return "nearest" if is_causal else "topk"
        return self.variant

    @classmethod
    def describe(cls) -> list[str]:
        """Lines `attnlab info routing` prints: the unrouted fraction measured at initialisation
        on a fixed input (seeded weights, centroids and x; the global RNG is left as it was)."""
        B, N, dim, heads, clusters = 2, 1024, 64, 8, 32
        lines = [f"unrouted queries at initialisation, measured (x ~ N(0, 1) of shape ({B}, {N}, {dim}), "
                 f"{heads} heads of which {heads // 2} routing, {clusters} clusters, seed 0):"]
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(0)
            m = cls(dim, heads, num_clusters=clusters, routing_seed=0).eval()
            x = torch.randn(B, N, dim, generator=torch.Generator().manual_seed(0))
            for variant, causal, label in (("topk", False, "default, non-causal calls"),
                                           ("nearest", True, "default, causal calls"),
                                           ("nearest", False, "explicit, non-causal")):
                m.variant = variant
                m(x, is_causal=causal)
                lines.append(f"  {variant:<8} is_causal={str(causal):<5} ({label}): {m.unrouted_fraction:.1%}")
        return lines

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, variant={self.variant!r}, "
                f"num_clusters={self.num_clusters}, capacity={self.capacity:g}, local_heads={self.local_heads}, "
                f"window_size={self.window_size}, decay={self.decay:g}")

    def cluster_size(self, N: int) -> int:
        """w: query (and key) slots per cluster for a sequence of N tokens."""
        return max(1, min(N, math.ceil(self.capacity * N / self.num_clusters)))

    # --- routing ---------------------------------------------------------------------------------

    def _members(self, scores: Tensor, pad: Tensor | None, w: int, variant: str) -> tuple[Tensor, Tensor]:
        """scores (B, R, N, k) of tokens against centroids -> positions (B, R, k, w), ok (B, R, k, w).

        Slots of a cluster are in ascending position; `ok` is False for an empty slot.
        """
        B, R, N, k = scores.shape
        pos = torch.arange(N, device=scores.device)
        if variant == "topk":   # gather_cluster_attention_items: top_k over the sequence, then sorted
            s = scores.transpose(-1, -2)                                       # (B, R, k, N)
            if pad is not None:
                s = s.masked_fill(pad[:, :, None, :], float("-inf"))
            top, idx = s.topk(w, dim=-1)                                       # (B, R, k, w)
            idx, order = idx.sort(dim=-1)
            return idx, top.gather(-1, order) > float("-inf")
        # nearest: cluster id per token, padding sorted behind every cluster (id k)
        cid = scores.argmax(-1)                                                # (B, R, N)
        if pad is not None:
            cid = cid.masked_fill(pad, k)
        order = (cid * N + pos).argsort(dim=-1)                                # (B, R, N) by (cluster, position)
        counts = torch.zeros(B, R, k + 1, dtype=torch.long, device=scores.device)
        counts.scatter_add_(-1, cid, torch.ones_like(cid))
        starts = counts.cumsum(-1) - counts                                    # (B, R, k + 1)
        slot = torch.arange(w, device=scores.device)
        ok = slot < counts[..., :k, None]                                      # (B, R, k, w)
        where = (starts[..., :k, None] + slot).clamp(max=N - 1)                # (B, R, k, w) into `order`
        idx = order.gather(-1, where.flatten(2)).view(B, R, k, w)
        return idx.masked_fill(~ok, 0), ok

    def route(self, q: Tensor, k: Tensor, pad: Tensor | None = None, *,
              is_causal: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Cluster slots of the routing heads (the assignment `routing_variant(is_causal)`).

        q, k (B, R, N, d) layer-normed routing queries and keys (routing precision), pad (B, R, N)
        bool or None (True = padding, never routed) -> q_idx, q_ok, k_idx, k_ok, each
        (B, R, num_clusters, w): the positions in each cluster's slots and which slots are filled.
        """
        variant = self.routing_variant(is_causal)
        w = self.cluster_size(q.shape[2])
        mu = self.centroids.to(q.dtype)                                        # (R, k, d)
        q_idx, q_ok = self._members(torch.einsum("brnd,rcd->brnc", q, mu), pad, w, variant)
        k_idx, k_ok = self._members(torch.einsum("brnd,rcd->brnc", k, mu), pad, w, variant)
        return q_idx, q_ok, k_idx, k_ok

    @torch.no_grad()
    def _update_centroids(self, q: Tensor, k: Tensor, pad: Tensor | None) -> None:
        """mu_c <- decay mu_c + (1 - decay) sqrt(d) S_c / |S_c|, S_c the sum of the queries and keys
        nearest to mu_c (batch-wide; lucidrains' kmeans_iter on the layer-norm sphere)."""
        B, R, N, d = q.shape
        mu = self.centroids.to(q.dtype)                                        # (R, k, d)
        z = torch.cat([q, k], dim=2)                                           # (B, R, 2N, d)
        cid = torch.einsum("brnd,rcd->brnc", z, mu).argmax(-1)                 # (B, R, 2N)
        weight = torch.ones_like(cid, dtype=q.dtype)
        if pad is not None:
            weight = weight * (~torch.cat([pad, pad], dim=2)).to(q.dtype)
        cid = cid.transpose(0, 1).reshape(R, B * 2 * N)                        # (R, B 2N)
        weight = weight.transpose(0, 1).reshape(R, B * 2 * N)
        z = z.transpose(0, 1).reshape(R, B * 2 * N, d)
        sums = mu.new_zeros(R, self.num_clusters, d).scatter_add_(1, cid[..., None].expand(-1, -1, d),
                                                                  z * weight[..., None])
        counts = mu.new_zeros(R, self.num_clusters).scatter_add_(1, cid, weight)
        target = F.normalize(sums, dim=-1) * math.sqrt(d)                      # (R, k, d), norm sqrt(d)
        new = torch.where(counts[..., None] > 0, self.decay * mu + (1 - self.decay) * target, mu)
        self.centroids.copy_(new.to(self.centroids.dtype))

    # --- the two kinds of heads ------------------------------------------------------------------

    def _attend(self, q, k, v, allowed, bias, dropout_p, hook_scores, hook_probs):
        """Batched dense attention; allowed (bool) / bias (float) broadcastable to (B, G, wq, wk)."""
        mask = allowed
        if bias is not None:
            mask = bias if allowed is None else torch.where(allowed, bias, float("-inf"))
        return attention(q, k, v, scores_hook=hook_scores, probs_hook=hook_probs, attn_mask=mask,
                         scale=self.scale, dropout_p=dropout_p, backend=self.backend)

    def _routing_heads(self, q, k, v, qr, kr, pad, mask, is_causal, causal_routing, dropout_p):
        """q, k, v (B, R, N, d) (q, k layer-normed); qr, kr the same in routing precision;
        causal_routing: the call may not see the future (is_causal or a mask hiding it)."""
        B, R, N, d = q.shape
        q_idx, q_ok, k_idx, k_ok = self.route(qr, kr, pad, is_causal=causal_routing)   # (B, R, c, w) each
        c, w = q_idx.shape[2], q_idx.shape[3]
        base = (torch.arange(B * R, device=q.device) * N).view(B, R, 1, 1)
        fq, fk = (q_idx + base).reshape(-1), (k_idx + base).reshape(-1)        # flat rows of (B R N, d)
        q_sel = q.reshape(B * R * N, d).index_select(0, fq).view(B, R * c, w, d)
        k_sel = k.reshape(B * R * N, d).index_select(0, fk).view(B, R * c, w, d)
        v_sel = v.reshape(B * R * N, d).index_select(0, fk).view(B, R * c, w, d)
        allowed = None                                                         # (B, R, c, w|1, w)
        if not bool(k_ok.all()):
            allowed = k_ok[..., None, :]
        if is_causal:
            later = k_idx[..., None, :] <= q_idx[..., :, None]
            allowed = later if allowed is None else allowed & later
        bias = None
        if mask is not None:
            got = _gather_mask(mask, q_idx, k_idx)
            if got.dtype == torch.bool:
                allowed = got if allowed is None else allowed & got
            else:
                bias = got
                finite = got != float("-inf")
                allowed = finite if allowed is None else allowed & finite
        flat = lambda t: None if t is None else t.expand(B, R, c, *t.shape[3:]).reshape(B, R * c, *t.shape[3:])
        out = self._attend(q_sel, k_sel, v_sel, flat(allowed), flat(bias), dropout_p,
                           self.hook_scores_routed, self.hook_probs_routed)   # (B, R c, w, d)
        # A slot counts when it is filled and its query may see one of the cluster's keys.
        row_ok = q_ok if allowed is None else q_ok & allowed.any(-1).expand(B, R, c, w)
        weight = row_ok.reshape(-1, 1).to(out.dtype)
        total = out.new_zeros(B * R * N, d).index_add(0, fq, out.reshape(-1, d) * weight)
        count = out.new_zeros(B * R * N, 1).index_add(0, fq, weight)
        with torch.no_grad():  # unrouted: a non-padding query that no cluster gave a key to see
            routed = count.view(B, R, N) > 0
            valid = torch.ones_like(routed) if pad is None else ~pad
            self._unrouted = torch.stack([(valid & ~routed).sum(), valid.sum()])
        return (total / count.clamp(min=1)).view(B, R, N, d)                   # mean over a query's clusters

    def _local_heads(self, q, k, v, mask, is_causal, dropout_p):
        """Blocked local attention, q, k, v (B, L, N, d): block b sees blocks b-1, b (and b+1).

        Laid out as (B L, nb, W, d), blocks in the place of heads, so that the border and causal
        masks, which depend on the block and not on the sample or head, stay (1, nb, W|1, span).
        """
        B, L, N, d = q.shape
        W = min(self.window_size, N)
        nb = -(-N // W)
        after = 0 if is_causal else 1
        span = (2 + after) * W
        pad_end = nb * W - N
        qb = F.pad(q, (0, 0, 0, pad_end)).reshape(B * L, nb, W, d)                   # (B L, nb, W, d)

        def windows(t):                                                              # (B L, nb, span, d)
            t = F.pad(t, (0, 0, W, pad_end + after * W)).reshape(B * L, nb + 1 + after, W, d)
            return torch.cat([t[:, j:j + nb] for j in range(2 + after)], dim=2)

        dev = q.device
        qpos = (torch.arange(nb, device=dev)[:, None] * W + torch.arange(W, device=dev)).view(1, 1, nb, W)
        kpos = ((torch.arange(nb, device=dev)[:, None] - 1) * W + torch.arange(span, device=dev)).view(1, 1, nb, span)
        allowed = ((kpos >= 0) & (kpos < N))[..., None, :]                           # (1, 1, nb, 1, span)
        if is_causal:
            allowed = allowed & (kpos[..., None, :] <= qpos[..., :, None])           # (1, 1, nb, W, span)
        bias = None
        if mask is not None:
            got = _gather_mask(mask, qpos.clamp(max=N - 1), kpos.clamp(0, N - 1))    # (B|1, L|1, nb, W|1, span)
            if got.dtype == torch.bool:
                allowed = allowed & got
            else:
                bias = got

        def flat(t):  # (b, l, nb, wq, span) -> (B L | 1, nb, wq, span)
            if t is None:
                return None
            if t.shape[0] == 1 and t.shape[1] == 1:
                return t[0]
            return t.expand(B, L, *t.shape[2:]).reshape(B * L, *t.shape[2:])

        if bias is not None and (bias.shape[0] != allowed.shape[0] or bias.shape[1] != allowed.shape[1]):
            allowed = allowed.expand(bias.shape[0], bias.shape[1], *allowed.shape[2:])
        out = self._attend(qb, windows(k), windows(v), flat(allowed), flat(bias), dropout_p,
                           self.hook_scores_local, self.hook_probs_local)
        return out.reshape(B, L, nb * W, d)[:, :, :N]

    # --- forward -----------------------------------------------------------------------------------

    def forward(self, x: Tensor, *, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        check_tokens("routing", x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        if is_causal and self.variant == "topk" and self.routing_heads:
            raise NotImplementedError(
                "mechanism 'routing' with variant='topk' does not support causal: a cluster's top-w tokens "
                "are chosen over the whole sequence, so future tokens would decide which past tokens are "
                "routed; use variant='nearest' (or the default 'auto', which takes it for causal calls)")
        B, N, C = x.shape
        h, L, R, d = self.num_heads, self.local_heads, self.routing_heads, self.head_dim
        mask = None if attn_mask is None else check_attn_mask(attn_mask, B, h, N, N).to(x.device)
        if B == 0 or N == 0:
            return self.proj(x * 0)
        dropout_p = self.attn_drop if self.training else 0.0
        qkv = self.qkv(x)                                                      # (B, N, 3C)
        q, k, v = qkv.reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, N, d)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        head_mask = lambda heads: None if mask is None else (mask[:, heads] if mask.shape[1] > 1 else mask)
        outs = []
        if L:
            outs.append(self._local_heads(q[:, :L], k[:, :L], v[:, :L], head_mask(slice(0, L)), is_causal, dropout_p))
        if not R:
            self._unrouted = torch.zeros(2, dtype=torch.long)              # no routing head: nothing unrouted
        else:
            q_r, k_r = F.layer_norm(q[:, L:], (d,)), F.layer_norm(k[:, L:], (d,))   # (B, R, N, d)
            with torch.no_grad():  # routing decisions: float32 at least, recomputed for low precision
                if x.dtype in (torch.float32, torch.float64):
                    qr, kr = q_r.detach(), k_r.detach()
                else:
                    b = None if self.qkv.bias is None else self.qkv.bias.float()
                    full = F.linear(x.detach().float(), self.qkv.weight.float(), b)
                    qf, kf, _ = full.reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
                    qr, kr = F.layer_norm(qf[:, L:], (d,)), F.layer_norm(kf[:, L:], (d,))
                pad, causal_routing = None, is_causal
                if mask is not None:  # a key no query may attend is padding: routed neither way
                    seen = mask if mask.dtype == torch.bool else mask != float("-inf")
                    seen = seen[:, L:] if seen.shape[1] > 1 else seen
                    pad = (~seen.any(dim=2)).expand(B, R, N)                       # (B, R, N)
                    if self.variant == "auto" and not is_causal:   # an explicit causal mask: route causally
                        causal_routing = _hides_the_future(seen)
            outs.append(self._routing_heads(q_r, k_r, v[:, L:], qr, kr, pad, head_mask(slice(L, h)), is_causal,
                                            causal_routing, dropout_p))
            if self.training:
                self._update_centroids(qr, kr, pad)
        out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]            # (B, h, N, d)
        out = self.hook_out(out)
        out = out.transpose(1, 2).reshape(B, N, C)                             # (B, N, C)
        return self.proj_drop(self.proj(out))

    def useful_flops(self, batch: int, seq_len: int, dim: int, num_heads: int, causal: bool) -> tuple[int, int]:
        """2 x multiply-adds: projections, routing scores (queries and keys against every centroid),
        the (query, key) pairs each head attends (causal: the half of each cluster's pairs with
        key <= query, in expectation); backward twice the forward."""
        B, N, C, d = batch, seq_len, dim, dim // num_heads
        L = min(self.local_heads, num_heads)
        R = num_heads - L
        w = self.cluster_size(N) if N else 0
        routed_pairs = self.num_clusters * (w * (w + 1) // 2 if causal else w * w)
        W = min(self.window_size, N) if N else 1
        local_pairs = 0
        for blk in range(-(-N // W) if N else 0):
            lo, q0, q1 = max(0, (blk - 1) * W), blk * W, min(N, (blk + 1) * W)
            if causal:  # query i sees keys lo..i
                local_pairs += sum(i - lo + 1 for i in range(q0, q1))
            else:
                local_pairs += (q1 - q0) * (min(N, (blk + 2) * W) - lo)
        fwd = (2 * B * N * C * 3 * C + 2 * B * N * C * C + 2 * B * R * 2 * N * self.num_clusters * d
               + 4 * B * d * (R * routed_pairs + L * local_pairs))
        return fwd, 2 * fwd
