"""Hierarchical self-attention (HSA) over a tree of tokens, computed by dynamic programming.

Paper: Hierarchical Self-Attention: Generalizing Neural Attention Mechanics to Multi-Scale
Problems (Amizadeh, Abdali, Li, Koishida; NeurIPS 2025, arXiv 2509.15448).
Implements: attention for a *nested signal*, here N leaf tokens grouped by a tree (`tree` in
`forward`; the paper's nested signal with embeddings at the leaves). Softmax attention is the
row-wise minimiser of free energy, p_i = argmin_p sum_j p_ij E_ij - H(p_i) with energy
E_ij = -q_i . k_j / sqrt(d). HSA keeps that principle and adds the hierarchy as a block
constraint: for two sibling subtrees A != B (children of one node), every leaf of A gives the
same weight to every leaf of B, i.e. P[A, B] is a constant block; the inside of each subtree
is again constrained recursively. The minimiser of sum_ij P_ij (E_ij + log P_ij) under these
constraints (equivalently, the P closest to softmax(-E) in row-wise KL) has the closed form
that the DP below evaluates. With s = -E (the scores):

    s(A, B) = mean_{i in A, j in B} s_ij = scale * mean_A(q) . mean_B(k)    (bilinear)
    leaf i:       g_i = s_ii
    child a of A: L_a = log( exp(g_a) + sum_{b sibling of a} |b| exp(s(a, b)) )
    node A:       g_A = sum_{a child of A} (|a| / |A|) L_a          (mean per-row log-partition)

and a query leaf i, going down its root-to-leaf path, keeps the mass
pi_a = exp(g_a - L_a) for its own child a at each node, gives each sibling block b the mass
|b| exp(s(a, b) - L_a) spread evenly over b's leaves, and keeps the rest for itself:

    out_i = sum_{a on path(i), a != root} prefix(parent(a)) * sum_b |b| exp(s(a,b) - L_a) mean_b(v)
            + prefix(i) * v_i,               prefix(a) = prod_{a' on path to a, a' != root} pi_a'

A flat tree (root over the N leaves) is exactly softmax attention. The DP runs bottom-up over
subtree means (one index_add), then one logaddexp per tree level for g, then top-down in log
space: O(sum_A c_A^2 d + N depth d) for c_A children of node A, against O(N^2 d) for softmax.

Tree format (`forward(x, tree=...)`), one tree shared by the batch:
- a parent vector, an integer Tensor (num_nodes,): nodes 0..N-1 are the leaves (token n is
  node n), nodes N..num_nodes-1 are internal, `parent[root] = -1`; or
- nested Python lists / tuples of leaf indices, e.g. [[0, 1], [2, [3, 4]]]: each list is an
  internal node, the outermost is the root; every leaf 0..N-1 appears exactly once.
  (A Python list is always read as nested groups; pass a parent vector as a Tensor.)
- `tree=None` is the flat hierarchy: plain multi-head softmax attention through
  `attnlab.ops.attention` (same weights and names as `mhsa`, so an mhsa state dict loads).
Status: the derived attention and its DP as above; training and inference on a given tree.
Sources: the paper's PDF could not be read here and no code is released. The DP follows the
abstract's principle (entropy minimisation, closest to softmax) and agrees with the paper's
Sec. 3 formulas as transcribed in a NeurIPS 2025 paper note
(papernotes, "Hierarchical Self-Attention ..."): the block energy
    psi(A -> B) = -eps(A')^T eps(B') + 1 / (2 sqrt(d) |A| |B|) sum_{i in A, j in B} ||q_i - k_j||^2
(a mean over the leaf pairs of A and B: the two-sided block constraint read here), and the
recursion phi(A) = -sum_{B child of A} (|B| / |A|) log[exp(-phi(B)) + sum_{C sibling of B}
|C| exp(-psi(B -> C))], which is g_A and L_a above with g = -phi, s = -psi; Theorem 3.2 (the
KL-closest block-constrained matrix to flat softmax) is what the tests solve numerically.
Deviations / readings:
- Energy: the dot product s(A, B) = scale mean_A(q) . mean_B(k) instead of the mean squared
  distance. With q and k of fixed norm (the LayerNorm of the paper's Prop. 3.1) the two differ by
  a constant, which cancels at every level (each node's weights |B| / |A| sum to one); without
  that normalisation they differ. Queries live at the leaves only; a leaf's own energy is
  g_i = s_ii (phi(i) = psi(i -> i), not in the note), so that a flat tree is softmax.
- No positional term: the paper's -eps(A')^T eps(B') (sibling positional embeddings) is left to
  the caller's embeddings.
- Masks, causal attention and the KV cache are not supported (spec False, NotImplementedError):
  a block's energy averages the queries of a whole subtree, so a token's output depends on
  later tokens of its subtree and no causal order can hold; an arbitrary (N, M) mask breaks the
  constant-block structure the DP relies on.
- Attention dropout (`attn_drop`, training only) with a tree drops whole blocks (the mass a
  child gives one sibling block) and leaf self-weights, not single entries.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from attnlab.cache import KVCache
from attnlab._checks import check_dims, check_dropout, check_features, check_positive, check_tokens
from attnlab.hooks import HookPoint
from attnlab.ops.sdpa import attention
from attnlab.registry import MechanismSpec, register

NAME = "hierarchical"


# --- tree parsing and validation ----------------------------------------------------------------

def _groups_to_parent(tree, N: int) -> tuple[int, ...]:
    """Nested lists of leaf indices -> parent vector (internal nodes numbered N.. in preorder)."""
    parent: dict[int, int] = {}
    seen: set[int] = set()
    next_id = N

    def visit(group, parent_id: int, path: str) -> None:
        nonlocal next_id
        if isinstance(group, (list, tuple)):
            if len(group) == 0:
                raise ValueError(f"{NAME}: tree group {path} is empty; every group needs at least one leaf")
            node = next_id
            next_id += 1
            parent[node] = parent_id
            for idx, child in enumerate(group):
                visit(child, node, f"{path}[{idx}]")
            return
        if isinstance(group, bool) or not isinstance(group, int):
            raise TypeError(f"{NAME}: tree entries must be leaf indices (int) or nested lists of them, "
                            f"got {group!r} ({type(group).__name__}) at tree{path}")
        if not 0 <= group < N:
            raise ValueError(f"{NAME}: tree leaf {group} at tree{path} is out of range for N={N} tokens "
                             f"(expected 0..{N - 1})")
        if group in seen:
            raise ValueError(f"{NAME}: tree leaf {group} appears more than once (again at tree{path})")
        seen.add(group)
        parent[group] = parent_id

    visit(tree, -1, "")
    missing = sorted(set(range(N)) - seen)
    if missing:
        raise ValueError(f"{NAME}: tree must contain every leaf 0..{N - 1} once; missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}")
    return tuple(parent[node] for node in range(next_id))


@functools.lru_cache(maxsize=64)
def _check_parent(parent: tuple[int, ...], N: int) -> None:
    T = len(parent)
    if T < N:
        raise ValueError(f"{NAME}: tree has {T} nodes, fewer than the N={N} leaf tokens "
                         "(nodes 0..N-1 are the leaves)")
    for node, p in enumerate(parent):
        if not -1 <= p < T:
            raise ValueError(f"{NAME}: tree parent[{node}] = {p} is out of range (expected -1 for the root "
                             f"or a node index in 0..{T - 1})")
        if 0 <= p < N:
            raise ValueError(f"{NAME}: tree parent[{node}] = {p} is a leaf; leaves (nodes 0..{N - 1}) "
                             f"cannot have children, parents must be internal nodes {N}..{T - 1}")
        if p == node:
            raise ValueError(f"{NAME}: tree parent[{node}] = {node}: a node cannot be its own parent")
    roots = [node for node, p in enumerate(parent) if p == -1]
    if len(roots) != 1:
        raise ValueError(f"{NAME}: tree must have exactly one root (parent -1), got {len(roots)}: {roots[:10]}")
    has_child = [False] * T
    for p in parent:
        if p >= 0:
            has_child[p] = True
    childless = [node for node in range(N, T) if not has_child[node]]
    if childless:
        raise ValueError(f"{NAME}: tree internal nodes {childless[:10]} have no children "
                         f"(every node {N}..{T - 1} must have at least one)")
    if roots[0] < N and T > 1:
        raise ValueError(f"{NAME}: tree root is leaf {roots[0]}; with more than one node the root must "
                         f"be an internal node {N}..{T - 1}")
    # Every node must reach the root without a cycle.
    state = [0] * T          # 0 unknown, 1 on the current walk, 2 reaches the root
    state[roots[0]] = 2
    for start in range(T):
        walk, node = [], start
        while state[node] == 0:
            state[node] = 1
            walk.append(node)
            node = parent[node]
        if state[node] == 1:
            raise ValueError(f"{NAME}: tree has a cycle through node {node}")
        for w in walk:
            state[w] = 2


def parse_tree(tree, N: int) -> tuple[int, ...]:
    """Validate `tree` (parent Tensor or nested lists) for N leaves; return the parent vector."""
    if isinstance(tree, Tensor):
        if tree.dtype == torch.bool or tree.is_floating_point() or tree.is_complex():
            raise TypeError(f"{NAME}: a tree parent vector must be an integer tensor, got dtype {tree.dtype}")
        if tree.dim() != 1:
            raise ValueError(f"{NAME}: a tree parent vector must be 1-D (num_nodes,), got shape "
                             f"{tuple(tree.shape)}")
        parent = tuple(int(p) for p in tree.tolist())
    elif isinstance(tree, (list, tuple)):
        parent = _groups_to_parent(tree, N)
    else:
        raise TypeError(f"{NAME}: tree must be an integer Tensor (parent vector), nested lists of leaf "
                        f"indices, or None, got {type(tree).__name__}")
    _check_parent(parent, N)
    return parent


# --- the compiled tree: index tensors for the DP ------------------------------------------------

@dataclass(frozen=True)
class CompiledTree:
    """Index tensors over a validated tree (on CPU; `to` moves them)."""

    num_nodes: int
    size: Tensor          # (T,) leaves under each node, float64
    anc_node: Tensor      # (E1,) with anc_leaf: (node, leaf) for every leaf under every node
    anc_leaf: Tensor
    pair_a: Tensor        # (P,) ordered pairs of distinct siblings (a, b)
    pair_b: Tensor
    has_sibling: Tensor   # (T,) bool
    levels: tuple         # per depth, deepest first: (nodes, their parents, |node| / |parent|)
    pre_node: Tensor      # (E2,) with pre_anc: (node, ancestor-or-self) pairs, root excluded
    pre_anc: Tensor
    path_leaf: Tensor     # (E3,) with path_node, path_parent: leaf i, a on path(i) minus root,
    path_node: Tensor     #   and parent(a)
    path_parent: Tensor

    def to(self, device) -> "CompiledTree":
        moved = {}
        for name, value in self.__dict__.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
            elif name == "levels":
                moved[name] = tuple(tuple(t.to(device) for t in level) for level in value)
            else:
                moved[name] = value
        return CompiledTree(**moved)


@functools.lru_cache(maxsize=64)
def compile_tree(parent: tuple[int, ...], N: int) -> CompiledTree:
    T = len(parent)
    children: list[list[int]] = [[] for _ in range(T)]
    root = parent.index(-1)
    for node, p in enumerate(parent):
        if p >= 0:
            children[p].append(node)
    depth = [0] * T
    order = [root]
    for node in order:                      # breadth-first: parents before children
        for c in children[node]:
            depth[c] = depth[node] + 1
            order.append(c)
    size = [0] * T
    for node in reversed(order):
        size[node] = 1 if node < N else sum(size[c] for c in children[node])

    def ancestors_or_self(node: int) -> list[int]:
        out = [node]
        while parent[out[-1]] != -1:
            out.append(parent[out[-1]])
        return out

    anc_node, anc_leaf = [], []
    path_leaf, path_node, path_parent = [], [], []
    for leaf in range(N):
        for a in ancestors_or_self(leaf):
            anc_node.append(a)
            anc_leaf.append(leaf)
            if a != root:
                path_leaf.append(leaf)
                path_node.append(a)
                path_parent.append(parent[a])
    pair_a, pair_b = [], []
    for node in range(T):
        for a in children[node]:
            for b in children[node]:
                if a != b:
                    pair_a.append(a)
                    pair_b.append(b)
    has_sibling = [node != root and len(children[parent[node]]) > 1 for node in range(T)]
    levels = []
    for dd in range(max(depth), 0, -1):
        nodes = [n for n in range(T) if depth[n] == dd]
        levels.append((torch.tensor(nodes), torch.tensor([parent[n] for n in nodes]),
                       torch.tensor([size[n] / size[parent[n]] for n in nodes], dtype=torch.float64)))
    pre_node, pre_anc = [], []
    for node in range(T):
        if node == root:
            continue
        for a in ancestors_or_self(node):
            if a != root:
                pre_node.append(node)
                pre_anc.append(a)

    def long(values):
        return torch.tensor(values, dtype=torch.long)

    return CompiledTree(
        num_nodes=T, size=torch.tensor(size, dtype=torch.float64), anc_node=long(anc_node),
        anc_leaf=long(anc_leaf), pair_a=long(pair_a), pair_b=long(pair_b),
        has_sibling=torch.tensor(has_sibling, dtype=torch.bool), levels=tuple(levels),
        pre_node=long(pre_node), pre_anc=long(pre_anc), path_leaf=long(path_leaf),
        path_node=long(path_node), path_parent=long(path_parent))


@functools.lru_cache(maxsize=64)
def _compiled_on(parent: tuple[int, ...], N: int, device: torch.device) -> CompiledTree:
    """compile_tree, moved to `device` once per (tree, device)."""
    return compile_tree(parent, N).to(device)


# --- the DP -------------------------------------------------------------------------------------

def hierarchical_attention(q: Tensor, k: Tensor, v: Tensor, tree: CompiledTree, *, scale: float,
                           dropout_p: float = 0.0) -> Tensor:
    """HSA of q, k (B, h, N, d), v (B, h, N, dv) over `tree` -> (B, h, N, dv), in float32
    (float64 for float64 input), returned in the compute dtype.

    Equivalent PyTorch (brute force, O(N^2) pairs; see the module docstring):
        for each leaf pair (i, j), i != j: A, B = the children of lca(i, j) holding i and j
        P[i, j] = prefix_i(lca) * exp(s(A, B) - L_A);  P[i, i] = prefix_i(i);  out = P @ v
    """
    B, h, N, _ = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    T = tree.num_nodes
    size = tree.size.to(compute)                                              # (T,)

    def node_mean(t: Tensor) -> Tensor:                                        # (B, h, N, e) -> (B, h, T, e)
        sums = t.new_zeros(B, h, T, t.shape[-1]).index_add(2, tree.anc_node, t[:, :, tree.anc_leaf])
        return sums / size[:, None]

    q_mean, k_mean, v_mean = node_mean(q), node_mean(k), node_mean(v)         # (B, h, T, d)
    pa, pb = tree.pair_a, tree.pair_b
    # Block logits s(a, b) + log|b|: the score of block b as seen from child a (bilinear mean).
    block = scale * (q_mean[:, :, pa] * k_mean[:, :, pb]).sum(-1) + torch.log(size)[pb]  # (B, h, P)
    # Per child a: logsumexp over its sibling blocks (a segment logsumexp over pairs).
    peak = block.new_full((B, h, T), float("-inf")).scatter_reduce(
        -1, pa.expand(B, h, -1), block, reduce="amax", include_self=True)
    peak = torch.where(tree.has_sibling, peak, torch.zeros_like(peak)).detach()  # (B, h, T)
    sib_sum = block.new_zeros(B, h, T).index_add(-1, pa, torch.exp(block - peak[:, :, pa]))
    sib_sum = torch.where(tree.has_sibling, sib_sum, torch.ones_like(sib_sum))
    sib_lse = torch.log(sib_sum) + peak                                       # (B, h, T), unused w/o siblings

    # Bottom-up: g (per-row log-partition of each subtree), L (log-partition at the parent).
    g = torch.cat([scale * (q * k).sum(-1), q.new_zeros(B, h, T - N)], dim=-1)  # (B, h, T)
    log_z = q.new_zeros(B, h, T)                                              # L, 0 at the root
    for nodes, parents, weight in tree.levels:
        g_nodes = g[:, :, nodes]
        l_nodes = torch.where(tree.has_sibling[nodes], torch.logaddexp(g_nodes, sib_lse[:, :, nodes]), g_nodes)
        log_z = log_z.index_copy(-1, nodes, l_nodes)
        g = g.index_add(-1, parents, weight.to(compute) * l_nodes)

    # Top-down, in log space: log pi_a = g_a - L_a; prefix(a) = sum of log pi on the path to a.
    log_pi = g - log_z                                                        # (B, h, T); root: 0 (unused)
    log_prefix = q.new_zeros(B, h, T).index_add(-1, tree.pre_node, log_pi[:, :, tree.pre_anc])
    weight = torch.exp(block - log_z[:, :, pa])                               # (B, h, P) block masses
    self_weight = torch.exp(log_prefix[:, :, :N])                             # (B, h, N) P[i, i]
    if dropout_p > 0.0:
        weight = F.dropout(weight, p=dropout_p)
        self_weight = F.dropout(self_weight, p=dropout_p)
    # Per child a: the value its rows receive from all its sibling blocks, sum_b mass_ab mean_b(v).
    from_siblings = v.new_zeros(B, h, T, v.shape[-1]).index_add(
        2, pa, weight[..., None] * v_mean[:, :, pb])                          # (B, h, T, dv)
    reach = torch.exp(log_prefix[:, :, tree.path_parent])                     # (B, h, E3)
    out = self_weight[..., None] * v                                          # (B, h, N, dv)
    out = out.index_add(2, tree.path_leaf, reach[..., None] * from_siblings[:, :, tree.path_node])
    return out


@register(MechanismSpec(
    name=NAME, paper="Hierarchical Self-Attention: Generalizing Neural Attention Mechanics to Multi-Scale Problems",
    year=2025, family="hierarchical", layout="seq",
    time="O(sum_A c_A^2 d + N depth d) for c_A children per node (O(N^2 d) flat)",
    memory="O(sum_A c_A^2 d + N depth d) (gathered pairs; O(N^2 d) flat)", exact=False,
    causal=False, attn_mask=False, kv_cache=False, backends=("sdpa", "flex", "reference"),
    url="https://arxiv.org/abs/2509.15448",
    provenance="paper",
    source=("arXiv 2509.15448 Sec. 3: block energy psi(A->B) (mean over leaf pairs) and the recursion "
            "phi(A) = -sum_B |B|/|A| log[e^-phi(B) + sum_C |C| e^-psi(B->C)], Theorem 3.2, as "
            "transcribed in a NeurIPS 2025 paper note (the PDF was not read; no code released). "
            "Readings: dot-product energy (equal to the squared distance only for fixed-norm q, k), "
            "no positional eps term"),
    test_kwargs=dict(qkv_bias=True)))
class HierarchicalAttention(nn.Module):
    """x (B, N, C), tree -> (B, N, C). `tree=None` is flat: exactly mhsa with the same weights.

    The DP runs in float32 (float64 for float64 input) and casts back. `backend` applies to the
    flat path, which runs through `attnlab.ops.attention`; `spec.backends` are the flat path's.
    The tree path runs its own DP on no attention backend, so an explicit `backend` with a tree
    raises NotImplementedError. Hooks (attnlab.hooks): scores and probs only on the flat path's
    eager run (`backend="reference"`); the tree path never forms an N x N matrix.
    """

    hook_names = ("hook_q", "hook_k", "hook_v", "hook_scores", "hook_probs", "hook_out")
    eager_hook_names = ("hook_scores", "hook_probs")

    def __init__(self, dim: int, num_heads: int = 8, *, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, scale: float | None = None, backend: str | None = None,
                 device=None, dtype=None):
        super().__init__()
        self.head_dim = check_dims(NAME, dim, num_heads)
        check_dropout(NAME, attn_drop=attn_drop, proj_drop=proj_drop)
        if scale is not None:
            check_positive(NAME, "scale", scale)
        factory = dict(device=device, dtype=dtype)
        self.dim, self.num_heads = dim, num_heads
        self.scale, self.backend, self.attn_drop = scale, backend, float(attn_drop)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **factory)
        self.proj = nn.Linear(dim, dim, **factory)
        self.proj_drop = nn.Dropout(proj_drop)
        self.hook_q = HookPoint()    # (B, h, N, d)
        self.hook_k = HookPoint()    # (B, h, N, d)
        self.hook_v = HookPoint()    # (B, h, N, d)
        self.hook_scores = HookPoint()   # (B, h, N, N), flat path only, the softmax input (eager path only)
        self.hook_probs = HookPoint()    # (B, h, N, N), flat path only, the softmax output (eager path only)
        self.hook_out = HookPoint()  # (B, h, N, d), per-head outputs before proj

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"

    def forward(self, x: Tensor, *, tree=None, attn_mask: Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None) -> Tensor:
        check_tokens(NAME, x, self.dim)
        check_features(self, attn_mask=attn_mask, is_causal=is_causal, cache=cache)
        B, N, C = x.shape
        if tree is not None and self.backend is not None:
            raise NotImplementedError(
                f"mechanism {NAME!r} does not support backend={self.backend!r} with a tree: the tree path "
                "runs its own dynamic programme, not an attention backend (backend applies to tree=None)")
        compiled = None if tree is None else _compiled_on(parse_tree(tree, N), N, x.device)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)    # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                        # 3 x (B, h, N, d)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        dropout_p = self.attn_drop if self.training else 0.0
        if compiled is None:
            out = attention(q, k, v, scores_hook=self.hook_scores, probs_hook=self.hook_probs,
                            scale=self.scale, dropout_p=dropout_p, backend=self.backend)
        else:
            scale = 1.0 / math.sqrt(self.head_dim) if self.scale is None else self.scale
            out = hierarchical_attention(q, k, v, compiled, scale=scale, dropout_p=dropout_p).to(x.dtype)
        out = self.hook_out(out)                                              # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, C)                            # (B, N, C)
        return self.proj_drop(self.proj(out))
