"""attnlab.models.dcal against naive float64 references written from the DCAL paper (CVPR 2022).

Eq. (2) attention rollout, the top-R selection by the CLS row, Eq. (3) GLCA and Eq. (4) PWCA
inside pre-norm ViT blocks, and the uncertainty-weighted loss 1/2 sum(exp(-w_i) L_i + w_i), each
written out here with loops and the modules' weights (nothing from attnlab). Plus gradients
reaching the right parameters, a short training run beside attnlab's plain Classifier, and bad input.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import attnlab
from attnlab.models import (DCALBlock, DCALClassifier, DCALTransformer, GLCABlock, UncertaintyWeightedLoss,
                            attention_rollout, select_local_queries)
from attnlab.models.dcal import num_local_queries, random_pairs

TIGHT = dict(rtol=1e-10, atol=1e-12)
DIM, HEADS = 16, 2


def randomize(module):
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)
    return module


# --- naive references ----------------------------------------------------------------------------

def naive_rollout(maps, a=0.5):
    """maps: list of (B, h, N, N); S_hat = S_bar_L ... S_bar_1, S_bar = (1-a) mean_h + a I, by loops."""
    B, h, N, _ = maps[0].shape
    out = torch.zeros(B, N, N, dtype=torch.float64)
    for b in range(B):
        acc = [[1.0 if i == j else 0.0 for j in range(N)] for i in range(N)]
        for m in maps:
            s_bar = [[(1 - a) * sum(float(m[b, k, i, j].detach()) for k in range(h)) / h + (a if i == j else 0.0)
                      for j in range(N)] for i in range(N)]
            acc = [[sum(s_bar[i][t] * acc[t][j] for t in range(N)) for j in range(N)] for i in range(N)]
        out[b] = torch.tensor(acc, dtype=torch.float64)
    return out


def gelu(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def ln(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def mha(attn, queries, keys):
    """Multi-head softmax(q k^T / sqrt d) v, heads concatenated and projected; returns (out, probs)."""
    B, N, C = queries.shape
    h, d = attn.num_heads, C // attn.num_heads
    W, b = attn.qkv.weight, attn.qkv.bias
    q = queries @ W[:C].T + b[:C]
    k = keys @ W[C:2 * C].T + b[C:2 * C]
    v = keys @ W[2 * C:].T + b[2 * C:]
    out = torch.zeros(B, N, C, dtype=queries.dtype)
    probs = torch.zeros(B, h, N, keys.shape[1], dtype=queries.dtype)
    for bi in range(B):
        for hi in range(h):
            sl = slice(hi * d, (hi + 1) * d)
            p = torch.softmax(q[bi, :, sl] @ k[bi, :, sl].T / math.sqrt(d), dim=-1)
            probs[bi, hi] = p
            out[bi, :, sl] = p @ v[bi, :, sl]
    return out @ attn.proj.weight.T + attn.proj.bias, probs


def mlp(block, x):
    return gelu(x @ block.mlp.fc1.weight.T + block.mlp.fc1.bias) @ block.mlp.fc2.weight.T + block.mlp.fc2.bias


def naive_sa_block(block, x):
    y, probs = mha(block.attn, ln(x, block.norm1), ln(x, block.norm1))
    x = x + y
    return x + mlp(block, ln(x, block.norm2)), probs


def naive_pair_block(block, x, other):
    n = ln(x, block.norm1)
    y, _ = mha(block.attn, n, torch.cat([n, ln(other, block.norm1)], dim=1))
    x = x + y
    return x + mlp(block, ln(x, block.norm2))


def naive_glca_block(g, local, tokens):
    y, _ = mha(g.attn, ln(local, g.norm1), ln(tokens, g.norm1))
    y = local + y
    return y + mlp(g, ln(y, g.norm2))


def naive_select(tokens, rollout, R):
    """CLS first, then the R patch tokens of highest rollout[:, 0], by a full descending sort."""
    B, N, C = tokens.shape
    rows, idx_rows = [], []
    for b in range(B):
        order = sorted(range(1, N), key=lambda j: -float(rollout[b, 0, j]))[:R]
        idx = [0] + order
        idx_rows.append(idx)
        rows.append(tokens[b, idx])
    return torch.stack(rows), torch.tensor(idx_rows)


def naive_stack(model, x, pair=None):
    h, maps, before_last = x, [], x
    for i, block in enumerate(model.blocks):
        if i == len(model.blocks) - 1:
            before_last = h
        h, p = naive_sa_block(block, h)
        maps.append(p)
    sa = ln(h, model.norm)
    rollout = naive_rollout(maps, model.residual_weight)
    tokens = before_last if model.glca_input == "parallel" else h
    R = max(1, int(model.local_ratio * (x.shape[1] - 1)))
    local, index = naive_select(tokens, rollout, R)
    glca = ln(naive_glca_block(model.glca, local, tokens), model.glca_norm)
    pwca = None
    if pair is not None:
        hp = x
        for block in model.blocks:
            hp = naive_pair_block(block, hp, hp[pair])
        pwca = ln(hp, model.norm)
    return sa, glca, pwca, index, rollout


def transformer(depth=2, **options):
    torch.manual_seed(0)
    return randomize(DCALTransformer(DIM, HEADS, depth, **options).double().eval())


# --- rollout and selection -------------------------------------------------------------------------

def _probs(B, h, N, L):
    return [torch.softmax(torch.randn(B, h, N, N, dtype=torch.float64), -1) for _ in range(L)]


@pytest.mark.parametrize("a", [0.5, 0.0, 0.25])
def test_rollout_matches_the_naive_product(a):
    maps = _probs(2, 3, 5, 3)
    got = attention_rollout(maps, residual_weight=a)
    assert_close(got, naive_rollout(maps, a), **TIGHT)
    assert_close(got.sum(-1), torch.ones(2, 5, dtype=torch.float64), **TIGHT)   # still row-stochastic


def test_rollout_limiting_cases():
    maps = _probs(2, 3, 4, 1)
    assert_close(attention_rollout(maps), 0.5 * maps[0].mean(1) + 0.5 * torch.eye(4), **TIGHT)
    assert_close(attention_rollout([m.mean(1) for m in maps]), attention_rollout(maps), **TIGHT)
    assert_close(attention_rollout(maps, residual_weight=1.0), torch.eye(4).expand(2, 4, 4).double(), **TIGHT)
    eye = torch.eye(4, dtype=torch.float64).expand(2, 3, 4, 4)
    assert_close(attention_rollout([eye, eye]), eye[:, 0], **TIGHT)
    assert attention_rollout([m.float() for m in maps]).dtype == torch.float32
    assert attention_rollout([m.bfloat16() for m in maps]).dtype == torch.float32


def test_select_local_queries_matches_a_full_sort():
    tokens = torch.randn(3, 9, 4, dtype=torch.float64)
    rollout = attention_rollout(_probs(3, 2, 9, 2))
    local, index = select_local_queries(tokens, rollout, 3)
    want_local, want_index = naive_select(tokens, rollout, 3)
    assert torch.equal(index, want_index)
    assert torch.equal(local, want_local)
    local, index = select_local_queries(tokens, rollout, 8, keep_cls=False)
    assert index.shape == (3, 8) and sorted(index[0].tolist()) == list(range(1, 9))


def test_num_local_queries_and_pairs():
    assert num_local_queries(784, 0.1) == 78 and num_local_queries(128, 0.3) == 38
    assert num_local_queries(5, 0.1) == 1 and num_local_queries(10, 1.0) == 10
    for B in (2, 3, 7):
        pair = random_pairs(B, generator=torch.Generator().manual_seed(B))
        assert sorted(pair.tolist()) == list(range(B)) and all(pair[b] != b for b in range(B))
    assert random_pairs(1).tolist() == [0] and random_pairs(0).shape == (0,)


# --- blocks --------------------------------------------------------------------------------------

def test_dcal_block_sa_and_pair_paths_match_naive():
    block = randomize(DCALBlock(DIM, HEADS).double())
    x, other = torch.randn(2, 6, DIM, dtype=torch.float64), torch.randn(2, 6, DIM, dtype=torch.float64)
    y, probs = block(x, return_probs=True)
    y_ref, probs_ref = naive_sa_block(block, x)
    assert_close(y, y_ref, **TIGHT)
    assert_close(probs, probs_ref, **TIGHT)
    assert_close(block(x), y_ref, **TIGHT)
    assert_close(block.forward_pair(x, other), naive_pair_block(block, x, other), **TIGHT)


def test_dcal_block_is_attnlab_block_with_mhsa():
    block = randomize(DCALBlock(DIM, HEADS).double()).eval()
    ref = attnlab.Block(DIM, HEADS, mechanism=("mhsa", {"qkv_bias": True})).double().eval()
    ref.load_state_dict(block.state_dict())                  # the same names: norm1, attn.qkv/proj, norm2, mlp
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    assert_close(block(x), ref(x), **TIGHT)


def test_dcal_block_matches_timm_block():
    try:
        from timm.models.vision_transformer import Block as TimmBlock
    except Exception as err:             # absent, or a torchvision that does not fit this torch
        pytest.skip(f"timm is not importable here: {type(err).__name__}: {err}")
    block = randomize(DCALBlock(DIM, HEADS).double()).eval()
    ref = TimmBlock(DIM, HEADS, qkv_bias=True).double().eval()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    assert_close(block(x), ref(x), **TIGHT)


def test_glca_block_matches_naive_and_loads_an_sa_block():
    g = randomize(GLCABlock(DIM, HEADS).double())
    local, tokens = torch.randn(2, 3, DIM, dtype=torch.float64), torch.randn(2, 7, DIM, dtype=torch.float64)
    assert_close(g(local, tokens), naive_glca_block(g, local, tokens), **TIGHT)
    sa = randomize(DCALBlock(DIM, HEADS).double())
    g.load_state_dict(sa.state_dict())                       # GLCA initialised from an SA block
    assert_close(g(tokens, tokens), sa(tokens), **TIGHT)     # every token selected: the SA block


# --- the stack -----------------------------------------------------------------------------------

@pytest.mark.parametrize("glca_input", ["parallel", "output"])
def test_transformer_matches_the_naive_stack(glca_input):
    model = transformer(depth=3, glca_input=glca_input, local_ratio=0.3)
    x = torch.randn(2, 11, DIM, dtype=torch.float64)
    pair = torch.tensor([1, 0])
    out = model(x, pair=pair)
    sa, glca, pwca, index, rollout = naive_stack(model, x, pair)
    assert_close(out.sa, sa, **TIGHT)
    assert_close(out.rollout, rollout, **TIGHT)
    assert torch.equal(out.local_index, index) and out.glca.shape == (2, 1 + 3, DIM)
    assert_close(out.glca, glca, **TIGHT)
    assert_close(out.pwca, pwca, **TIGHT)


def test_pwca_runs_in_training_only_unless_asked():
    model = transformer()
    x = torch.randn(4, 6, DIM, dtype=torch.float64)
    assert model(x).pwca is None                             # eval: PWCA removed
    model.train()
    out = model(x)
    assert out.pwca is not None and out.pwca.shape == x.shape
    assert model(x, run_pwca=False).pwca is None
    torch.manual_seed(3)
    a = model(x).pwca
    torch.manual_seed(3)
    pair = random_pairs(4)
    assert_close(a, model(x, pair=pair).pwca, **TIGHT)       # the default pair is random_pairs(B)
    # a distractor changes the output; itself as its own distractor gives SA's (duplicated keys)
    assert not torch.allclose(out.pwca, out.sa)
    model.eval()
    assert_close(model(x, pair=torch.arange(4)).pwca, model(x).sa, **TIGHT)


def test_branches_switch_off():
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    out = transformer(use_glca=False).train()(x)
    assert out.glca is None and out.rollout is None and out.pwca is not None
    sa_only = transformer(use_glca=False, use_pwca=False).train()
    out = sa_only(x)
    assert out.pwca is None and out.glca is None
    with pytest.raises(ValueError, match="use_pwca=False"):
        sa_only(x, run_pwca=True)


def test_gradients_reach_each_branch_s_parameters():
    model = transformer().train()
    x = torch.randn(3, 6, DIM, dtype=torch.float64)
    out = model(x, pair=torch.tensor([1, 2, 0]))
    names = dict(model.named_parameters())
    glca_params = {n for n in names if n.startswith(("glca.", "glca_norm."))}

    def reached(loss):
        grads = torch.autograd.grad(loss, list(names.values()), allow_unused=True, retain_graph=True)
        return {n for n, g in zip(names, grads) if g is not None and g.abs().sum() > 0}

    assert reached(out.sa.sum()).isdisjoint(glca_params)
    assert reached(out.pwca.sum()).isdisjoint(glca_params)
    # GLCA: its own weights and the SA blocks below its input (not the last block: GLCA is beside it)
    hit = reached(out.glca.sum())
    assert glca_params <= hit and "blocks.0.attn.qkv.weight" in hit and "blocks.1.attn.qkv.weight" not in hit
    assert "norm.weight" not in hit


def test_transformer_gradcheck():
    model = transformer(depth=1, local_ratio=0.5)
    x = torch.randn(2, 5, DIM, dtype=torch.float64, requires_grad=True)
    pair = torch.tensor([1, 0])

    def branches(t):
        out = model(t, pair=pair)
        return out.sa, out.glca, out.pwca
    assert torch.autograd.gradcheck(branches, (x,))


# --- the loss and the classifier -----------------------------------------------------------------

def test_uncertainty_weighted_loss_formula_and_gradients():
    crit = UncertaintyWeightedLoss(3).double()
    with torch.no_grad():
        crit.log_vars.copy_(torch.tensor([0.3, -0.5, 1.2], dtype=torch.float64))
    losses = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (2.0, 0.7, 1.5)]
    total = crit(*losses)
    w = [0.3, -0.5, 1.2]
    values = [2.0, 0.7, 1.5]
    want = 0.5 * sum(math.exp(-wi) * li + wi for wi, li in zip(w, values))
    assert_close(total, torch.tensor(want, dtype=torch.float64), **TIGHT)
    total.backward()
    assert_close(crit.log_vars.grad, torch.tensor([0.5 * (1 - math.exp(-wi) * li)
                                                   for wi, li in zip(w, values)], dtype=torch.float64), **TIGHT)
    assert_close(losses[1].grad, torch.tensor(0.5 * math.exp(0.5), dtype=torch.float64), **TIGHT)
    skipped = crit(losses[0], None, losses[2])
    assert_close(skipped, torch.tensor(0.5 * (math.exp(-0.3) * 2.0 + 0.3 + math.exp(-1.2) * 1.5 + 1.2),
                                       dtype=torch.float64), **TIGHT)
    assert_close(UncertaintyWeightedLoss(2)(torch.tensor(1.0), torch.tensor(3.0)), torch.tensor(2.0))
    with pytest.raises(ValueError, match="expected 3 losses"):
        crit(losses[0])
    with pytest.raises(ValueError, match="every loss is None"):
        crit(None, None, None)
    with pytest.raises(ValueError, match="scalar"):
        crit(torch.ones(2), None, None)
    with pytest.raises(ValueError, match="positive int"):
        UncertaintyWeightedLoss(0)


def test_classifier_branches_loss_and_predict():
    torch.manual_seed(0)
    model = DCALClassifier(5, DIM, HEADS, 2, in_dim=3, max_len=8, local_ratio=0.3)
    x, y = torch.randn(4, 8, 3), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"sa": (4, 5), "glca": (4, 5), "pwca": (4, 5)}
    total, parts = model.loss(logits, y)
    want = 0.5 * sum(F.cross_entropy(logits[k], y) for k in ("sa", "glca", "pwca"))   # w = 0 at init
    assert_close(total, want)
    assert set(parts) == {"sa", "glca", "pwca"}
    model.eval()
    logits = model(x)
    assert logits["pwca"] is None
    assert set(model.loss(logits, y)[1]) == {"sa", "glca"}
    assert_close(model.predict(x), logits["sa"].softmax(-1) + logits["glca"].softmax(-1))


def _task(n, generator):
    """Tokens (n, 8, 4) of noise; one token, at a random position, carries +3 in feature y: the class."""
    x = torch.randn(n, 8, 4, generator=generator) * 0.5
    y = torch.randint(0, 4, (n,), generator=generator)
    where = torch.randint(0, 8, (n,), generator=generator)
    x[torch.arange(n), where, y] += 3.0
    return x, y


def test_classifier_learns_beside_attnlab_classifier():
    """Both nets, same width, depth, data and steps: DCAL (SA + GLCA + PWCA, uncertainty loss) and
    attnlab's plain Classifier (pool="cls") reach high accuracy on a small task."""
    def train(model, loss_fn):
        g = torch.Generator().manual_seed(1)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        for _ in range(150):
            x, y = _task(32, g)
            loss = loss_fn(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        x, y = _task(512, torch.Generator().manual_seed(99))
        return x, y

    torch.manual_seed(0)
    dcal = DCALClassifier(4, 32, 4, 2, in_dim=4, max_len=8, local_ratio=0.25, mlp_ratio=2.0)
    x, y = train(dcal, lambda m, a, b: m.loss(m(a), b)[0])
    acc_dcal = (dcal.predict(x).argmax(-1) == y).float().mean().item()
    acc_sa = (dcal(x)["sa"].argmax(-1) == y).float().mean().item()
    torch.manual_seed(0)
    plain = attnlab.Classifier(4, 32, 4, 2, in_dim=4, max_len=8, pool="cls", mlp_ratio=2.0)
    x, y = train(plain, lambda m, a, b: F.cross_entropy(m(a), b))
    with torch.no_grad():
        acc_plain = (plain(x).argmax(-1) == y).float().mean().item()
    # measured: DCAL 0.996 (SA head 0.998), plain 0.992 on these seeds
    assert acc_plain > 0.95, acc_plain
    assert acc_dcal > 0.95 and acc_sa > 0.95, (acc_dcal, acc_sa, acc_plain)


# --- bad input -----------------------------------------------------------------------------------

def test_bad_input():
    model = transformer()
    with pytest.raises(ValueError, match=r"expected tokens \(B, N, C=16\)"):
        model(torch.randn(2, 6, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least one patch token"):
        model(torch.randn(2, 1, DIM, dtype=torch.float64))
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"pair must be a \(B,\) = \(2,\) integer tensor"):
        model(x, pair=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"pair indices must lie in \[0, 2\)"):
        model(x, pair=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="local_ratio must be a number in"):
        DCALTransformer(DIM, HEADS, 2, local_ratio=0.0)
    with pytest.raises(ValueError, match="glca_input must be one of"):
        DCALTransformer(DIM, HEADS, 2, glca_input="before")
    with pytest.raises(ValueError, match="depth must be a positive int"):
        DCALTransformer(DIM, HEADS, 0)
    with pytest.raises(TypeError, match="use_glca must be a bool"):
        DCALTransformer(DIM, HEADS, 2, use_glca=1)
    with pytest.raises(ValueError, match="residual_weight must be a number in"):
        attention_rollout(_probs(1, 1, 3, 1), residual_weight=2.0)
    with pytest.raises(ValueError, match="non-empty list"):
        attention_rollout([])
    with pytest.raises(ValueError, match=r"map 1 is \(1, 4, 4\) after head fusion, the first was \(1, 3, 3\)"):
        attention_rollout(_probs(1, 1, 3, 1) + _probs(1, 1, 4, 1))
    with pytest.raises(ValueError, match=r"rollout must be \(B, N, N\) = \(2, 6, 6\)"):
        select_local_queries(x, torch.zeros(2, 5, 5), 2)
    with pytest.raises(ValueError, match=r"num_local must be an int in \[1, 5\]"):
        select_local_queries(x, torch.zeros(2, 6, 6), 6)
    clf = DCALClassifier(3, DIM, HEADS, 1, in_dim=4, max_len=5)
    with pytest.raises(ValueError, match=r"expected patch features \(B, N, 4\)"):
        clf(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="exceed max_len=5"):
        clf(torch.randn(2, 6, 4))
