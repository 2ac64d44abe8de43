"""Edge-MoE numerics (attnlab.ops.numerics): the single-pass softmax and the lookup GELU.

References written here from the paper's arithmetic (official HLS code, see the module
docstring), in plain Python integers: a fixed-point value is an int count of u = 2**-22.

Measured maximum absolute errors against the exact float64 op (fixed-point mode, the default;
chunk_size 1 and 7 agree to within 25%), asserted below with a little headroom:

    softmax case                                   M    max |p - softmax|   max |sum p - 1|
    wide:      logits U[-1e4, 1e4]                 64   3.5e-7              2.4e-7
    spread:    half the row within 3 of 1e4        64   4.4e-7              7.6e-6
    negative:  logits U[-1e4, -1e4 + 20]           64   1.1e-6              8.6e-6
    equal:     all logits equal                    197  2.1e-7              4.2e-5
    normal:    N(0, 3^2)                           197  1.4e-5              3.4e-5
    masked:    N(0, 3^2), half -inf                64   2.9e-6              8.1e-6
    adversarial: one 0, rest at ln(1.999 u)       256  6.1e-5              6.1e-5
    derived worst case for any row: (2 M + 4) u + 2 u  (3.2e-5 at M = 64, 1.2e-4 at M = 256)

    GELU over [-20, 20] (400001 points): 9.76e-5 (fixed point), 9.74e-5 (float table);
    interpolation bound 2 phi(0) h^2 / 8 = 9.7e-5 plus grid rounding; tanh-GELU: 4.7e-4.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from attnlab.ops.numerics import (
    ACTIVATIONS, FRAC_BITS, GELU_TABLE_MAX, SOFTMAXES, edgemoe_gelu, edgemoe_softmax,
    exact_softmax, gelu_delta_table, softmax_attention,
)

U = 2.0 ** -FRAC_BITS                     # one unit of the hardware's fixed-point grid
ONE = 2 ** FRAC_BITS                      # 1.0 in units


def bound(M: int) -> float:
    """The derived worst-case absolute error of a probability (and of a row sum), M keys."""
    return (2 * M + 4) * U + 2 * U


# --- naive references of the paper's arithmetic -----------------------------------------------

def _units(x: float) -> int:
    return math.floor(x * ONE)            # ap_fixed AP_TRN: truncate toward -inf


def _exp_units(t_units: int) -> int:
    return math.floor(math.exp(t_units / ONE) * ONE)


def reference_softmax_row(row: list[float]) -> list[float]:
    """The hardware recurrence, one logit per step, in exact integer fixed point."""
    xs = [_units(v) if v != float("-inf") else None for v in row]
    bias, total = None, 0                                 # b = -inf, S = 0
    for x in xs:
        if x is None:                                     # a masked logit adds exp(-inf) = 0
            continue
        if bias is None or x > bias:                      # new bias: S = S * exp(b - x) + 1
            total = (total * (_exp_units(bias - x) if bias is not None else 0)) // ONE + ONE
            bias = x
        else:                                             # S = S + exp(x - b)
            total += _exp_units(x - bias)
    if bias is None:
        return [0.0] * len(row)
    recip = ONE * ONE // total                            # 1 / S, truncated
    return [0.0 if x is None else (_exp_units(x - bias) * recip // ONE) / ONE for x in xs]


def reference_softmax(x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).tolist()
    return torch.tensor([reference_softmax_row(r) for r in rows], dtype=torch.float64).reshape(x.shape)


def reference_gelu_table() -> list[int]:
    # T[i] = i h Phi(-i h) rounded to the nearest unit, h = 1/32, until it rounds to 0.
    table, i = [], 0
    while True:
        a = i / 32
        table.append(round(a * 0.5 * math.erfc(a / math.sqrt(2)) * ONE))
        if table[-1] == 0 and i > 0:
            return table
        i += 1


def reference_gelu(values: list[float]) -> list[float]:
    """ReLU(x) - lerp(T, |x| * 32) in integer fixed point; ReLU beyond the table."""
    table = reference_gelu_table()
    step = ONE // 32                                      # h = 2**17 units
    out = []
    for v in values:
        x = _units(v)
        a = abs(x)
        relu = max(x, 0)
        if a >= (len(table) - 1) * step:
            out.append(relu / ONE)
            continue
        i, frac = divmod(a, step)                         # index and t = frac / step
        delta = (table[i] * step + frac * (table[i + 1] - table[i])) // step
        out.append((relu - delta) / ONE)
    return out


# --- softmax: against the naive fixed-point reference ------------------------------------------

def _logits(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    f64 = dict(dtype=torch.float64, generator=g)
    if name == "wide":
        return torch.empty(64, 64, dtype=torch.float64).uniform_(-1e4, 1e4, generator=g)
    if name == "spread":
        x = torch.empty(64, 64, dtype=torch.float64).uniform_(-1e4, 1e4, generator=g)
        x[:, ::2] = 1e4 - 3 * torch.rand(64, 32, **f64)
        return x
    if name == "negative":
        return torch.empty(64, 64, dtype=torch.float64).uniform_(-1e4, -1e4 + 20, generator=g)
    if name == "equal":
        return torch.full((8, 197), -123.456, dtype=torch.float64)
    if name == "normal":
        return 3 * torch.randn(64, 197, **f64)
    if name == "masked":
        x = 3 * torch.randn(64, 64, **f64)
        x[torch.rand(64, 64, generator=g) < 0.5] = float("-inf")
        x[:, 0] = 0.0
        return x
    if name == "adversarial":  # every non-max lane just under 2u: truncation loses ~u on each
        x = torch.full((4, 256), math.log(1.999 * U), dtype=torch.float64)
        x[:, 0] = 0.0
        return x
    raise AssertionError(name)


# name -> (measured max |p - softmax| rounded up, measured max |sum - 1| rounded up)
MEASURED = {"wide": (4e-7, 3e-7), "spread": (5e-7, 9e-6), "negative": (1.3e-6, 1e-5),
            "equal": (3e-7, 5e-5), "normal": (1.6e-5, 4e-5), "masked": (3.5e-6, 1e-5),
            "adversarial": (6.5e-5, 6.5e-5)}


@pytest.mark.parametrize("name", ["wide", "normal", "masked", "adversarial"])
def test_softmax_matches_fixed_point_reference(name):
    x = _logits(name)[:16, :80]
    ref = reference_softmax(x)
    # One unit of slack: torch.exp and math.exp may differ in the last bit at a grid boundary.
    assert_close(edgemoe_softmax(x), ref, rtol=0, atol=2 * U)


def test_softmax_reference_catches_float_arithmetic():
    """The reference is sharp enough to tell the fixed-point emulation from plain floats."""
    x = _logits("normal")[:16]
    with pytest.raises(AssertionError):
        assert_close(edgemoe_softmax(x, frac_bits=None), reference_softmax(x), rtol=0, atol=2 * U)


@pytest.mark.parametrize("chunk_size", [1, 7])
@pytest.mark.parametrize("name", list(MEASURED))
def test_softmax_error_bound(name, chunk_size):
    x = _logits(name)
    M = x.shape[-1]
    exact = torch.softmax(x, dim=-1)
    p = edgemoe_softmax(x, chunk_size=chunk_size)
    atol_p, atol_sum = MEASURED[name]
    assert_close(p, exact, rtol=0, atol=atol_p)
    assert_close(p.sum(-1), torch.ones(x.shape[0], dtype=torch.float64), rtol=0, atol=atol_sum)
    # and the derived worst case, which holds for any input
    assert_close(p, exact, rtol=0, atol=bound(M))
    assert_close(p.sum(-1), torch.ones(x.shape[0], dtype=torch.float64), rtol=0, atol=bound(M))
    assert (p >= 0).all()


def test_softmax_float_mode_is_softmax():
    x = _logits("wide")
    assert_close(edgemoe_softmax(x, frac_bits=None), torch.softmax(x, -1), rtol=0, atol=1e-15)
    x32 = _logits("normal").float()
    for chunk_size in (1, 5, 1000):
        assert_close(edgemoe_softmax(x32, chunk_size=chunk_size, frac_bits=None), torch.softmax(x32, -1),
                     rtol=0, atol=3e-7)                 # 2 float32 ulps near 1


def test_softmax_all_equal_row_is_uniform_on_the_grid():
    p = edgemoe_softmax(torch.full((3, 10), 5e3))
    assert_close(p, torch.full((3, 10), math.floor(0.1 * ONE) / ONE), rtol=0, atol=0)


def test_softmax_fully_masked_row_is_zero_and_masked_entries_are_exactly_zero():
    x = torch.randn(4, 9, dtype=torch.float64)
    x[1] = float("-inf")
    x[2, 3:] = float("-inf")
    for p in (edgemoe_softmax(x), edgemoe_softmax(x, frac_bits=None), exact_softmax(x)):
        assert_close(p[1], torch.zeros(9, dtype=torch.float64), rtol=0, atol=0)
        assert_close(p[2, 3:], torch.zeros(6, dtype=torch.float64), rtol=0, atol=0)
        assert torch.isfinite(p).all()
    # masked logits have no effect at all: same as dropping them
    assert_close(edgemoe_softmax(x[2:3, :3]), edgemoe_softmax(x)[2:3, :3], rtol=0, atol=0)


def test_softmax_large_logits_do_not_overflow():
    x = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [-1e4, -1e4, -1e4 - 30.0], [3e38, 3e38, 0.0]])
    p = edgemoe_softmax(x)
    assert torch.isfinite(p).all()
    assert_close(p[:2], torch.softmax(x[:2].double(), -1).float(), rtol=0, atol=bound(3))
    assert_close(p[2], torch.tensor([0.5, 0.5, 0.0]), rtol=0, atol=0)


def test_softmax_nan_and_posinf_propagate_like_torch():
    x = torch.tensor([[0.0, float("nan"), 1.0], [0.0, float("inf"), 1.0], [0.0, 1.0, 2.0]])
    p = edgemoe_softmax(x)
    assert torch.isnan(p[0]).all() and torch.isnan(p[1]).all()
    assert torch.isfinite(p[2]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_softmax_dtype_kept(dtype):
    x = torch.randn(3, 5, 7).to(dtype)
    p = edgemoe_softmax(x, dim=1)
    assert p.dtype == dtype and p.shape == x.shape
    assert_close(p.double(), torch.softmax(x.double(), dim=1), rtol=0, atol=max(bound(5), 4e-3))


def test_softmax_dim_and_shapes():
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    for dim in (0, 1, 2, -1, -2):
        assert_close(edgemoe_softmax(x, dim=dim), torch.softmax(x, dim=dim), rtol=0, atol=bound(4))
    assert edgemoe_softmax(torch.zeros(0, 5)).shape == (0, 5)
    assert edgemoe_softmax(torch.zeros(3, 0)).shape == (3, 0)
    assert_close(edgemoe_softmax(torch.tensor(2.5)), torch.tensor(1.0), rtol=0, atol=0)


def test_softmax_gradient_is_softmax_jacobian_at_its_output():
    x = _logits("normal")[:8, :50].requires_grad_(True)
    g = torch.randn(8, 50, dtype=torch.float64)
    p = edgemoe_softmax(x)
    (grad,) = torch.autograd.grad((p * g).sum(), x)
    pd = p.detach()
    assert_close(grad, pd * (g - (g * pd).sum(-1, keepdim=True)), rtol=0, atol=1e-15)
    # and close to the exact softmax gradient (measured 3.1e-5 with |g| ~ N(0, 1))
    xe = x.detach().requires_grad_(True)
    (grad_exact,) = torch.autograd.grad((torch.softmax(xe, -1) * g).sum(), xe)
    assert_close(grad, grad_exact, rtol=0, atol=4e-5)


def test_softmax_gradient_no_nan_with_masked_rows():
    x = torch.randn(3, 6, dtype=torch.float64)
    x[0] = float("-inf")
    x[1, ::2] = float("-inf")
    x.requires_grad_(True)
    edgemoe_softmax(x).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[0] == 0).all()


def test_softmax_gradcheck_float_mode():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: edgemoe_softmax(t, frac_bits=None, chunk_size=2), (x,))
    y = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: edgemoe_softmax(t, dim=1, frac_bits=None), (y,))


def test_softmax_bad_input():
    with pytest.raises(TypeError, match="torch.Tensor"):
        edgemoe_softmax([1.0, 2.0])
    with pytest.raises(TypeError, match="int64"):
        edgemoe_softmax(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"dim must be in \[-2, 1\].*got 2"):
        edgemoe_softmax(torch.ones(2, 3), dim=2)
    with pytest.raises(TypeError, match="dim must be an int"):
        edgemoe_softmax(torch.ones(2, 3), dim=1.0)
    for chunk in (0, -3, True, 2.0):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            edgemoe_softmax(torch.ones(2, 3), chunk_size=chunk)
    for frac_bits in (0, 41, "22", True):
        with pytest.raises(ValueError, match="frac_bits must be None"):
            edgemoe_softmax(torch.ones(2, 3), frac_bits=frac_bits)


# --- GELU ---------------------------------------------------------------------------------------

def test_gelu_table_is_the_rounded_delta_table():
    table = gelu_delta_table()
    ref = reference_gelu_table()
    assert len(table) == len(ref) == 177 and GELU_TABLE_MAX == 5.5
    assert_close(table, torch.tensor(ref, dtype=torch.float64) / ONE, rtol=0, atol=0)
    # spot values: T[1], T[24] (the bump's peak near |x| = 0.75) and the last nonzero entries
    assert_close(table[[1, 24, 175, 176]] * ONE, torch.tensor([63902.0, 712908.0, 1.0, 0.0], dtype=torch.float64),
                 rtol=0, atol=0)


def test_gelu_matches_fixed_point_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.empty(3000, dtype=torch.float64).uniform_(-7, 7, generator=g),
                   torch.tensor([0.0, -0.0, 1 / 32, -1 / 32, 5.5, -5.5, 5.5 - U, 20.0, -20.0, U, -U],
                                dtype=torch.float64)])
    ref = torch.tensor(reference_gelu(x.tolist()), dtype=torch.float64)
    assert_close(edgemoe_gelu(x), ref, rtol=0, atol=0)


@pytest.mark.parametrize("frac_bits,atol", [(FRAC_BITS, 1e-4), (None, 1e-4)])
def test_gelu_error_bound(frac_bits, atol):
    x = torch.linspace(-20, 20, 400001, dtype=torch.float64)
    exact = F.gelu(x)
    y = edgemoe_gelu(x, frac_bits=frac_bits)
    assert_close(y, exact, rtol=0, atol=atol)           # measured 9.76e-5 / 9.74e-5
    # the bound is attained near the bump's centre, not an artefact of the range
    assert (y - exact).abs().max() > 9e-5
    # beyond the table it is ReLU, at most 2u from GELU
    far = x.abs() >= GELU_TABLE_MAX
    assert_close(y[far], torch.relu(_on_grid(x[far], frac_bits)), rtol=0, atol=0)
    assert_close(y[far], exact[far], rtol=0, atol=2 * U)


def _on_grid(x, frac_bits):
    return x if frac_bits is None else torch.floor(x * ONE) / ONE


def test_gelu_is_symmetric_like_gelu():
    # GELU(x) - GELU(-x) = x holds exactly for the approximation too (on grid inputs)
    x = torch.arange(-6000, 6001, dtype=torch.float64) / 1024
    assert_close(edgemoe_gelu(x) - edgemoe_gelu(-x), x, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_gelu_dtype_kept(dtype):
    x = (4 * torch.randn(5, 7)).to(dtype)
    y = edgemoe_gelu(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert_close(y.double(), F.gelu(x.double()), rtol=1e-2, atol=1e-4)


def test_gelu_gradient_is_the_interpolants_slope():
    table = gelu_delta_table(None)
    x = torch.tensor([-7.0, -1.01, -0.3, 0.0, 0.2, 0.77, 3.3, 9.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(edgemoe_gelu(x, frac_bits=None).sum(), x)
    a = x.detach().abs()
    i = (a * 32).floor().long().clamp(max=175)
    slope = (table[i + 1] - table[i]) * 32
    expected = torch.where(x.detach() >= 0, 1.0 - slope, slope)
    expected = torch.where(a >= GELU_TABLE_MAX, (x.detach() > 0).double(), expected)
    assert_close(grad, expected, rtol=0, atol=1e-12)
    assert_close(grad[3], torch.tensor(1.0 - 32 * table[1].item(), dtype=torch.float64))  # x = 0: 0.5125
    # close to GELU' (interpolating delta costs at most h * max|delta''| / 2 ~ 1.3e-2 in slope)
    xe = x.detach().requires_grad_(True)
    (grad_exact,) = torch.autograd.grad(F.gelu(xe).sum(), xe)
    assert_close(grad, grad_exact, rtol=0, atol=1.3e-2)
    # fixed-point mode: the same slopes (roundings pass straight through)
    xf = x.detach().requires_grad_(True)
    (grad_fixed,) = torch.autograd.grad(edgemoe_gelu(xf).sum(), xf)
    assert_close(grad_fixed, grad, rtol=0, atol=1e-5)


def test_gelu_gradcheck_float_mode():
    # away from the knots i / 32 (where the slope jumps) and from 0
    x = torch.tensor([-4.01, -0.51, -0.0468, 0.0468, 0.2, 1.4, 2.9, 6.2], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: edgemoe_gelu(t, frac_bits=None), (x,), eps=1e-7)


def test_gelu_non_finite():
    y = edgemoe_gelu(torch.tensor([float("nan"), float("inf"), float("-inf"), 1e30, -1e30]))
    assert torch.isnan(y[0])
    assert_close(y[1:], torch.tensor([float("inf"), 0.0, 1e30, 0.0]), rtol=0, atol=0)


def test_gelu_bad_input():
    with pytest.raises(TypeError, match="torch.Tensor"):
        edgemoe_gelu(1.0)
    with pytest.raises(TypeError, match="int64"):
        edgemoe_gelu(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="frac_bits"):
        edgemoe_gelu(torch.ones(3), frac_bits=-1)


# --- registries, attention --------------------------------------------------------------

def test_registries():
    assert set(ACTIVATIONS) == {"gelu", "gelu_tanh", "gelu_edgemoe"}
    assert set(SOFTMAXES) == {"exact", "edgemoe"}
    x = torch.randn(4, 6, dtype=torch.float64)
    assert_close(ACTIVATIONS["gelu"](x), F.gelu(x), rtol=0, atol=0)
    assert_close(ACTIVATIONS["gelu_tanh"](x), F.gelu(x, approximate="tanh"), rtol=0, atol=0)
    assert_close(ACTIVATIONS["gelu_edgemoe"](x), edgemoe_gelu(x), rtol=0, atol=0)
    assert_close(SOFTMAXES["exact"](x, -1), torch.softmax(x, -1), rtol=0, atol=0)
    assert_close(SOFTMAXES["edgemoe"](x, -1), edgemoe_softmax(x, -1), rtol=0, atol=0)


def test_softmax_attention_matches_reference_attention():
    from attnlab.ops import reference_attention
    q, k, v = (torch.randn(2, 4, 5, 8, dtype=torch.float64) for _ in range(3))
    valid = torch.tensor([[True] * 5, [True, True, False, True, False]])
    for kw in (dict(), dict(is_causal=True), dict(attn_mask=valid), dict(attn_mask=valid, is_causal=True)):
        ref = reference_attention(q, k, v, **kw)
        assert_close(softmax_attention(q, k, v, softmax="exact", **kw), ref, rtol=1e-12, atol=1e-12)
        assert_close(softmax_attention(q, k, v, softmax="edgemoe", **kw), ref, rtol=0, atol=2e-5)
    # a fully masked query row outputs zeros
    none = torch.zeros(2, 5, dtype=torch.bool)
    assert (softmax_attention(q, k, v, attn_mask=none) == 0).all()
    with pytest.raises(ValueError, match=r"'edgemoe', 'exact'"):
        softmax_attention(q, k, v, softmax="fast")
