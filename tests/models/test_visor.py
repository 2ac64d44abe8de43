"""attnlab.models.visor against naive float64 references and torch.nn's own encoder layer.

The naive block below is written from the model's docstring with the module's weights (einsums and a
loop over heads, nothing from attnlab): a "cross" layer is text + attn(ln(text) over [ln(V); ln(T)]
keys) then the text's MLP, with the visual tokens returned as they came; a "full" layer is a plain
pre-norm block over the concatenation [V; T]; a "text" layer is a pre-norm block over the text
alone. A Visor whose layers are all "full" must equal torch.nn.TransformerEncoder (norm_first, GELU)
over [V; T] with the same weights. Plus: gradients (text layers never reach the visual tokens), the
analytic FLOP counters against torch.utils.flop_counter.FlopCounterMode on the eager path, the
classifier, and bad input.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from attnlab.models import Visor, VisorClassifier
from attnlab.models.visor import VisorBlock, layer_flops, layer_modes, network_flops, visor_flops

TIGHT = dict(rtol=1e-10, atol=1e-12)
DIM, HEADS = 16, 4
N, M = 3, 7


def randomize(module):
    """LayerNorm affine parameters away from (1, 0), so that a wrong norm shows."""
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.weight.normal_(1.0, 0.3)
                mod.bias.normal_(0.0, 0.3)
    return module


def streams(B=2, n=N, m=M, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(7)
    text = torch.randn(B, n, DIM, generator=g, dtype=dtype).requires_grad_(grad)
    visual = torch.randn(B, m, DIM, generator=g, dtype=dtype).requires_grad_(grad)
    return text, visual


# --- naive references ----------------------------------------------------------------------------

def ln(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def linear(x, lin):
    out = torch.einsum("blc,oc->blo", x, lin.weight)
    return out if lin.bias is None else out + lin.bias


def gelu(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def naive_attention(attn, queries, keys, allowed=None):
    """softmax(q k^T / sqrt(d)) v per head, heads concatenated, o_proj. allowed: (Lq, Lk) bool or None."""
    B, Lq, C = queries.shape
    h, h_kv = attn.num_heads, attn.num_kv_heads
    d = C // h
    q, k, v = linear(queries, attn.q_proj), linear(keys, attn.k_proj), linear(keys, attn.v_proj)
    out = torch.zeros(B, Lq, C, dtype=queries.dtype)
    for head in range(h):
        kv = head // (h // h_kv)                                           # the head's key/value group
        qs, ks = slice(head * d, (head + 1) * d), slice(kv * d, (kv + 1) * d)
        scores = torch.einsum("bqd,bkd->bqk", q[..., qs], k[..., ks]) / math.sqrt(d)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[..., qs] = torch.einsum("bqk,bkd->bqd", torch.softmax(scores, -1), v[..., ks])
    return linear(out, attn.o_proj)


def naive_mlp(block, x):
    if block.mlp is None:
        return x
    hidden = gelu(linear(ln(x, block.norm2), block.mlp.fc1))
    return x + linear(hidden, block.mlp.fc2)


def naive_block(block, text, visual, mode, causal=False):
    """One layer by the docstring's definition; returns (text, visual)."""
    n, m = text.shape[1], visual.shape[1]
    if mode == "text":
        t = ln(text, block.norm1)
        allowed = torch.ones(n, n, dtype=torch.bool).tril() if causal else None
        return naive_mlp(block, text + naive_attention(block.attn, t, t, allowed)), visual
    if mode == "cross":
        t, v = ln(text, block.norm1), ln(visual, block.norm1)
        allowed = None
        if causal:                                # text query i: every visual key and text keys <= i
            allowed = torch.cat([torch.ones(n, m, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
        return naive_mlp(block, text + naive_attention(block.attn, t, torch.cat([v, t], 1), allowed)), visual
    x = torch.cat([visual, text], 1)              # "full": a plain pre-norm block over [V; T]
    y = ln(x, block.norm1)
    allowed = torch.ones(m + n, m + n, dtype=torch.bool).tril() if causal else None
    x = naive_mlp(block, x + naive_attention(block.attn, y, y, allowed))
    return x[:, m:], x[:, :m]


def block(seed=0, **options):
    torch.manual_seed(seed)
    return randomize(VisorBlock(DIM, HEADS, **options)).double()


def body(layers=4, seed=0, **options):
    torch.manual_seed(seed)
    return randomize(Visor(DIM, HEADS, layers, **options)).double()


# --- modes ---------------------------------------------------------------------------------------

def test_layer_modes():
    assert layer_modes(4, [1, 3], [0]) == ["full", "cross", "text", "cross"]
    assert layer_modes(3, None, []) == ["cross"] * 3                     # None: the text reads V at every layer
    assert layer_modes(3, [], [1]) == ["text", "full", "text"]           # a refinement layer needs no cross entry
    model = Visor(DIM, HEADS, 4, cross_layers=[1, 3], refine_layers=[0])
    assert model.modes() == ["full", "cross", "text", "cross"]
    assert model.modes([2]) == ["text", "cross", "full", "cross"]
    assert model.modes([]) == ["text", "cross", "text", "cross"]


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("mode", ["text", "cross", "full"])
@pytest.mark.parametrize("options", [dict(), dict(mechanism_options=dict(num_kv_heads=2, qkv_bias=True)),
                                     dict(mlp_ratio=0)], ids=["mha", "gqa", "no_mlp"])
def test_block_matches_the_naive_layer(mode, options, causal):
    blk = block(**options)
    text, visual = streams()
    got_t, got_v = blk(text, visual, mode, is_causal=causal)
    ref_t, ref_v = naive_block(blk, text, visual, mode, causal)
    assert_close(got_t, ref_t, **TIGHT)
    assert_close(got_v, ref_v, **TIGHT)


@pytest.mark.parametrize("mode", ["text", "cross"])
def test_text_and_cross_layers_leave_the_visual_tokens_unchanged(mode):
    blk = block()
    text, visual = streams()
    before = visual.clone()
    _, out = blk(text, visual, mode)
    assert out is visual and torch.equal(visual, before)


def test_full_layer_text_rows_equal_the_cross_layer():
    """A cross layer is the full layer with its visual rows skipped: the text comes out the same."""
    blk = block()
    text, visual = streams()
    assert_close(blk(text, visual, "full")[0], blk(text, visual, "cross")[0], **TIGHT)


def test_text_layers_never_read_the_visual_tokens():
    blk = block()
    text, visual = streams(grad=True)
    out, _ = blk(text, visual, "text")
    (grad,) = torch.autograd.grad(out.square().sum(), visual, allow_unused=True)
    assert grad is None or torch.count_nonzero(grad) == 0
    other = torch.randn_like(visual)
    assert torch.equal(blk(text, other, "text")[0], out)
    # A stack with no cross or refinement layer never reads them either; one cross layer does.
    model = body(3, cross_layers=[])
    out, _ = model(text, visual)
    (grad,) = torch.autograd.grad(out.square().sum(), visual, allow_unused=True)
    assert grad is None or torch.count_nonzero(grad) == 0
    out, _ = body(3, cross_layers=[2])(text, visual)
    (grad,) = torch.autograd.grad(out.square().sum(), visual)
    assert torch.count_nonzero(grad) > 0


def test_cross_only_stack_never_refines_and_matches_naive():
    model = body(3, cross_layers=[0, 2])
    text, visual = streams()
    out_t, out_v = model(text, visual)
    assert torch.equal(out_v, visual)
    t, v = text, visual
    for blk, mode in zip(model.blocks, ["cross", "text", "cross"]):
        t, v = naive_block(blk, t, v, mode)
    assert_close(out_t, ln(t, model.norm), **TIGHT)


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_visor_stack_matches_naive_and_refine_layers_override(causal):
    model = body(4, cross_layers=[1, 3], refine_layers=[0])
    text, visual = streams()
    for refine in (None, [2], [0, 1]):
        modes = model.modes(refine)
        out_t, out_v = model(text, visual, refine_layers=refine, is_causal=causal)
        t, v = text, visual
        for blk, mode in zip(model.blocks, modes):
            t, v = naive_block(blk, t, v, mode, causal)
        assert_close(out_t, ln(t, model.norm), **TIGHT)
        assert_close(out_v, v, **TIGHT)


def test_visual_padding_mask_hides_padded_tokens():
    """A (B, M) mask: padded visual tokens change nothing in the text, in cross and full layers."""
    model = body(3, cross_layers=[1, 2], refine_layers=[0])
    text, visual = streams()
    mask = torch.ones(2, M, dtype=torch.bool)
    mask[0, -3:] = False
    out, _ = model(text, visual, visual_mask=mask)
    changed = visual.clone()
    changed[0, -3:] = torch.randn(3, DIM, dtype=torch.float64) * 5
    assert_close(model(text, changed, visual_mask=mask)[0], out, **TIGHT)
    trimmed, _ = model(text[:1], visual[:1, :-3])
    assert_close(out[:1], trimmed, **TIGHT)


def _encoder_from(model):
    """torch.nn.TransformerEncoder (pre-norm, GELU) carrying a Visor's weights."""
    layer = nn.TransformerEncoderLayer(DIM, HEADS, dim_feedforward=model.blocks[0].mlp.fc1.out_features, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, len(model.blocks), enable_nested_tensor=False).double()
    with torch.no_grad():
        for ours, theirs in zip(model.blocks, encoder.layers):
            a = ours.attn
            theirs.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            theirs.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            theirs.self_attn.out_proj.weight.copy_(a.o_proj.weight)
            theirs.self_attn.out_proj.bias.copy_(a.o_proj.bias)
            for name in ("norm1", "norm2"):
                getattr(theirs, name).load_state_dict(getattr(ours, name).state_dict())
            theirs.linear1.load_state_dict(ours.mlp.fc1.state_dict())
            theirs.linear2.load_state_dict(ours.mlp.fc2.state_dict())
    return encoder


def test_all_full_layers_equal_torch_transformer_encoder():
    """Every layer "full" is LLaVA's full self-attention over [V; T]: torch's own pre-norm encoder."""
    model = body(3, refine_layers=[0, 1, 2], mechanism_options=dict(qkv_bias=True))
    encoder = _encoder_from(model).train()         # train mode with dropout 0: the plain (non fast-path) forward
    text, visual = streams()
    out_t, out_v = model(text, visual)
    ref = encoder(torch.cat([visual, text], 1))                            # (B, M + N, C)
    assert_close(out_t, ln(ref[:, M:], model.norm), **TIGHT)
    assert_close(out_v, ref[:, :M], **TIGHT)


# --- FLOPs ---------------------------------------------------------------------------------------

def _counted(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode", ["text", "cross", "full"])
@pytest.mark.parametrize("options", [dict(), dict(num_kv_heads=2), dict(mlp_ratio=2.5)], ids=["mha", "gqa", "mlp"])
def test_layer_flops_equal_flop_counter_mode(mode, options):
    """The eager path (backend="reference": einsums for the scores and the weighted sum) runs every
    matmul the counter counts; norms, softmax and GELU are not matmuls and are counted by neither."""
    kv = options.get("num_kv_heads")
    mlp_ratio = options.get("mlp_ratio", 4.0)
    blk = VisorBlock(DIM, HEADS, mlp_ratio=mlp_ratio, mechanism_options=dict(
        backend="reference", **({} if kv is None else {"num_kv_heads": kv})))
    text, visual = streams(B=3, dtype=torch.float32)
    with torch.no_grad():
        counted = _counted(lambda: blk(text, visual, mode))
    assert counted == 3 * layer_flops(mode, dim=DIM, num_heads=HEADS, num_kv_heads=kv,
                                      mlp_hidden=int(DIM * mlp_ratio), text_len=N, visual_len=M)


def test_layer_flops_by_hand():
    C, H = DIM, 4 * DIM
    assert layer_flops("text", dim=C, num_heads=HEADS, mlp_hidden=H, text_len=N, visual_len=M) == \
        4 * N * C * C + 2 * N * C * 2 * C + 4 * C * N * N + 4 * N * C * H
    assert layer_flops("cross", dim=C, num_heads=HEADS, mlp_hidden=H, text_len=N, visual_len=M) == \
        4 * N * C * C + 2 * (N + M) * C * 2 * C + 4 * C * N * (M + N) + 4 * N * C * H
    L = N + M
    assert layer_flops("full", dim=C, num_heads=HEADS, mlp_hidden=H, text_len=N, visual_len=M) == \
        4 * L * C * C + 2 * L * C * 2 * C + 4 * C * L * L + 4 * L * C * H
    causal = layer_flops("cross", dim=C, num_heads=HEADS, mlp_hidden=H, text_len=N, visual_len=M, causal=True)
    assert layer_flops("cross", dim=C, num_heads=HEADS, mlp_hidden=H, text_len=N, visual_len=M) - causal == \
        4 * C * N * (N - 1) // 2                                           # the text pairs above the diagonal


@pytest.mark.parametrize("refine", [[0, 1, 2, 3], [], [0], [0, 2]], ids=["full", "cross_only", "visor1", "visor2"])
def test_network_and_classifier_flops_equal_flop_counter_mode(refine):
    torch.manual_seed(0)
    clf = VisorClassifier(10, DIM, HEADS, 4, vocab_size=12, visual_in_dim=5, text_len=N, visual_len=M,
                          cross_layers=[1, 2, 3], refine_layers=refine, mechanism_options=dict(backend="reference"))
    visual, question = torch.randn(3, M, 5), torch.randint(0, 12, (3, N))
    with torch.no_grad():
        assert _counted(lambda: clf(visual, question)) == clf.flops(batch=3)
        text, vis = streams(B=3, dtype=torch.float32)
        assert _counted(lambda: clf.body(text, vis)) == clf.body.flops(N, M, batch=3)
    front = 2 * M * 5 * DIM + 2 * DIM * 10
    assert clf.flops() == front + network_flops(clf.body.modes(), dim=DIM, num_heads=HEADS, mlp_hidden=4 * DIM,
                                                text_len=N, visual_len=M)


def test_flop_comparison():
    model = Visor(DIM, HEADS, 4, cross_layers=[1, 3], refine_layers=[0])
    cmp = model.flop_comparison(N, M)
    assert cmp["modes"] == {"full": ["full"] * 4, "cross_only": ["text", "cross", "text", "cross"],
                            "visor": ["full", "cross", "text", "cross"]}
    assert cmp["full"] == model.flops(N, M, refine_layers=[0, 1, 2, 3])
    assert cmp["cross_only"] == model.flops(N, M, refine_layers=[]) < cmp["visor"] == model.flops(N, M) < cmp["full"]
    assert cmp["visor_saved"] == pytest.approx(1 - cmp["visor"] / cmp["full"])
    assert cmp["visor_speedup"] == pytest.approx(cmp["full"] / cmp["visor"])
    assert visor_flops(DIM, HEADS, 4, text_len=N, visual_len=M, cross_layers=[1, 3], refine_layers=[0],
                       batch=5)["visor"] == 5 * cmp["visor"]


# --- the classifier ------------------------------------------------------------------------------

def test_classifier_shapes_and_answer_token():
    torch.manual_seed(0)
    clf = VisorClassifier(10, DIM, HEADS, 2, vocab_size=12, visual_in_dim=5, text_len=N, visual_len=M,
                          refine_layers=[0])
    visual, question = torch.randn(4, M, 5), torch.randint(0, 12, (4, N))
    logits = clf(visual, question)
    assert logits.shape == (4, 10) and logits.dtype == torch.float32
    # The answer is read from the last text token: with every layer bidirectional, changing an
    # earlier question token changes it; refine_layers can be overridden per call.
    other = question.clone()
    other[:, 0] = (other[:, 0] + 1) % 12
    assert not torch.allclose(clf(visual, other), logits)
    assert clf(visual, question, refine_layers=[]).shape == (4, 10)
    first = VisorClassifier(10, DIM, HEADS, 2, vocab_size=12, visual_in_dim=5, text_len=N, visual_len=M,
                            answer_index=0)
    assert first(visual, question).shape == (4, 10)


def test_classifier_gradients_reach_every_parameter_used():
    torch.manual_seed(0)
    clf = VisorClassifier(10, DIM, HEADS, 3, vocab_size=12, visual_in_dim=5, text_len=N, visual_len=M,
                          cross_layers=[1, 2], refine_layers=[0])
    clf(torch.randn(4, M, 5), torch.randint(0, 12, (4, N))).square().sum().backward()
    missing = [n for n, p in clf.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


# --- bad input -----------------------------------------------------------------------------------

def test_bad_input():
    with pytest.raises(ValueError, match=r"refine_layers must hold layer indices in \[0, 4\), got \[4\]"):
        Visor(DIM, HEADS, 4, refine_layers=[4])
    with pytest.raises(ValueError, match="cross_layers lists a layer twice"):
        Visor(DIM, HEADS, 4, cross_layers=[1, 1])
    with pytest.raises(TypeError, match="refine_layers must be a list of layer indices"):
        Visor(DIM, HEADS, 4, refine_layers="0")
    with pytest.raises(ValueError, match="every layer runs the 'visor' mechanism"):
        Visor(DIM, HEADS, ["visor", "mhsa"])
    with pytest.raises(ValueError, match="layers must be a positive int"):
        Visor(DIM, HEADS, 0)
    with pytest.raises(TypeError, match="layers must be an int or a list"):
        Visor(DIM, HEADS, "visor")
    with pytest.raises(ValueError, match="mlp_ratio must be >= 0"):
        VisorBlock(DIM, HEADS, mlp_ratio=-1)
    model = Visor(DIM, HEADS, 2, refine_layers=[0])
    text, visual = streams(dtype=torch.float32)
    with pytest.raises(ValueError, match=r"expected text \(B, N, 16\) and visual \(B, M, 16\) tensors, got \(2, 3, 8\)"):
        model(text[..., :8], visual)
    with pytest.raises(ValueError, match="expected text"):
        model(text, visual[:1])
    with pytest.raises(ValueError, match=r"refine_layers must hold layer indices in \[0, 2\)"):
        model(text, visual, refine_layers=[2])
    with pytest.raises(ValueError, match="mode must be one of"):
        model.blocks[0](text, visual, "self")
    with pytest.raises(ValueError, match="mode must be one of"):
        layer_flops("both", dim=DIM, num_heads=HEADS, mlp_hidden=0, text_len=N, visual_len=M)
    clf = VisorClassifier(10, DIM, HEADS, 1, vocab_size=12, visual_in_dim=5, text_len=N, visual_len=M)
    with pytest.raises(ValueError, match=r"expected visual features \(B, 7, 5\), got \(2, 6, 5\)"):
        clf(torch.randn(2, M - 1, 5), torch.zeros(2, N, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected question ids \(B, 3\) int64, got \(2, 3\) torch.float32"):
        clf(torch.randn(2, M, 5), torch.zeros(2, N))
    with pytest.raises(TypeError, match="expected visual features"):
        clf([[0.0]], torch.zeros(2, N, dtype=torch.long))
    with pytest.raises(ValueError, match="answer_index must index the 3 text tokens, got 3"):
        VisorClassifier(10, DIM, HEADS, 1, vocab_size=12, visual_in_dim=5, text_len=N, visual_len=M, answer_index=3)
