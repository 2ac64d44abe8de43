"""hyena against a naive float64 reference of the official computation, the FFT convolution against
a dense Toeplitz product, gradcheck, limiting cases, the bidirectional reading, bad input.

"Hyena Hierarchy" (Poli et al., ICML 2023), official code HazyResearch/safari
`standalone_hyena.py::HyenaOperator`. The reference below is written from that code with the
module's own parameters and shares no code with attnlab: positional features from their formula,
the filter MLP as explicit matmuls, the short filter as a sum over its three taps, each long
convolution as a dense (L, L) Toeplitz matrix

    y_t = sum_{s <= t} h_{t-s} u_s + bias u_t        (causal; the official operator)
    y_t = sum_s h_{|t-s|} u_s + bias u_t             (is_causal=False, attnlab's bidirectional reading)

and the official loop: for o, x_i in enumerate(reversed(x[1:])): v = conv_o(v * x_i); y = v * x[0].
The optional test at the end compares with the official module itself (copied weights) when
ATTNLAB_SAFARI_DIR names a safari checkout and einops is installed.
"""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch
from torch.testing import assert_close

import attnlab
from attnlab.mechanisms.hyena import long_conv

DIM = 12
TIGHT = dict(rtol=1e-10, atol=1e-12)
GRAD = dict(rtol=1e-9, atol=1e-11)


def hyena(dim=DIM, dtype=torch.float64, **options):
    options = {"l_max": 16, "filter_order": 8, **options}
    return attnlab.create("hyena", dim, 1, **options).to(dtype).eval()


# --- the naive reference -----------------------------------------------------------------------

def naive_features(emb_dim, l_max):
    """safari PositionalEmbedding: z = [t, Re, Im of exp(-i f w)], t (1, l_max, 1)."""
    bands = (emb_dim - 1) // 2
    t = torch.tensor([k / (l_max - 1) if l_max > 1 else 0.0 for k in range(l_max)], dtype=torch.float64)
    f = torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)
    rows = []
    for k in range(l_max):
        w = 2 * math.pi * k / l_max
        rows.append([t[k].item()] + [math.cos(fi * w) for fi in f.tolist()] + [-math.sin(fi * w) for fi in f.tolist()])
    return torch.tensor(rows, dtype=torch.float64)[None], t[None, :, None]


def naive_filters(m, L):
    """(N-1, D, L) long filters from the module's parameters, as the official HyenaFilter.filter."""
    f = m.filter_fn
    z, t = f.pos_emb.z[:, :L], f.pos_emb.t[:, :L]
    layers = list(f.implicit_filter)
    h = z
    for layer in layers:
        if isinstance(layer, torch.nn.Linear):
            h = h @ layer.weight.T + (layer.bias if layer.bias is not None else 0.0)
        else:
            h = torch.sin(layer.freq * h)
    mod = f.modulation
    if mod.modulate:
        h = h * (torch.exp(-t * mod.deltas.abs()) + mod.shift)
    N, D = m.order, m.dim
    h = h[0]                                                    # (L, (N-1) D), channel o D + d
    return torch.stack([h[:, o * D:(o + 1) * D].T for o in range(N - 1)])   # (N-1, D, L)


def toeplitz(h, causal):
    """(D, L) taps -> (D, L, L) matrices T[t, s] = h_{t-s} (s <= t), or h_{|t-s|}."""
    D, L = h.shape
    T = torch.zeros(D, L, L, dtype=h.dtype)
    for t in range(L):
        for s in range(L):
            if s <= t:
                T[:, t, s] = h[:, t - s]
            elif not causal:
                T[:, t, s] = h[:, s - t]
    return T


def naive_conv(u, h, bias, causal):
    """u (B, D, L): the dense Toeplitz product plus the bias (skip) term."""
    return torch.einsum("dts,bds->bdt", toeplitz(h, causal), u) + bias[None, :, None] * u


def naive_hyena(m, x, causal=True):
    B, L, C = x.shape
    N = m.order
    u = (x @ m.in_proj.weight.T + m.in_proj.bias).transpose(1, 2)           # (B, (N+1) C, L)
    w, b = m.short_filter.weight[:, 0], m.short_filter.bias                  # (3C', 3), (3C',)
    uc = b[None, :, None].expand_as(u).clone()
    for t in range(L):
        taps = (t - 2, t - 1, t) if causal else (t - 1, t, t + 1)
        for j, s in enumerate(taps):
            if 0 <= s < L:
                uc[:, :, t] = uc[:, :, t] + w[:, j] * u[:, :, s]
    xs = [uc[:, i * C:(i + 1) * C] for i in range(N + 1)]
    *gates, v = xs
    h = naive_filters(m, L)
    bias = m.filter_fn.bias.reshape(N - 1, C)
    for o, x_i in enumerate(reversed(gates[1:])):
        v = naive_conv(v * x_i, h[o], bias[o], causal)
    y = (v * gates[0]).transpose(1, 2)
    return y @ m.out_proj.weight.T + m.out_proj.bias


CONFIGS = [
    dict(),
    dict(order=3, emb_dim=5, num_inner_mlps=1, shift=0.1),
    dict(order=4, filter_order=4, learn_modulation=True, w=3.0),
    dict(modulate=False, emb_dim=33, w=14.0, l_max=20),
    dict(learn_pos_emb=False, num_inner_mlps=0, fast_decay_pct=0.5, slow_decay_pct=2.0, target=0.05),
]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_matches_naive_reference_outputs_and_gradients(options, causal):
    m = hyena(**options)
    x = torch.randn(3, 11, DIM, dtype=torch.float64, requires_grad=True)
    y = m(x, is_causal=causal)
    ref = naive_hyena(m, x, causal)
    assert_close(y, ref, **TIGHT)
    params = [p for p in m.parameters() if p.requires_grad]
    g = torch.randn_like(y)
    grads = torch.autograd.grad((y * g).sum(), [x, *params])
    grads_ref = torch.autograd.grad((ref * g).sum(), [x, *params])
    names = ["x"] + [n for n, p in m.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, grads, grads_ref):
        assert_close(a, b, **GRAD, msg=lambda s: f"gradient of {name}: {s}")


def test_positional_features_and_window_match_the_formula():
    m = attnlab.create("hyena", DIM, 1, emb_dim=7, l_max=13, dtype=torch.float64)  # features made in float64
    z, t = naive_features(7, 13)
    assert_close(m.filter_fn.pos_emb.z, z, **TIGHT)
    assert_close(m.filter_fn.pos_emb.t, t, **TIGHT)
    D = m.dim * (m.order - 1)
    deltas = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, D, dtype=torch.float64)
    assert_close(m.filter_fn.modulation.deltas.flatten(), deltas, **TIGHT)
    assert isinstance(m.filter_fn.pos_emb.z, torch.nn.Parameter)           # lr_pos_emb != 0 officially
    assert "filter_fn.modulation.deltas" in dict(m.named_buffers())        # modulation_lr = 0 officially
    # One Sin module after every hidden Linear, as the official Sequential.
    freqs = {id(layer.freq) for layer in m.filter_fn.implicit_filter if hasattr(layer, "freq")}
    assert len(freqs) == 1


# --- the FFT convolution against the dense Toeplitz product --------------------------------------

@pytest.mark.parametrize("L", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_fft_conv_equals_dense_toeplitz(L, causal):
    D = 5
    u = torch.randn(2, D, L, dtype=torch.float64)
    h = torch.randn(D, L, dtype=torch.float64)
    bias = torch.randn(D, dtype=torch.float64)
    assert_close(long_conv(u, h, bias, causal=causal), naive_conv(u, h, bias, causal), **TIGHT)


def test_fft_conv_gradcheck():
    u = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    h = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for causal in (True, False):
        assert torch.autograd.gradcheck(lambda a, b, c: long_conv(a, b, c, causal=causal), (u, h, bias))


@pytest.mark.parametrize("causal", [True, False])
def test_module_gradcheck(causal):
    m = hyena(dim=4, l_max=6, filter_order=4, order=3)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t, is_causal=causal), (x,))


# --- limiting cases and properties ---------------------------------------------------------------

def test_single_token_is_a_gated_pointwise_map():
    """L = 1: the long convolution is (h_0 + bias) v, so y = out_proj(x_0 (h_0 + bias) x_1 v) with
    the short filter's last tap (causal) or middle tap (bidirectional) only."""
    m = hyena()
    x = torch.randn(4, 1, DIM, dtype=torch.float64)
    u = x[:, 0] @ m.in_proj.weight.T + m.in_proj.bias                        # (B, 3C)
    h0 = naive_filters(m, 1)[0, :, 0]                                        # (C,)
    bias = m.filter_fn.bias
    for causal, tap in ((True, 2), (False, 1)):
        uc = u * m.short_filter.weight[:, 0, tap] + m.short_filter.bias
        x0, x1, v = uc.split(DIM, dim=-1)
        expect = (x0 * (h0 + bias) * x1 * v) @ m.out_proj.weight.T + m.out_proj.bias
        assert_close(m(x, is_causal=causal)[:, 0], expect, **TIGHT)


def test_causal_output_is_a_prefix_of_the_longer_sequence():
    """The filter for L < l_max is the first L taps of the l_max filter (official pos_emb(L))."""
    m = hyena()
    x = torch.randn(2, 16, DIM, dtype=torch.float64)
    full = m(x, is_causal=True)
    for L in (1, 5, 12):
        assert_close(m(x[:, :L], is_causal=True), full[:, :L], **TIGHT)


def test_bidirectional_filter_is_symmetric():
    """Reversing the sequence and mirroring the short filter reverses the bidirectional output."""
    m = hyena()
    x = torch.randn(2, 9, DIM, dtype=torch.float64)
    y = m(x)
    with torch.no_grad():
        m.short_filter.weight.copy_(m.short_filter.weight.flip(-1))
    assert_close(m(x.flip(1)).flip(1), y, **TIGHT)


def test_zero_filter_leaves_only_the_bias_term():
    """A hook that zeroes the long filter turns each long convolution into bias * v."""
    m = hyena(order=3)
    m.hook_filter.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    u = (x @ m.in_proj.weight.T + m.in_proj.bias).transpose(1, 2)
    uc = torch.nn.functional.conv1d(u, m.short_filter.weight, m.short_filter.bias, padding=2,
                                    groups=u.shape[1])[..., :7]
    x0, x1, x2, v = uc.split(DIM, dim=1)
    b = m.filter_fn.bias.reshape(2, DIM)[:, :, None]
    expect = (x0 * b[1] * x1 * b[0] * x2 * v).transpose(1, 2) @ m.out_proj.weight.T + m.out_proj.bias
    assert_close(m(x, is_causal=True), expect, **TIGHT)


def test_hooks_carry_the_gates_and_filters():
    m = hyena(order=3)
    seen = {}
    for name in m.hook_names:
        getattr(m, name).register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out))
    x = torch.randn(2, 7, DIM, dtype=torch.float64)
    with torch.no_grad():
        m(x, is_causal=True)
    assert seen["hook_q"].shape == (2, DIM, 7)
    assert seen["hook_k"].shape == (2, 2, DIM, 7)
    assert seen["hook_v"].shape == (2, DIM, 7)
    assert seen["hook_out"].shape == (2, DIM, 7)
    assert_close(seen["hook_filter"], naive_filters(m, 7), **TIGHT)


def test_num_heads_changes_nothing():
    torch.manual_seed(3)
    a = attnlab.create("hyena", DIM, 1, l_max=16, filter_order=8).double()
    torch.manual_seed(3)
    b = attnlab.create("hyena", DIM, 5, l_max=16, filter_order=8).double()
    x = torch.randn(2, 6, DIM, dtype=torch.float64)
    assert_close(a(x, is_causal=True), b(x, is_causal=True), rtol=0, atol=0)


def test_useful_flops_grow_like_n_log_n():
    m = hyena(dim=64, l_max=1 << 14, filter_order=64)
    f1, b1 = m.useful_flops(1, 1024, 64, 8, True)
    f2, _ = m.useful_flops(1, 4096, 64, 8, True)
    assert b1 == 2 * f1 and f1 > 0
    assert 4.0 < f2 / f1 < 5.0        # linear terms x4, the FFTs a little more
    with pytest.raises(ValueError, match="dim"):
        m.useful_flops(1, 1024, 32, 8, True)


# --- bad input -----------------------------------------------------------------------------------

def test_sequence_longer_than_l_max_raises():
    m = hyena(l_max=8)
    with pytest.raises(ValueError, match=r"hyena.*N=9.*l_max=8"):
        m(torch.randn(1, 9, DIM, dtype=torch.float64))


def test_attn_mask_and_cache_refused():
    m = hyena()
    x = torch.randn(1, 4, DIM, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="hyena.*attn_mask"):
        m(x, attn_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="hyena.*kv_cache"):
        m(x, is_causal=True, cache=attnlab.KVCache())


@pytest.mark.parametrize("options,match", [
    (dict(order=1), r"order must be an int >= 2, got 1"),
    (dict(l_max=0), r"l_max must be an int >= 1, got 0"),
    (dict(emb_dim=4), r"emb_dim must be an odd int >= 3.*got 4"),
    (dict(emb_dim=1), r"emb_dim must be an odd int >= 3.*got 1"),
    (dict(filter_order=0), r"filter_order must be an int >= 1, got 0"),
    (dict(num_inner_mlps=-1), r"num_inner_mlps must be an int >= 0, got -1"),
    (dict(target=1.5), r"target .* must be in \(0, 1\), got 1.5"),
    (dict(fast_decay_pct=0.0), r"fast_decay_pct must be a finite number > 0, got 0.0"),
    (dict(w=float("nan")), r"w must be a finite number, got nan"),
    (dict(attn_drop=1.0), r"attn_drop must be a number in \[0, 1\), got 1.0"),
])
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        attnlab.create("hyena", DIM, 1, **options)


def test_non_bool_flag_raises():
    with pytest.raises(TypeError, match="hyena: modulate must be a bool, got str"):
        attnlab.create("hyena", DIM, 1, modulate="yes")


# --- the official module, when a safari checkout is at hand ----------------------------------------

def _official():
    root = os.environ.get("ATTNLAB_SAFARI_DIR")
    if not root:
        pytest.skip("set ATTNLAB_SAFARI_DIR to a HazyResearch/safari checkout to compare with standalone_hyena.py")
    pytest.importorskip("einops")
    path = os.path.join(root, "standalone_hyena.py")
    if not os.path.exists(path):
        pytest.skip(f"no standalone_hyena.py in {root}")
    spec = importlib.util.spec_from_file_location("_safari_standalone_hyena", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("options", [dict(order=2, filter_order=16),
                                     dict(order=3, filter_order=8, emb_dim=5),
                                     dict(order=2, filter_order=64, emb_dim=33, modulate=False, w=14)])
def test_matches_the_official_module_with_copied_weights(options):
    official = _official().HyenaOperator(d_model=DIM, l_max=24, **options).double()
    m = attnlab.create("hyena", DIM, 1, l_max=24, **options).double()
    m.load_state_dict(official.state_dict(), strict=True)
    for L in (24, 13):
        x = torch.randn(2, L, DIM, dtype=torch.float64)
        assert_close(m(x, is_causal=True), official(x), rtol=1e-10, atol=1e-12)


def test_state_dict_keys_and_shapes_are_the_official_ones():
    """safari's HyenaOperator(d_model=32, l_max=1024, order=2, filter_order=64) state_dict, pinned
    (the official-module comparison above skips without a safari checkout): the filter MLP is
    Linear(3, 64), Sin, Linear(64, 64), Sin, Linear(64, 64), Sin, Linear(64, 32, bias=False),
    one Sin module shared by the three activation slots."""
    m = attnlab.create("hyena", 32, 4)
    expected = {
        "in_proj.weight": (96, 32), "in_proj.bias": (96,), "out_proj.weight": (32, 32), "out_proj.bias": (32,),
        "short_filter.weight": (96, 1, 3), "short_filter.bias": (96,), "filter_fn.bias": (32,),
        "filter_fn.pos_emb.z": (1, 1024, 3), "filter_fn.pos_emb.t": (1, 1024, 1),
        "filter_fn.implicit_filter.0.weight": (64, 3), "filter_fn.implicit_filter.0.bias": (64,),
        "filter_fn.implicit_filter.1.freq": (1, 64),
        "filter_fn.implicit_filter.2.weight": (64, 64), "filter_fn.implicit_filter.2.bias": (64,),
        "filter_fn.implicit_filter.3.freq": (1, 64),
        "filter_fn.implicit_filter.4.weight": (64, 64), "filter_fn.implicit_filter.4.bias": (64,),
        "filter_fn.implicit_filter.5.freq": (1, 64),
        "filter_fn.implicit_filter.6.weight": (32, 64), "filter_fn.modulation.deltas": (1, 1, 32)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    f = m.filter_fn.implicit_filter
    assert f[1] is f[3] is f[5], "the official filter shares one Sin module"
