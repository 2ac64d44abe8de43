"""attnlab.models.msgnet against naive float64 references written from the official code's operations
(YoZhibo/MSGNet layers/MSGBlock.py, models/MSGNet.py, layers/Embed.py): Conv2d graph blocks, an
einsum mixprop, separate q/k/v/o projections with a causal mask and kernel-1 Conv1d FFN, the official
batch-averaged FFT_for_Period, and the whole forward composed from those."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab.models.msgnet import (AttentionBlock, GraphBlock, MSGNet, MixProp, ScaleGraphBlock,
                                   fft_periods, sinusoidal_positions)

torch.set_default_dtype(torch.float32)


def naive_graph_block(blk: GraphBlock, x):
    """The official GraphBlock.forward on (B, T, d): Conv2d modules, einsum mixprop, 1x1 Conv2d."""
    adp = torch.softmax(torch.relu(blk.nodevec1 @ blk.nodevec2), dim=1)
    out = x.unsqueeze(1).transpose(2, 3)                                           # (B, 1, d, T)
    out = F.conv2d(out, blk.start_conv.weight, blk.start_conv.bias)
    adj = adp + torch.eye(adp.shape[0], dtype=x.dtype)
    a = adj / adj.sum(1).view(-1, 1)
    h, hs = out, [out]
    for _ in range(blk.gconv.depth):
        h = blk.gconv.alpha * out + (1 - blk.gconv.alpha) * torch.einsum("ncwl,vw->ncvl", h, a)
        hs.append(h)
    out = F.conv2d(torch.cat(hs, 1), blk.gconv.mlp.weight, blk.gconv.mlp.bias)
    out = F.gelu(out)
    out = F.conv2d(out, blk.end_conv.weight, blk.end_conv.bias).squeeze(-1)        # (B, T, c_out)
    return F.layer_norm(x + F.linear(out, blk.linear.weight, blk.linear.bias), (x.shape[-1],),
                        blk.norm.weight, blk.norm.bias)


def naive_attention_block(blk: AttentionBlock, x, heads):
    """Official Attention_Block (eval): self_attention with q/k/v/o Linear, causal FullAttention,
    kernel-1 Conv1d FFN with GELU, two post-norms."""
    mh = blk.attention
    C = x.shape[-1]
    wq, wk, wv = mh.qkv.weight.split(C)
    bq, bk, bv = mh.qkv.bias.split(C)
    B, L, _ = x.shape
    q = F.linear(x, wq, bq).view(B, L, heads, -1)
    k = F.linear(x, wk, bk).view(B, L, heads, -1)
    v = F.linear(x, wv, bv).view(B, L, heads, -1)
    scores = torch.einsum("blhe,bshe->bhls", q, k)
    mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    scores = scores.masked_fill(mask, -np.inf)
    A = torch.softmax(scores / math.sqrt(q.shape[-1]), -1)
    V = torch.einsum("bhls,bshd->blhd", A, v).reshape(B, L, -1)
    new = F.linear(V, mh.proj.weight, mh.proj.bias)
    x = F.layer_norm(x + new, (C,), blk.norm1.weight, blk.norm1.bias)
    y = F.conv1d(x.transpose(-1, 1), blk.fc1.weight.unsqueeze(-1), blk.fc1.bias)
    y = F.conv1d(F.gelu(y), blk.fc2.weight.unsqueeze(-1), blk.fc2.bias).transpose(-1, 1)
    return F.layer_norm(x + y, (C,), blk.norm2.weight, blk.norm2.bias)


def naive_periods(x, k):
    """The official FFT_for_Period: amplitudes averaged over batch and channels."""
    xf = torch.fft.rfft(x, dim=1)
    freq = xf.abs().mean(0).mean(-1)
    freq[0] = 0
    top = torch.topk(freq, k).indices.numpy()
    return x.shape[1] // top, xf.abs().mean(-1)[:, top]


def naive_scale_block(blk: ScaleGraphBlock, x, heads):
    B, T, N = x.shape
    periods, weights = naive_periods(x, blk.k)
    res = []
    for i in range(blk.k):
        p = int(periods[i])
        x = naive_graph_block(blk.gconv[i], x)
        length = T if T % p == 0 else (T // p + 1) * p
        out = torch.cat([x, torch.zeros(B, length - T, N, dtype=x.dtype)], 1) if length != T else x
        out = out.reshape(-1, p, N)
        out = F.gelu(F.layer_norm(naive_attention_block(blk.att, out, heads), (N,), blk.norm.weight, blk.norm.bias))
        res.append(out.reshape(B, -1, N)[:, :T])
    res = torch.stack(res, -1)
    w = torch.softmax(weights, 1).unsqueeze(1).unsqueeze(1).repeat(1, T, N, 1)
    return (res * w).sum(-1) + x


def naive_forward(m: MSGNet, x, x_mark, heads):
    means = x.mean(1, keepdim=True)
    x = x - means
    stdev = torch.sqrt(torch.var(x, dim=1, keepdim=True, unbiased=False) + 1e-5)
    x = x / stdev
    emb = m.embedding
    h = F.conv1d(F.pad(x.permute(0, 2, 1), (1, 1), mode="circular"), emb.value.weight).transpose(1, 2)
    h = h + F.linear(x_mark, emb.time.weight) + sinusoidal_positions(x.shape[1], h.shape[-1]).to(x.dtype)
    for blk in m.blocks:
        h = F.layer_norm(naive_scale_block(blk, h, heads), (h.shape[-1],), m.layer_norm.weight, m.layer_norm.bias)
    out = F.linear(h, m.projection.weight, m.projection.bias)
    out = F.linear(out.transpose(1, 2), m.seq2pred.weight, m.seq2pred.bias).transpose(1, 2)
    return out * stdev[:, 0, :].unsqueeze(1) + means[:, 0, :].unsqueeze(1)


def series(B=4, T=96, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(T, dtype=torch.float64).view(1, T, 1)
    phase = torch.rand(B, 1, C, generator=g, dtype=torch.float64) * 6
    return (torch.sin(2 * math.pi * t / 24 + phase) + 0.5 * torch.sin(2 * math.pi * t / 12)
            + 0.3 * torch.randn(B, T, C, generator=g, dtype=torch.float64))


def test_positions_are_the_official_sin_cos_table():
    pe = sinusoidal_positions(50, 8)
    pos = 17                                           # channel 6 = 2 * 3 sin, 7 cos
    assert pe[pos, 6] == pytest.approx(math.sin(pos / 10000 ** (6 / 8)), abs=1e-6)
    assert pe[pos, 7] == pytest.approx(math.cos(pos / 10000 ** (6 / 8)), abs=1e-6)


def test_graph_block_equals_the_conv2d_reference():
    torch.manual_seed(0)
    blk = GraphBlock(7, 32, 96, conv_channel=8, skip_channel=6).double()
    x = series(3, 96, 32)
    torch.testing.assert_close(blk(x), naive_graph_block(blk, x), rtol=1e-10, atol=1e-10)
    # B = 1 works (the official squeeze() would drop the batch axis)
    assert blk(x[:1]).shape == (1, 96, 32)


def test_mixprop_is_alpha_mixed_propagation_over_the_row_normalised_graph():
    torch.manual_seed(1)
    mp = MixProp(3, 4, depth=2, alpha=0.3).double()
    x = torch.randn(2, 5, 6, 3, dtype=torch.float64)                                # (B, nodes, T, C)
    adj = torch.rand(5, 5, dtype=torch.float64)
    a = (adj + torch.eye(5)) / (adj + torch.eye(5)).sum(1, keepdim=True)
    h1 = 0.3 * x + 0.7 * torch.einsum("vw,bwtc->bvtc", a, x)
    h2 = 0.3 * x + 0.7 * torch.einsum("vw,bwtc->bvtc", a, h1)
    expect = torch.cat([x, h1, h2], -1) @ mp.mlp.weight[:, :, 0, 0].T + mp.mlp.bias
    torch.testing.assert_close(mp(x, adj), expect, rtol=1e-12, atol=1e-12)


def test_attention_block_equals_the_official_layer_with_mhsa():
    torch.manual_seed(2)
    blk = AttentionBlock(32, 64, 8).double().eval()
    x = series(5, 12, 32, seed=3)
    torch.testing.assert_close(blk(x), naive_attention_block(blk, x, 8), rtol=1e-10, atol=1e-10)
    assert blk.attention.qkv.bias is not None and blk.attention.attn_drop == 0.1


def test_batch_periods_are_the_official_and_sample_periods_do_not_depend_on_the_batch():
    x = series(6, 96, 32, seed=4)
    p, w = fft_periods(x, 3, "batch")
    ref_p, ref_w = naive_periods(x, 3)
    assert (p == torch.as_tensor(ref_p)).all()
    torch.testing.assert_close(w, ref_w)
    ps, _ = fft_periods(x, 3, "sample")
    for b in range(6):
        alone, _ = fft_periods(x[b:b + 1], 3, "batch")                              # a batch of one
        assert (ps[b] == alone[0]).all()
    assert (ps[:, 0] == 24).all()                                                   # the daily cycle leads
    with pytest.raises(ValueError, match="periods|mode"):
        fft_periods(x, 3, "epoch")


def test_scale_block_batch_mode_equals_the_official_loop_and_sample_mode_is_per_window():
    torch.manual_seed(5)
    blk = ScaleGraphBlock(96, 7, 16, 32, top_k=3, num_heads=4, conv_channel=8, skip_channel=8,
                          periods="batch").double().eval()
    x = series(4, 96, 16, seed=6)
    torch.testing.assert_close(blk(x), naive_scale_block(blk, x, 4), rtol=1e-9, atol=1e-9)
    # mixed periods in one batch: every window as if it were alone
    x = torch.cat([series(2, 96, 16, seed=7), series(2, 96, 16, seed=8).flip(1) * torch.linspace(0, 3, 96).view(1, -1, 1)])
    blk.periods = "sample"
    p, _ = fft_periods(x, 3, "sample")
    assert len({tuple(r.tolist()) for r in p}) > 1                                  # the test exercises groups
    out = blk(x)
    blk.periods = "batch"
    for b in range(4):
        torch.testing.assert_close(out[b:b + 1], blk(x[b:b + 1]), rtol=1e-9, atol=1e-9)


def test_msgnet_forward_equals_the_composed_reference():
    torch.manual_seed(9)
    m = MSGNet(96, 24, 7, d_model=16, d_ff=32, e_layers=2, num_heads=4, conv_channel=8, skip_channel=8,
               periods="batch").double().eval()
    x = series(3, 96, 7, seed=10) * 3 + 5
    xm = torch.rand(3, 96, 4, dtype=torch.float64) - 0.5
    torch.testing.assert_close(m(x, xm), naive_forward(m, x, xm, 4), rtol=1e-9, atol=1e-9)
    assert m(x, xm).shape == (3, 24, 7)


def test_the_attention_is_any_registered_mechanism_and_bad_input_is_refused():
    m = MSGNet(96, 24, 7, d_model=16, d_ff=32, e_layers=2, num_heads=4, attention=["mhsa", "moh"])
    assert type(m.blocks[1].att.attention).__name__ == "MoHAttention"
    assert m(torch.randn(2, 96, 7), torch.randn(2, 96, 4)).shape == (2, 24, 7)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 96, 7\)"):
        m(torch.randn(2, 90, 7))
    with pytest.raises(ValueError, match="d_model .* must be >= the number of variates"):
        MSGNet(96, 24, 21, d_model=16)
    with pytest.raises(ValueError, match="periods must be one of"):
        MSGNet(96, 24, 7, d_model=16, periods="epoch")
    with pytest.raises(ValueError, match="2 attention names for e_layers=1"):
        MSGNet(96, 24, 7, d_model=16, attention=["mhsa", "mhsa"])


def test_official_etth1_sizes():
    """ETTh1 scripts: d_model 32, d_ff 64, top_k 3, conv/skip 32, e_layers 1 (2 at horizon 336)."""
    m = MSGNet(96, 96, 7, d_model=32, d_ff=64, e_layers=1)
    per_graph = (7 * 10 * 2 + 32 * 26 + 32 + 32 * 96 + 32 + 96 * 32 * 96 + 96 + 7 * 32 + 32 + 2 * 32)
    attn = 32 * 96 + 96 + 32 * 32 + 32 + 2 * 32 * 64 + 64 + 32 + 4 * 32
    expect = 3 * per_graph + attn + 2 * 32 + (7 * 3 * 32 + 4 * 32) + 2 * 32 + 32 * 7 + 7 + 96 * 96 + 96
    assert sum(p.numel() for p in m.parameters()) == expect


def test_gradients_match_finite_differences_and_non_finite_input_is_refused():
    torch.manual_seed(11)
    m = MSGNet(24, 6, 3, d_model=4, d_ff=8, e_layers=1, top_k=2, num_heads=2, conv_channel=2, skip_channel=2,
               node_dim=2, periods="batch").double().eval()
    x = series(2, 24, 3, seed=12).requires_grad_()
    xm = torch.rand(2, 24, 4, dtype=torch.float64)
    # the whole model detaches the window mean (as the official normalisation does), so check the
    # blocks' input gradients; the periods are a discrete choice that small perturbations keep
    h = m.embedding(x.detach(), xm).detach().requires_grad_()
    assert torch.autograd.gradcheck(m.blocks[0], (h,), eps=1e-6, atol=1e-5)
    params = [p for p in m.parameters()]
    loss = m(x, xm).pow(2).sum()
    grads = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) > 0 for g in grads) == len(grads)
    bad = torch.randn(2, 24, 3, dtype=torch.float64)
    bad[1, 5, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        m(bad, xm)
