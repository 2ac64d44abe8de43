"""attnlab.models.msga against naive float64 references written from the official code's formulas.

sinAshish/Multi-Scale-Attention, read (not copied): semanticModule = enc1 (conv-BN-ReLU x 2, maxpool),
enc2 (the same), dec2 (conv-BN-ReLU x 2, ConvTranspose), bilinear resize to enc1, dec1; returns
(enc2, dec1). PAM_CAM_Layer = conv3x3 - BN - PReLU - PAM/CAM - conv3x3 - BN - PReLU, with
PAM: Y = gamma V softmax(Q^T K)^T + X and CAM: Y = gamma softmax(rowmax(E) - E) X + X, E = X X^T.
The guided step: conv8((pam(x) + cam(x)) * conv_sem(rec(x))); the second step reads
cat(F_s, A_s * F_MS); eval output = mean of the step-2 predictions; the loss = sum of 8 CEs +
0.25 sum MSE(enc step 1, enc step 2) + 0.1 sum of 8 MSE(input, reconstruction).
Here the BatchNorms run in eval mode with random running statistics, so the naive BN
(x - mean) / sqrt(var + eps) * w + b is exercised; the convolutions use F.conv2d in float64 (they
are not what is under test). Plus shapes, the mechanism swap, bad input, and a short training on
synthetic shapes that beats the all-background baseline.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

from attnlab.mechanisms.danet import DANetChannelAttention2d, DANetPositionAttention2d
from attnlab.models.msga import (MSGA, AttentionLayer, GuidedStep, MSGAOutput, SemanticModule, msga_loss,
                                 parameter_count)

TIGHT = dict(rtol=1e-9, atol=1e-10)


def randomise(module: nn.Module, gamma: float = 0.7) -> nn.Module:
    """float64, eval mode, random BN statistics/affine and PReLU slopes, gamma != 0 (the attention at work)."""
    module.double().eval()
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.1)
        elif isinstance(m, nn.PReLU):
            m.weight.data.fill_(0.2)
        elif isinstance(m, (DANetPositionAttention2d, DANetChannelAttention2d)):
            m.gamma.data.fill_(gamma)
    return module


# --- naive references (float64) --------------------------------------------------------------------

def bn(x, m):
    return ((x - m.running_mean[None, :, None, None]) / torch.sqrt(m.running_var[None, :, None, None] + m.eps)
            * m.weight[None, :, None, None] + m.bias[None, :, None, None])


def conv(x, m):
    return F.conv2d(x, m.weight, m.bias, padding=m.padding)


def prelu(x, m):
    return torch.where(x >= 0, x, m.weight * x)


def naive_pam(x, m):
    """The official PAM_Module in NCHW: Q^T K over pixels, softmax over keys, out = V A^T, gamma out + x."""
    B, C, H, W = x.shape
    X = x.reshape(B, C, H * W)
    w = lambda c: c.weight[:, :, 0, 0]
    Q = torch.einsum("oc,bcn->bon", w(m.query_conv), X) + m.query_conv.bias[None, :, None]
    K = torch.einsum("oc,bcn->bon", w(m.key_conv), X) + m.key_conv.bias[None, :, None]
    V = torch.einsum("oc,bcn->bon", w(m.value_conv), X) + m.value_conv.bias[None, :, None]
    energy = Q.transpose(1, 2) @ K                                   # (B, N, N)
    A = torch.softmax(energy, -1)
    out = V @ A.transpose(1, 2)                                      # (B, C, N)
    return m.gamma * out.reshape(B, C, H, W) + x


def naive_cam(x, m):
    """The official CAM_Module: E = X X^T, A = softmax(rowmax(E) - E), out = A X, gamma out + x."""
    B, C, H, W = x.shape
    X = x.reshape(B, C, H * W)
    E = X @ X.transpose(1, 2)
    A = torch.softmax(E.max(-1, keepdim=True).values - E, -1)
    return m.gamma * (A @ X).reshape(B, C, H, W) + x


def naive_attention_layer(x, layer: AttentionLayer):
    b = layer.body
    h = prelu(bn(conv(x, b[0]), b[1]), b[2])
    att = b[3].mechanism
    h = naive_pam(h, att) if isinstance(att, DANetPositionAttention2d) else naive_cam(h, att)
    return prelu(bn(conv(h, b[4]), b[5]), b[6])


def naive_cbr(x, seq, start):
    """conv -> BN -> ReLU at seq[start:start + 3]."""
    return torch.relu(bn(conv(x, seq[start]), seq[start + 1]))


def naive_semantic(x, m: SemanticModule):
    e1 = F.max_pool2d(naive_cbr(naive_cbr(x, m.enc1, 0), m.enc1, 3), 2)
    e2 = F.max_pool2d(naive_cbr(naive_cbr(e1, m.enc2, 0), m.enc2, 3), 2)
    d2 = naive_cbr(naive_cbr(e2, m.dec2, 0), m.dec2, 3)
    d2 = F.conv_transpose2d(d2, m.dec2[6].weight, m.dec2[6].bias, stride=2)
    d2 = F.interpolate(d2, size=e1.shape[2:], mode="bilinear", align_corners=False)
    d1 = naive_cbr(naive_cbr(d2, m.dec1, 0), m.dec1, 3)
    return e2, F.conv_transpose2d(d1, m.dec1[6].weight, m.dec1[6].bias, stride=2)


def naive_guided_step(inputs, step: GuidedStep):
    outs, encs, recs = [], [], []
    for s, x in enumerate(inputs):
        e, r = naive_semantic(x, step.semantic)
        a = naive_attention_layer(x, step.pam[s]) + naive_attention_layer(x, step.cam[s])
        outs.append(conv(a * conv(r, step.conv_sem[s]), step.conv_out[s]))
        encs.append(e)
        recs.append(r)
    return outs, encs, recs


# --- the blocks ----------------------------------------------------------------------------------

def test_semantic_module_matches_the_official_formula():
    m = randomise(SemanticModule(6))
    x = torch.randn(2, 6, 12, 8, dtype=torch.float64)
    enc, rec = m(x)
    assert enc.shape == (2, 24, 3, 2) and rec.shape == x.shape
    ref_enc, ref_rec = naive_semantic(x, m)
    assert_close(enc, ref_enc, **TIGHT)
    assert_close(rec, ref_rec, **TIGHT)


def test_attention_layers_use_danet_pam_and_cam_and_match_the_official_layer():
    layer_p = randomise(AttentionLayer(16, 1, "danet_pam"))
    layer_c = randomise(AttentionLayer(16, 1, "danet_cam"))
    assert type(layer_p.attention.mechanism) is DANetPositionAttention2d
    assert type(layer_c.attention.mechanism) is DANetChannelAttention2d
    assert layer_p.attention.mechanism.qk_dim == 2 and layer_p.attention.mechanism.gamma.item() == 0.7
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    assert_close(layer_p(x), naive_attention_layer(x, layer_p), **TIGHT)
    assert_close(layer_c(x), naive_attention_layer(x, layer_c), **TIGHT)


def test_fresh_attention_starts_as_the_identity_gamma_zero():
    m = MSGA(1, 3, 8)
    for layer in list(m.step1.pam) + list(m.step1.cam) + list(m.step2.pam):
        assert layer.attention.mechanism.gamma.item() == 0.0


def test_guided_step_combination_matches_the_official_code():
    step = randomise(GuidedStep(8, 1))
    inputs = [torch.randn(2, 16, 8, 8, dtype=torch.float64) for _ in range(4)]
    outs, encs, recs = step(inputs)
    ref = naive_guided_step(inputs, step)
    for got, want in zip((outs, encs, recs), ref):
        assert len(got) == 4
        for a, b in zip(got, want):
            assert_close(a, b, **TIGHT)
    assert all(o.shape == (2, 8, 8, 8) for o in outs) and all(e.shape == (2, 64, 2, 2) for e in encs)


def test_network_wiring_two_stacked_steps_and_the_eval_output():
    """Rebuild the forward from the model's parts, in the official order."""
    m = randomise(MSGA(1, 3, 8))
    x = torch.randn(2, 1, 64, 48, dtype=torch.float64)
    out = m(x)
    feats = m.backbone(x)
    assert [f.shape[2:] for f in feats] == [(16, 12), (8, 6), (4, 3), (2, 2)]     # stride 4 .. 32
    down = [F.interpolate(p(f), size=(16, 12), mode="bilinear", align_corners=False) for p, f in zip(m.down, feats)]
    fused = m.fuse(torch.cat(down, 1))
    in1 = [torch.cat((d, fused), 1) for d in down]
    a1, e1, r1 = naive_guided_step(in1, m.step1)
    in2 = [torch.cat((d, a * fused), 1) for d, a in zip(down, a1)]                # cat(F_s, A_s * F_MS)
    a2, e2, r2 = naive_guided_step(in2, m.step2)
    up = lambda t: F.interpolate(t, size=(64, 48), mode="bilinear", align_corners=False)
    step1 = [up(conv(d, p)) for d, p in zip(down, m.predict1)]                    # from F_s, not from A_s
    step2 = [up(conv(r, p)) for r, p in zip(a2, m.predict2)]
    for got, want in ((out.step1, step1), (out.step2, step2), (out.inputs1, in1), (out.inputs2, in2),
                      (out.encodings1, e1), (out.encodings2, e2), (out.reconstructions1, r1),
                      (out.reconstructions2, r2)):
        assert len(got) == 4
        for a, b in zip(got, want):
            assert_close(a, b, **TIGHT)
    assert_close(out.final, sum(step2) / 4, **TIGHT)


# --- the loss -----------------------------------------------------------------------------------

def test_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    step1, step2 = [r(2, 3, 4, 5) for _ in range(4)], [r(2, 3, 4, 5) for _ in range(4)]
    out = MSGAOutput(step1, step2, sum(step2) / 4, [r(2, 6, 4, 4) for _ in range(4)], [r(2, 6, 4, 4) for _ in range(4)],
                     [r(2, 12, 1, 1) for _ in range(4)], [r(2, 12, 1, 1) for _ in range(4)],
                     [r(2, 6, 4, 4) for _ in range(4)], [r(2, 6, 4, 4) for _ in range(4)])
    loss, parts = msga_loss(out, labels)

    def ce(logits):                                                  # mean over pixels of -log p[label]
        total = 0.0
        for b in range(2):
            for i in range(4):
                for j in range(5):
                    z = logits[b, :, i, j].tolist()
                    total += math.log(sum(math.exp(v) for v in z)) - z[int(labels[b, i, j])]
        return total / 40

    def mse(a, b):
        return float(((a - b) ** 2).sum()) / a.numel()

    want_ce = sum(ce(p) for p in step1 + step2)
    want_sem = sum(mse(a, b) for a, b in zip(out.encodings1, out.encodings2))           # step 1 vs step 2, per scale
    want_rec = sum(mse(x, y) for x, y in zip(out.inputs1 + out.inputs2, out.reconstructions1 + out.reconstructions2))
    assert parts["ce"].item() == pytest.approx(want_ce, rel=1e-12)
    assert parts["semantic"].item() == pytest.approx(want_sem, rel=1e-12)
    assert parts["reconstruction"].item() == pytest.approx(want_rec, rel=1e-12)
    assert loss.item() == pytest.approx(want_ce + 0.25 * want_sem + 0.1 * want_rec, rel=1e-12)
    with pytest.raises(ValueError, match=r"labels must be \(B, H, W\)"):
        msga_loss(out, labels[:, :3])


# --- shapes, options, errors ----------------------------------------------------------------------

def test_shapes_and_the_unguided_ablation():
    x = torch.randn(2, 1, 64, 64)
    guided, plain = MSGA(1, 4, 8), MSGA(1, 4, 8, guided=False)
    out, out_plain = guided(x), plain(x)
    for o in (out, out_plain):
        assert o.final.shape == (2, 4, 64, 64) and len(o.step1) == len(o.step2) == 4
        assert all(p.shape == (2, 4, 64, 64) for p in o.step1 + o.step2)
    assert len(out.encodings1) == 4 and out.encodings1[0].shape == (2, 64, 4, 4)
    assert out_plain.encodings1 == [] and out_plain.inputs1 == [] and out_plain.reconstructions2 == []
    assert not any(isinstance(mod, (SemanticModule, DANetPositionAttention2d)) for mod in plain.modules())
    assert parameter_count(plain) < parameter_count(guided)
    # Same backbone, projections, fusion and heads: those parameter counts are equal.
    for name in ("backbone", "down", "fuse", "predict1", "predict2"):
        assert parameter_count(getattr(plain, name)) == parameter_count(getattr(guided, name))
    assert MSGA(1, 3, 8, stem_stride=1)(torch.randn(1, 1, 32, 32)).final.shape == (1, 3, 32, 32)
    assert MSGA(1, 3, 8)(torch.randn(1, 1, 70, 66)).final.shape == (1, 3, 70, 66)        # sizes not / 4


def test_any_registered_mechanism_can_take_pam_s_place():
    m = MSGA(1, 3, 8, position="mhsa", channel="danet_cam")
    assert m.step1.pam[0].attention.layout == "seq"
    assert m(torch.randn(1, 1, 64, 64)).final.shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="2-D .* or sequence mechanism"):
        MSGA(1, 3, 8, position="attention_pool_latent")


def test_bad_input_is_refused_with_what_was_expected():
    m = MSGA(1, 3, 8)
    with pytest.raises(ValueError, match=r"expected images \(B, 1, H, W\), got \(2, 3, 64, 64\)"):
        m(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="at least 32 x 32"):
        m(torch.randn(1, 1, 16, 64))
    with pytest.raises(ValueError, match="dim must be an int >= 8"):
        MSGA(1, 3, 4)
    with pytest.raises(ValueError, match="widths must name 4"):
        MSGA(1, 3, 8, widths=(8, 16))
    with pytest.raises(ValueError, match="H, W divisible by 4"):
        SemanticModule(4)(torch.randn(1, 4, 6, 8))


def test_gradients_reach_every_parameter():
    m = MSGA(1, 3, 8)
    for layer in m.modules():
        if isinstance(layer, (DANetPositionAttention2d, DANetChannelAttention2d)):
            layer.gamma.data.fill_(0.5)
    x, y = torch.randn(2, 1, 64, 64), torch.randint(0, 3, (2, 64, 64))
    loss, _ = msga_loss(m(x), y)
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_short_training_on_shapes_beats_the_all_background_baseline():
    from attnlab.tasks import create_task
    torch.manual_seed(0)
    task = create_task("mni_slices", source="shapes", size=32, seed=0)
    model = task.build_model(8, 1, ["danet_pam", "danet_cam"], stem_stride=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(60):
        loss, _ = task.loss(model, task.batch("train", step, 8))
        opt.zero_grad()
        loss.backward()
        opt.step()
    val = task.evaluate(model, batches=2, batch_size=16)
    background = float(sum((task.batch("val", i, 16)["labels"] == 0).float().mean() for i in range(2)) / 2)
    # The all-background prediction: foreground Dice 0 and pixel accuracy = the background fraction.
    assert val["dice"] > 0.15, val
    assert val["pixel_accuracy"] > background + 0.01, (val, background)
