"""hierarchical (HSA) against brute-force evaluations of the formula, on small trees.

Two references, written from the paper's principle and sharing no code with the module:
- `brute_force_probs`: the closed form evaluated pair by pair, with every block energy an
  explicit double loop over leaf pairs (no bilinear shortcut, no DP tables);
- `solve_free_energy`: the defining optimisation itself, min_P sum_ij P_ij (E_ij + log P_ij)
  subject to row sums 1 and constant blocks P[A, B] for sibling subtrees, solved by Newton's
  method on the block values (no closed form at all).
A flat hierarchy must be softmax attention, i.e. `mhsa` with the same weights.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab import KVCache
from attnlab.mechanisms.hierarchical import compile_tree, hierarchical_attention, parse_tree

DIM, HEADS = 8, 2
D = DIM // HEADS
TIGHT = dict(rtol=1e-10, atol=1e-12)

# Small trees as nested groups over N leaves (the outermost list is the root).
TREES = {
    "two_groups": (5, [[0, 1, 2], [3, 4]]),
    "nested": (6, [[0, 1], [2, [3, 4]], 5]),
    "unbalanced_chain": (5, [0, [1, [2, [3, 4]]]]),
    "single_child": (4, [[[0, 1]], [2, 3]]),
    "interleaved": (6, [[0, 3, 5], [1, [2, 4]]]),   # groups need not be contiguous
    "singletons": (3, [[0], [1], [2]]),
}


def make(dtype=torch.float64, **options):
    torch.manual_seed(0)
    return attnlab.create("hierarchical", DIM, HEADS, **{"qkv_bias": True, **options}).to(dtype).eval()


def heads(m, x):
    B, N, C = x.shape
    qkv = x @ m.qkv.weight.T + m.qkv.bias
    q, k, v = qkv.reshape(B, N, 3, HEADS, D).permute(2, 0, 3, 1, 4)       # (B, h, N, d) each
    return q, k, v


# --- tree helpers, independent of the module ----------------------------------------------------

def nested_to_nodes(groups):
    """-> (children: dict node -> list, leaves_of: dict node -> list, root). Internal nodes are
    named ("g", id); leaves are ints."""
    children, leaves_of = {}, {}
    counter = iter(range(10 ** 6))

    def visit(g):
        if isinstance(g, int):
            leaves_of[g] = [g]
            return g
        node = ("g", next(counter))
        children[node] = [visit(c) for c in g]
        leaves_of[node] = [leaf for c in children[node] for leaf in leaves_of[c]]
        return node

    return children, leaves_of, visit(groups)


def path_to(children, root, leaf):
    """Nodes from root down to `leaf`, inclusive."""
    def walk(node):
        if node == leaf:
            return [node]
        for c in children.get(node, []):
            p = walk(c)
            if p:
                return [node] + p
        return None
    return walk(root)


def brute_force_probs(q, k, groups, scale):
    """P (N, N) for one head from the closed form, every quantity by explicit loops.

    s(A, B) = mean over leaf pairs of scale * q_i . k_j; g(leaf i) = s_ii;
    L(a) = log(exp g(a) + sum_{b sibling} |b| exp s(a, b)); g(A) = sum_a |a|/|A| L(a).
    """
    children, leaves_of, root = nested_to_nodes(groups)
    N = q.shape[0]

    def s(A, B):
        total = 0.0
        for i in leaves_of[A]:
            for j in leaves_of[B]:
                total = total + scale * torch.dot(q[i], k[j])
        return total / (len(leaves_of[A]) * len(leaves_of[B]))

    g_cache, L_cache = {}, {}

    def g(node):
        if node not in g_cache:
            if isinstance(node, int):
                g_cache[node] = scale * torch.dot(q[node], k[node])
            else:
                g_cache[node] = sum(len(leaves_of[a]) / len(leaves_of[node]) * L(node, a)
                                    for a in children[node])
        return g_cache[node]

    def L(parent, a):
        if a not in L_cache:
            terms = [g(a)] + [math.log(len(leaves_of[b])) + s(a, b) for b in children[parent] if b != a]
            L_cache[a] = torch.logsumexp(torch.stack([torch.as_tensor(t, dtype=q.dtype) for t in terms]), 0)
        return L_cache[a]

    rows = []
    for i in range(N):
        row = [torch.zeros((), dtype=q.dtype)] * N
        path = path_to(children, root, i)
        prefix = torch.ones((), dtype=q.dtype)
        for parent, a in zip(path[:-1], path[1:]):
            for b in children[parent]:
                if b != a:
                    for j in leaves_of[b]:
                        row[j] = prefix * torch.exp(s(a, b) - L(parent, a))
            prefix = prefix * torch.exp(g(a) - L(parent, a))
        row[i] = prefix
        rows.append(torch.stack(row))
    return torch.stack(rows)


def brute_force_forward(m, x, groups):
    B, N, C = x.shape
    q, k, v = heads(m, x)
    out = torch.stack([torch.stack([brute_force_probs(q[b, hh], k[b, hh], groups, 1 / math.sqrt(D)) @ v[b, hh]
                                    for hh in range(HEADS)]) for b in range(B)])   # (B, h, N, d)
    return out.transpose(1, 2).reshape(B, N, C) @ m.proj.weight.T + m.proj.bias


def solve_free_energy(E, groups):
    """argmin_P sum_ij P_ij (E_ij + log P_ij), rows sum to 1, P[A, B] constant for siblings A != B.

    Variables: one value per class (a diagonal entry, or an ordered sibling pair at the lowest
    common ancestor); equality-constrained Newton from the feasible uniform matrix.
    """
    children, leaves_of, root = nested_to_nodes(groups)
    N = E.shape[0]
    cls = {}
    owner = [[None] * N for _ in range(N)]
    for i in range(N):
        owner[i][i] = cls.setdefault(("diag", i), len(cls))
    for node, kids in children.items():
        for a in kids:
            for b in kids:
                if a != b:
                    c = cls.setdefault((a, b), len(cls))
                    for i in leaves_of[a]:
                        for j in leaves_of[b]:
                            owner[i][j] = c
    C = len(cls)
    eps = torch.zeros(C, dtype=E.dtype)
    count = torch.zeros(C, dtype=E.dtype)
    A = torch.zeros(N, C, dtype=E.dtype)
    for i in range(N):
        for j in range(N):
            c = owner[i][j]
            eps[c] += E[i, j]
            count[c] += 1
            A[i, c] += 1

    def objective(u):
        return (eps * u + count * u * torch.log(u)).sum()

    u = torch.full((C,), 1.0 / N, dtype=E.dtype)
    for _ in range(200):
        grad = eps + count * (torch.log(u) + 1)
        kkt = torch.zeros(C + N, C + N, dtype=E.dtype)
        kkt[:C, :C] = torch.diag(count / u)
        kkt[:C, C:] = A.T
        kkt[C:, :C] = A
        step = torch.linalg.solve(kkt, torch.cat([-grad, torch.zeros(N, dtype=E.dtype)]))[:C]
        t = 1.0
        while (u + t * step <= 0).any() or objective(u + t * step) > objective(u) + 1e-4 * t * (grad @ step):
            t /= 2
        u = u + t * step
        if step.abs().max() < 1e-15:
            break
    return torch.stack([torch.stack([u[owner[i][j]] for j in range(N)]) for i in range(N)])


def dp_probs(q, k, groups):
    """The module's DP with v = identity reads out the attention matrix P (N, N)."""
    N = q.shape[0]
    tree = compile_tree(parse_tree(groups, N), N)
    eye = torch.eye(N, dtype=q.dtype)[None, None]
    return hierarchical_attention(q[None, None], k[None, None], eye, tree, scale=1 / math.sqrt(q.shape[-1]))[0, 0]


# --- DP against the brute-force formula ---------------------------------------------------------

@pytest.mark.parametrize("tree_name", list(TREES))
def test_dp_matches_brute_force_outputs_and_grads(tree_name):
    N, groups = TREES[tree_name]
    m = make()
    x = torch.randn(2, N, DIM, dtype=torch.float64, requires_grad=True)
    y = m(x, tree=groups)
    y_ref = brute_force_forward(m, x, groups)
    assert_close(y, y_ref, **TIGHT)
    w = torch.randn_like(y)
    params = list(m.parameters())
    grads = torch.autograd.grad((y * w).sum(), [x, *params])
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x, *params])
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, **TIGHT)


@pytest.mark.parametrize("tree_name", list(TREES))
def test_dp_solves_the_free_energy_problem(tree_name):
    """The DP's P is the constrained free-energy minimiser, found here by Newton's method."""
    N, groups = TREES[tree_name]
    torch.manual_seed(3)
    q, k = 1.5 * torch.randn(N, D, dtype=torch.float64), 1.5 * torch.randn(N, D, dtype=torch.float64)
    P = dp_probs(q, k, groups)
    E = -(q @ k.T) / math.sqrt(D)
    assert_close(P, solve_free_energy(E, groups), rtol=1e-9, atol=1e-11)
    assert_close(P.sum(-1), torch.ones(N, dtype=torch.float64), rtol=0, atol=1e-12)


def test_random_trees_match_brute_force():
    gen = torch.Generator().manual_seed(7)

    def random_groups(leaves):
        if len(leaves) == 1:
            return leaves[0]
        if torch.rand((), generator=gen) < 0.3:
            return list(leaves)
        n_cuts = int(torch.randint(1, min(3, len(leaves) - 1) + 1, (), generator=gen))
        cuts = sorted((torch.randperm(len(leaves) - 1, generator=gen)[:n_cuts] + 1).tolist())
        bounds = [0] + cuts + [len(leaves)]
        return [random_groups(leaves[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    for trial in range(8):
        N = int(torch.randint(2, 8, (), generator=gen))
        perm = torch.randperm(N, generator=gen).tolist()
        groups = random_groups(perm)
        if isinstance(groups, int):
            groups = [groups]
        q = torch.randn(N, D, dtype=torch.float64, generator=gen)
        k = torch.randn(N, D, dtype=torch.float64, generator=gen)
        assert_close(dp_probs(q, k, groups), brute_force_probs(q, k, groups, 1 / math.sqrt(D)), **TIGHT,
                     msg=lambda msg: f"tree {groups}: {msg}")


def test_blocks_are_constant_and_rows_stochastic():
    N, groups = TREES["nested"]
    q, k = torch.randn(N, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    P = dp_probs(q, k, groups)
    # [[0, 1], [2, [3, 4]], 5]: rows 0, 1 give one value to all of {2, 3, 4}; rows 2..4 one to {0, 1}
    block = P[:2][:, [2, 3, 4]]
    assert_close(block, block[0, 0].expand_as(block), **TIGHT)
    block = P[[2, 3, 4]][:, [0, 1]]
    assert_close(block, block[0, 0].expand_as(block), **TIGHT)
    block = P[[3, 4]][:, [2]]
    assert_close(block, block[0, 0].expand_as(block), **TIGHT)
    assert_close(P.sum(-1), torch.ones(N, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (P > 0).all()


# --- the flat hierarchy is softmax attention ----------------------------------------------------

@pytest.mark.parametrize("flat", ["none", "parent_vector", "one_group", "group_in_group"])
def test_flat_hierarchy_is_mhsa(flat):
    m = make()
    N = 7
    tree = {"none": None, "parent_vector": torch.tensor([N] * N + [-1]), "one_group": list(range(N)),
            "group_in_group": [list(range(N))]}[flat]
    mhsa = attnlab.create("mhsa", DIM, HEADS, qkv_bias=True).double().eval()
    mhsa.load_state_dict(m.state_dict())
    x = torch.randn(3, N, DIM, dtype=torch.float64, requires_grad=True)
    y, y_ref = m(x, tree=tree), mhsa(x)
    assert_close(y, y_ref, **TIGHT)
    g, g_ref = torch.autograd.grad(y.square().sum(), x), torch.autograd.grad(y_ref.square().sum(), x)
    assert_close(g[0], g_ref[0], **TIGHT)


def test_hierarchy_changes_the_output():
    m = make()
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    assert not torch.allclose(m(x, tree=TREES["nested"][1]), m(x))


def test_parent_vector_and_nested_groups_agree():
    m = make()
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    # [[0, 1], [2, [3, 4]], 5]: root 6, groups 7 = {0, 1}, 8 = {2, 9}, 9 = {3, 4}
    parent = torch.tensor([7, 7, 8, 9, 9, 6, -1, 6, 6, 8])
    assert_close(m(x, tree=parent), m(x, tree=[[0, 1], [2, [3, 4]], 5]), **TIGHT)


def test_relabelling_leaves_permutes_outputs():
    m = make()
    N = 6
    x = torch.randn(2, N, DIM, dtype=torch.float64)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])             # new token n is old token perm[n]
    old_to_new = torch.argsort(perm).tolist()
    groups = [[0, 1], [2, [3, 4]], 5]

    def relabel(g):
        return old_to_new[g] if isinstance(g, int) else [relabel(c) for c in g]

    assert_close(m(x[:, perm], tree=relabel(groups)), m(x, tree=groups)[:, perm], **TIGHT)


# --- dtypes, batch, gradcheck, training ---------------------------------------------------------

@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_low_precision_close_to_float64(dtype, tol):
    m64 = make()
    m = make(dtype)
    x = torch.randn(2, 6, DIM, dtype=dtype)
    y = m(x, tree=TREES["nested"][1])
    assert y.dtype == dtype and torch.isfinite(y).all()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    assert_close(y.double(), m64(x.double(), tree=TREES["nested"][1]), rtol=tol, atol=tol)


def test_batch_invariance_and_empty_batch():
    m = make(torch.float32)
    groups = TREES["interleaved"][1]
    x = torch.randn(4, 6, DIM)
    y = m(x, tree=groups)
    for i in range(4):
        assert_close(y[i:i + 1], m(x[i:i + 1], tree=groups), rtol=1e-5, atol=1e-6)
    assert m(x[:0], tree=groups).shape == (0, 6, DIM)
    assert_close(m(x[:, :1], tree=torch.tensor([-1])), m(x[:, :1]), rtol=1e-6, atol=1e-6)


def test_gradcheck():
    torch.manual_seed(1)
    m = attnlab.create("hierarchical", 4, 2, qkv_bias=True).double().eval()
    x = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t, tree=[[0, 1], [2, [3, 4]]]), (x,))


def test_attention_dropout_only_in_training():
    m = make(attn_drop=0.5)
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    groups = TREES["nested"][1]
    assert_close(m(x, tree=groups), m(x, tree=groups), rtol=0, atol=0)
    m.train()
    y1, y2 = m(x, tree=groups), m(x, tree=groups)
    assert torch.isfinite(y1).all() and not torch.allclose(y1, y2)


# --- bad input ----------------------------------------------------------------------------------

BAD_TREES = [
    (torch.tensor([5.0, 5.0, 5.0, 5.0, 5.0, -1.0]), TypeError, "integer tensor"),
    (torch.tensor([[5, 5, 5, 5, 5, -1]]), ValueError, r"1-D .*\(1, 6\)"),
    (torch.tensor([5, 5, 5, -1]), ValueError, "4 nodes, fewer than the N=5"),
    (torch.tensor([5, 5, 5, 5, 9, -1]), ValueError, r"parent\[4\] = 9 is out of range"),
    (torch.tensor([5, 5, 5, 5, 0, -1]), ValueError, r"parent\[4\] = 0 is a leaf"),
    (torch.tensor([5, 5, 5, 5, 5, 5]), ValueError, r"own parent"),
    (torch.tensor([5, 5, 5, 5, 5, -1, -1]), ValueError, "exactly one root .* got 2"),
    (torch.tensor([6, 6, 6, 6, 6, 7, 5, 6]), ValueError, "exactly one root .* got 0"),
    (torch.tensor([5, 5, 5, 5, 5, -1, 5]), ValueError, r"internal nodes \[6\] have no children"),
    (torch.tensor([6, 6, 6, 6, 6, 7, 5, 6, -1]), ValueError, r"no children|cycle"),
    ([[0, 1], [2, 3]], ValueError, r"missing \[4\]"),
    ([[0, 1], [2, 3, 4, 1]], ValueError, "leaf 1 appears more than once"),
    ([[0, 1], [2, 3, 5], 4], ValueError, r"leaf 5 at tree\[1\]\[2\] is out of range for N=5"),
    ([[0, 1], [], [2, 3, 4]], ValueError, r"group \[1\] is empty"),
    ([[0, 1.0], [2, 3, 4]], TypeError, r"got 1.0 \(float\) at tree\[0\]\[1\]"),
    ([[0, True], [2, 3, 4]], TypeError, "leaf indices"),
    ("0 1 2 3 4", TypeError, "tree must be an integer Tensor"),
]


@pytest.mark.parametrize("tree,exc,pattern", BAD_TREES, ids=[f"bad{i}" for i in range(len(BAD_TREES))])
def test_bad_tree_raises(tree, exc, pattern):
    m = make()
    with pytest.raises(exc, match=pattern) as info:
        m(torch.randn(2, 5, DIM, dtype=torch.float64), tree=tree)
    assert "hierarchical" in str(info.value)


def test_cycle_raises():
    m = make()
    # 5 -> 6 -> 5 is a cycle detached from the root 7.
    with pytest.raises(ValueError, match="cycle"):
        m(torch.randn(1, 5, DIM, dtype=torch.float64), tree=torch.tensor([5, 5, 7, 7, 7, 6, 5, -1]))


@pytest.mark.parametrize("kwargs,feature", [(dict(is_causal=True), "causal"),
                                            (dict(attn_mask=torch.ones(2, 5, dtype=torch.bool)), "attn_mask"),
                                            (dict(cache=KVCache()), "kv_cache")])
def test_unsupported_features_raise_with_a_tree(kwargs, feature):
    m = make()
    with pytest.raises(NotImplementedError, match=f"'hierarchical' does not support {feature}"):
        m(torch.randn(2, 5, DIM, dtype=torch.float64), tree=[[0, 1], [2, 3, 4]], **kwargs)


@pytest.mark.parametrize("option", [dict(attn_drop=1.0), dict(proj_drop=-0.5), dict(scale=0.0),
                                    dict(scale=float("nan"))])
def test_bad_options_raise(option):
    with pytest.raises(ValueError, match="hierarchical"):
        attnlab.create("hierarchical", DIM, HEADS, **option)


@pytest.mark.parametrize("backend", attnlab.get_spec("hierarchical").backends)
def test_listed_backends_run_the_flat_path_and_refuse_a_tree(backend):
    """spec.backends are the flat path's: each runs tree=None; the tree path takes none."""
    m = attnlab.create("hierarchical", 32, 4, backend=backend).double().eval()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        assert m(x).shape == x.shape
        with pytest.raises(NotImplementedError, match=r"'hierarchical'.*backend.*tree"):
            m(x, tree=[[0, 1, 2], [3, 4, 5]])
