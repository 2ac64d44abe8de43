"""attnlab.models.htr_jand against naive float64 references written from the formulas.

FullGatedConv2d (Flor et al.: one conv to 2F channels, h[:F] * sigmoid(h[F:])) and the SE block
(Hu et al.: x * sigmoid(W2 relu(W1 mean(x) + b1) + b2)) are written out with loops over the
modules' weights; a gated stage is checked against its composition (conv, PReLU, BatchNorm,
gated conv, SE); greedy CTC decoding, edit distance, CER/WER, the CTC loss of a two-frame input
and the distillation KL against hand-worked values. Plus shapes, the student/teacher parameter
ratio, bad input, and a short training on rendered digit strings that learns.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from attnlab.models.htr_jand import (HTRJAND, PRESETS, FullGatedConv2d, GatedStage, SqueezeExcitation,
                                     ctc_loss, default_stages, distillation_kl, edit_distance, error_rates,
                                     greedy_decode, sinusoidal_positions)

TIGHT = dict(rtol=1e-10, atol=1e-12)


# --- naive references ---------------------------------------------------------------------------

def naive_conv(x, weight, bias, stride, padding):
    """Cross-correlation by loops: out[b, o, i, j] = bias[o] + sum_{c,u,v} w[o, c, u, v] x_pad[b, c, i s + u, j s + v]."""
    x, w, bias = x.numpy(), weight.detach().numpy(), bias.detach().numpy()
    (sh, sw), (ph, pw) = stride, padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    B, C, H, W = xp.shape
    O, _, kh, kw = w.shape
    Ho, Wo = (H - kh) // sh + 1, (W - kw) // sw + 1
    out = np.zeros((B, O, Ho, Wo))
    for b in range(B):
        for o in range(O):
            for i in range(Ho):
                for j in range(Wo):
                    out[b, o, i, j] = bias[o] + (w[o] * xp[b, :, i * sh:i * sh + kh, j * sw:j * sw + kw]).sum()
    return out


def naive_full_gated(x, module):
    """Flor's FullGatedConv2D: the conv's first F outputs times the sigmoid of the last F."""
    h = naive_conv(x, module.conv.weight, module.conv.bias, module.conv.stride, module.conv.padding)
    F_ = module.out_channels
    return torch.from_numpy(h[:, :F_] * (1.0 / (1.0 + np.exp(-h[:, F_:]))))


def naive_se(x, module):
    """Hu et al.'s SE: z_c = mean over H, W; s = sigmoid(W2 relu(W1 z + b1) + b2); out = x * s_c."""
    x = x.numpy()
    W1, b1 = module.fc1.weight.detach().numpy(), module.fc1.bias.detach().numpy()
    W2, b2 = module.fc2.weight.detach().numpy(), module.fc2.bias.detach().numpy()
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        z = [x[b, c].sum() / x[b, c].size for c in range(x.shape[1])]
        hidden = [max(0.0, sum(W1[r, c] * z[c] for c in range(len(z))) + b1[r]) for r in range(W1.shape[0])]
        for c in range(x.shape[1]):
            s = 1.0 / (1.0 + math.exp(-(sum(W2[c, r] * hidden[r] for r in range(len(hidden))) + b2[c])))
            out[b, c] = x[b, c] * s
    return torch.from_numpy(out)


# --- the blocks against the references ----------------------------------------------------------

@pytest.mark.parametrize("kernel,stride", [(3, 1), ((3, 1), (2, 1)), (1, 1)])
def test_full_gated_conv_matches_the_formula(kernel, stride):
    torch.manual_seed(0)
    m = FullGatedConv2d(3, 4, kernel, stride=stride).double()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    out = m(x)
    assert out.shape[1] == 4
    assert_close(out, naive_full_gated(x, m), **TIGHT)


def test_full_gated_conv_halves_are_linear_then_gate():
    # Zero the gate half's weights and set its bias to +40: sigmoid = 1, so out = the linear half alone.
    torch.manual_seed(1)
    m = FullGatedConv2d(2, 3).double()
    with torch.no_grad():
        m.conv.weight[3:].zero_()
        m.conv.bias[3:].fill_(40.0)
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    linear = F.conv2d(x, m.conv.weight[:3], m.conv.bias[:3], padding=1)
    assert_close(m(x), linear, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("channels,reduction", [(8, 4), (6, 2), (3, 8)])
def test_squeeze_excitation_matches_the_formula(channels, reduction):
    torch.manual_seed(2)
    m = SqueezeExcitation(channels, reduction).double()
    assert m.fc1.out_features == max(1, channels // reduction)
    x = torch.randn(2, channels, 4, 5, dtype=torch.float64)
    assert_close(m(x), naive_se(x, m), **TIGHT)


def test_gated_stage_is_conv_prelu_batchnorm_gated_se():
    torch.manual_seed(3)
    stage = GatedStage(2, 4, (4, 1), se_reduction=2).double().eval()
    with torch.no_grad():                        # non-trivial PReLU slopes and BatchNorm statistics
        stage.act.weight.uniform_(0.1, 0.5)
        stage.norm.running_mean.normal_()
        stage.norm.running_var.uniform_(0.5, 2.0)
        stage.norm.weight.normal_(1.0, 0.2)
        stage.norm.bias.normal_()
    x = torch.randn(2, 2, 8, 6, dtype=torch.float64)
    assert stage.kernel == (4, 3) and stage.padding == (0, 1)          # non-overlapping along a stride of 4
    h = torch.from_numpy(naive_conv(x, stage.conv.weight, stage.conv.bias, (4, 1), (0, 1)))
    a = stage.act.weight[None, :, None, None]
    h = torch.where(h > 0, h, a * h)
    h = (h - stage.norm.running_mean[None, :, None, None]) / torch.sqrt(
        stage.norm.running_var[None, :, None, None] + stage.norm.eps)
    h = h * stage.norm.weight[None, :, None, None] + stage.norm.bias[None, :, None, None]
    expected = naive_se(naive_full_gated(h.detach(), stage.gated), stage.se)
    assert_close(stage(x), expected, rtol=1e-9, atol=1e-10)
    assert stage.out_size(8, 6) == (2, 6)


def test_sinusoidal_positions_formula():
    p = sinusoidal_positions(5, 6, dtype=torch.float64)
    for pos in range(5):
        for i in range(3):
            angle = pos / 10000 ** (2 * i / 6)
            assert p[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert p[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)


# --- the network --------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [["combined", "combined"], ["mhsa"], [None, "proxima"], 1])
def test_shapes_and_layers(layers):
    torch.manual_seed(0)
    m = HTRJAND(10, dim=32, num_heads=2, layers=layers, in_height=32, width=0.5)
    x = torch.rand(3, 1, 32, 48)
    out = m(x)
    assert out.shape == (3, 12, 11) and m.frames(48) == 12 and m.out_height == 1
    expected = [None if l is None else l for l in (layers if isinstance(layers, list) else ["combined"])]
    assert m.layer_names == expected
    assert HTRJAND(10, 32, 2, ["mhsa"], in_height=16, width=0.5)(torch.rand(2, 1, 16, 40)).shape == (2, 10, 11)


def test_columns_are_the_encoder_width_axis():
    """Changing the input only to the right of column 4 * t leaves the encoder features of the first
    frames alone when no attention mixes columns (layers of None); attention then mixes them."""
    torch.manual_seed(0)
    m = HTRJAND(5, 16, 2, [None], in_height=16, width=0.25).eval()
    x = torch.rand(1, 1, 16, 64)
    y = x.clone()
    y[..., 40:] = torch.rand(1, 1, 16, 24)
    a, b = m(x), m(y)
    assert_close(a[:, :8], b[:, :8])                                   # frames 0-7 see columns < 40 only
    assert not torch.allclose(a[:, 12:], b[:, 12:])
    attn = HTRJAND(5, 16, 2, ["mhsa"], in_height=16, width=0.25).eval()
    assert not torch.allclose(attn(x)[:, :8], attn(y)[:, :8])


def test_student_has_about_half_the_teachers_parameters():
    count = lambda m: sum(p.numel() for p in m.parameters())
    for layers in (["combined"] * 2, ["mhsa"] * 2):
        teacher = HTRJAND(36, layers=layers, in_height=32, **PRESETS["teacher"])
        student = HTRJAND(36, layers=layers, in_height=32, **PRESETS["student"])
        assert 0.4 <= count(student) / count(teacher) <= 0.6
    assert 0.45 <= count(HTRJAND(36, layers=["combined"] * 2, **PRESETS["student"])) / count(
        HTRJAND(36, layers=["combined"] * 2, **PRESETS["teacher"])) <= 0.55


def test_bad_input_raises():
    m = HTRJAND(5, 16, 2, ["mhsa"], in_height=16)
    with pytest.raises(ValueError, match=r"expects images \(B, 1, 16, W\), got \(2, 1, 32, 40\)"):
        m(torch.rand(2, 1, 32, 40))
    with pytest.raises(ValueError, match="in_height a multiple of 8, got 20"):
        default_stages(20)
    with pytest.raises(ValueError, match="non-empty list of mechanism names or None"):
        HTRJAND(5, 16, 2, "mhsa")
    with pytest.raises(ValueError, match="unknown mechanism|did you mean"):
        HTRJAND(5, 16, 2, ["mhsaa"])
    with pytest.raises(ValueError, match="width must be a positive number"):
        HTRJAND(5, 16, 2, ["mhsa"], width=0)
    with pytest.raises(ValueError, match="positions must be"):
        HTRJAND(5, 16, 2, ["mhsa"], positions="learned")


# --- decoding, metrics, losses ------------------------------------------------------------------

def one_hot_logits(paths, K):
    return torch.stack([F.one_hot(torch.tensor(p), K).double() * 5.0 for p in paths])   # (B, T, K)


def test_greedy_decode_merges_repeats_then_drops_blanks():
    logits = one_hot_logits([[0, 1, 1, 0, 1, 2, 2, 0, 0, 3], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                             [2, 2, 2, 2, 2, 0, 2, 3, 3, 3]], 4)
    assert greedy_decode(logits) == [[1, 1, 2, 3], [], [2, 2, 3]]


def test_edit_distance_and_error_rates_by_hand():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("flaw", "lawn") == 2
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3 and edit_distance("ab", "ab") == 0
    assert edit_distance(["a", "b"], ["b"]) == 1
    r = error_rates(["helo world", "abc"], ["hello world", "abd"])
    # chars: 1 deletion + 1 substitution over 11 + 3; words: helo != hello, abc != abd over 3 words.
    assert (r["char_edits"], r["chars"], r["word_edits"], r["words"]) == (2, 14, 2, 3)
    assert r["cer"] == pytest.approx(2 / 14) and r["wer"] == pytest.approx(2 / 3)
    blank = error_rates(["", ""], ["to be", "or"])
    assert blank["cer"] == 1.0 and blank["wer"] == 1.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        error_rates(["a", "b"], ["a"])


def test_ctc_loss_of_two_frames_by_hand():
    # Target "a" (class 1) in T = 2 frames: the paths (a, a), (a, -), (-, a).
    logits = torch.tensor([[[0.3, -0.2, 0.5], [1.0, 0.1, -0.4]]], dtype=torch.float64)
    p = torch.softmax(logits[0], -1)
    prob = p[0, 1] * p[1, 1] + p[0, 1] * p[1, 0] + p[0, 0] * p[1, 1]
    loss = ctc_loss(logits, torch.tensor([[1, 0]]), torch.tensor([1]))
    assert loss.item() == pytest.approx(-math.log(prob.item()), rel=1e-5)       # computed in float32
    # "aa" needs a blank between: T = 2 cannot fit it (3 frames), zero_infinity gives 0.
    assert ctc_loss(logits, torch.tensor([[1, 1]]), torch.tensor([2])).item() == 0.0


def test_distillation_kl_formula():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 3, 5, dtype=torch.float64)
    tau = 2.0
    expected = 0.0
    for b in range(2):
        for f in range(3):
            pt, ps = torch.softmax(t[b, f] / tau, -1), torch.softmax(s[b, f] / tau, -1)
            expected += float((pt * (pt.log() - ps.log())).sum()) / 6
    assert distillation_kl(s, t, tau).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_kl(t, t, tau).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ"):
        distillation_kl(s, t[:, :2], tau)


# --- a short training that learns ---------------------------------------------------------------

def test_short_training_on_digit_strings_learns():
    """150 steps on rendered sklearn digit strings: the val CER (held-out digit samples) ends far below
    the blank decoder's 1.0 and the best constant string's (computed here on the same val lines)."""
    pytest.importorskip("sklearn")
    from attnlab.tasks import create_task
    from attnlab.train import TrainConfig, train
    torch.set_num_threads(1)
    config = TrainConfig(task="htr_lines", task_options={"source": "digits"}, layers=["combined"], dim=48,
                         num_heads=4, mlp_ratio=2.0, block_options={"width": 0.5}, steps=150, batch_size=32,
                         lr=3e-3, warmup=30, eval_every=150, eval_batches=2, eval_batch_size=64,
                         checkpoint_every=0, seed=0)
    result = train(config, None, progress=False)
    task = create_task("htr_lines", source="digits")
    refs = [t for i in range(2) for t in task.texts_of(task.batch("val", i, 64))]
    constant = min(error_rates([c * k for _ in refs], refs)["cer"] for c in "0123456789" for k in (1, 2, 3, 4))
    assert result.history[0]["val_cer"] >= 0.9                  # the untrained model
    assert constant > 0.7
    assert result.final["val_cer"] < 0.45, result.history
