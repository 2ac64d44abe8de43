"""Edge-MoE numerics: the single-pass softmax and the ReLU-minus-lookup GELU.

Paper: Edge-MoE: Memory-Efficient Multi-Task Vision Transformer Architecture with Task-level
Sparsity via Mixture-of-Experts (Sarkar, Liang, Fan, Wang, Hao; ICCAD 2023, arXiv 2305.18691).
Official code: github.com/sharc-lab/Edge-MoE (HLS C++; `src/attention.cpp` `finalize_attn` and
`compute_attn_matmul_v`, `src/moe.cpp` `update_softmax_info`, `src/gelu.cpp`). The arithmetic
below was read from that code; nothing of it is copied here (the GELU table is recomputed from
its defining formula).
Status: both approximations implemented, vectorised, with the accelerator's fixed-point
precision emulated by default (`frac_bits=22`) and a plain floating-point mode (`frac_bits=None`).

Single-pass softmax (`edgemoe_softmax`)
---------------------------------------
Algorithm (the paper's contribution (2)). Each row keeps a running bias b (the largest logit
seen so far) and a running sum S = sum_j exp(x_j - b); both are updated as each logit streams
in, so the normaliser is known after ONE pass over the row instead of max-pass + sum-pass:

    b = -inf, S = 0
    for x in row:                          # one key per step
        if x > b:  S = S * exp(b - x) + 1;  b = x       # new bias: rescale the old sum
        else:      S = S + exp(x - b)
    p_j = exp(x_j - b) * (1 / S)           # the output pass (fused with attn @ V in hardware)

Every exp argument is <= 0, so exp never overflows and lies in (0, 1]: that is what lets the
FPGA compute it in a 32-bit fixed-point type. In exact arithmetic the result IS softmax (the
same recurrence as the online normaliser of Milakov & Gimelshein, 2018); what makes it an
approximation is the precision it is computed in.

Hardware arithmetic (emulated with `frac_bits=22`, the default). The accelerator's feature-map
type is `ap_fixed<32, 10>`: 22 fractional bits, truncation toward -inf (Vivado's default
AP_TRN). With u = 2**-22 and q(t) = floor(t / u) * u, every stored value is rounded by q:
the logits, each exp(.) output, the rescaled sum S * exp(b - x), the reciprocal 1 / S and the
product p. So exp(t) < u flushes to 0 (logits more than ~15.2 below the max contribute
nothing), and the probabilities sit on a 2**-22 grid. Emulated exactly in float64: values on
that grid below 2**31 add and multiply without rounding error.

Worst-case error (derived; the tests measure it): for a row of M logits,
    |p_hat - softmax(x)| <= (2 M + 6) u,   and the same for |sum_j p_hat_j - 1|   (u = 2**-22)
because each of the M stored exps and each of the at most M rescales loses < u of S >= 1, and
the logit, exp, reciprocal and product roundings cost < u each (in units of p <= 1). It is
nearly attained when M - 1 logits sit just above ln(2 u) below the max (each exp loses ~u);
typical rows are far below it (tests/ops/test_numerics.py lists the measured numbers, e.g.
1.4e-5 for 197 N(0, 3^2) logits, 3.5e-7 for logits uniform in [-1e4, 1e4]).

Not emulated (hardware limits, not the algorithm): the 10 integer bits of ap_fixed<32, 10>
(range [-512, 512), wrap-around on overflow), so logits outside it and rows whose sum S would
reach 512 (M > 511 equal logits) are computed correctly here where the FPGA would wrap; the
FPGA's exact `hls::exp`/`hls::recip` are modelled as correctly truncated to the grid; the
initial bias is -inf here, the most negative fixed-point value (-512) there.

Torch layout. `chunk_size` keys are consumed per step (1 = the hardware: one key per cycle
per (query, head) lane). With chunk_size c > 1 each step takes the chunk's max m, sets
b' = max(b, m), S' = q(S * q(exp(b - b'))) + sum_chunk q(exp(x - b')): the same recurrence
with c exp lanes, which only changes where the rescale truncations fall (differences < M u).
The Python loop runs ceil(M / c) steps of vectorised work over all rows.

Gradient. Supported. `edgemoe_softmax` is a custom autograd function whose backward is the
softmax Jacobian at the produced probabilities, dx = p * (g - sum(g * p)). In exact arithmetic
the paper's formula is softmax, so this is its derivative; the roundings (piecewise constant,
derivative 0 almost everywhere) are passed straight through. With `frac_bits=None` forward and
backward are softmax to float rounding and `torch.autograd.gradcheck` passes in float64.

GELU (`edgemoe_gelu`)
---------------------
Algorithm (contribution (3)). GELU(x) = x Phi(x) differs from ReLU(x) by
delta(|x|) = |x| Phi(-|x|) on both sides (ReLU(x) - GELU(x) = |x| Phi(-|x|) for x of either
sign), an even bump that is < u past |x| = 5.5. So

    GELU(x) ~ ReLU(x) - lerp(T, |x| / h),   T[i] = q_round(i h Phi(-i h)),  h = 1/32,

with a 177-entry table T over [0, 5.5] (T[176] = 0) and ReLU(x) exactly beyond 5.5. The
official table's entries are i h Phi(-i h) rounded to nearest on the 2**-22 grid (checked
against its first entries and its tail); we recompute them at import. In fixed-point mode the
input is truncated to the grid and the interpolated delta truncated (AP_TRN) as in hardware;
with `frac_bits=None` the table holds exact delta values and nothing is rounded.

Error (measured over [-20, 20] in the tests): linear interpolation of delta with step h costs
at most max|delta''| h^2 / 8 = 2 phi(0) / 8 / 1024 ~ 9.7e-5, near x = 0; the grid adds < 3u.
Symmetry is exact: edgemoe_gelu(x) - edgemoe_gelu(-x) = x, as for GELU (for inputs on the
grid in fixed-point mode; off it, the input truncation toward -inf costs < u).

Gradient. Autograd runs through the interpolation: the gradient is the derivative of the
piecewise-linear approximation (1[x >= 0] - sign(x) * table slope), not GELU'. At x = 0 it
takes the right-hand value 1 - 32 T[1] ~ 0.5125 (GELU'(0) = 0.5). Roundings pass straight
through; `gradcheck` holds with `frac_bits=None` away from the knots i / 32.

Deviations: (1) no reference text of the paper's Section on the softmax was available here
beyond the abstract, so "approximation" is read as the fixed-point evaluation of the exact
single-pass recurrence, as the official code does it; we found no exp2/power-of-two
approximation of exp in that code (it calls `hls::exp` on the fixed-point type), so none is
used. (2) integer range and wrap-around are not emulated (see above).

Speed: `attnlab bench --numerics` times exact vs approximate softmax/GELU (`attnlab.bench.numerics`).
On a CPU the approximations are slower than torch's fused kernels; their speed and resource
savings are FPGA properties (no max pass, no floating-point exp/erf units).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnlab.masks import prepare_mask
from attnlab.ops.heads import expand_kv
from attnlab.ops.sdpa import check_qkv

FRAC_BITS = 22                      # ap_fixed<32, 10>: 22 fractional bits
GELU_STEP = 1.0 / 32                # the table's spacing h
GELU_TABLE_SIZE = 177               # indices 0..176 cover [0, 5.5]; T[176] rounds to 0
GELU_TABLE_MAX = GELU_STEP * (GELU_TABLE_SIZE - 1)   # 5.5: beyond it GELU == ReLU (to < 2**-22)


# --- validation --------------------------------------------------------------------------------

def _check_input(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected x as a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating point tensor, got {x.dtype}")


def _check_frac_bits(name: str, frac_bits) -> None:
    if frac_bits is None:
        return
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 1 <= frac_bits <= 40:
        # float64 emulates a fixed-point grid exactly while grid values stay below 2**53.
        raise ValueError(f"{name}: frac_bits must be None (float arithmetic) or an int in [1, 40], "
                         f"got {frac_bits!r}")


def _compute_dtype(x: Tensor, frac_bits) -> torch.dtype:
    # Fixed-point emulation runs in float64, where grid values add and multiply exactly.
    if frac_bits is not None or x.dtype == torch.float64:
        return torch.float64
    return torch.float32


def _truncate(t: Tensor, frac_bits) -> Tensor:
    """q(t): round toward -inf onto the 2**-frac_bits grid (ap_fixed AP_TRN); identity for None."""
    if frac_bits is None:
        return t
    scale = float(2 ** frac_bits)
    return torch.floor(t * scale) / scale


# --- softmax -----------------------------------------------------------------------------------

def _edgemoe_softmax_rows(x: Tensor, chunk_size: int, frac_bits) -> Tensor:
    """The paper's arithmetic on rows: x (R, M) in the compute dtype -> probabilities (R, M)."""
    q = lambda t: _truncate(t, frac_bits)  # noqa: E731
    R, M = x.shape
    x = q(x)                                                    # logits are fixed-point values
    bias = x.new_full((R,), float("-inf"))                      # running max b
    total = x.new_zeros(R)                                      # running sum S
    for start in range(0, M, chunk_size):
        chunk = x[:, start:start + chunk_size]                  # (R, c)
        new_bias = torch.maximum(bias, chunk.amax(dim=-1))      # (R,)
        # Rows that have seen only -inf keep S = 0; exp against 0 keeps it that way without NaN.
        safe = torch.where(new_bias == float("-inf"), torch.zeros_like(new_bias), new_bias)
        rescale = q(torch.exp(bias - safe))                     # exp(b - b') <= 1; 1 when b' == b
        lanes = q(torch.exp(chunk - safe[:, None]))             # (R, c), each in [0, 1]
        total = q(total * rescale) + lanes.sum(dim=-1)
        bias = new_bias
    safe = torch.where(bias == float("-inf"), torch.zeros_like(bias), bias)
    recip = torch.where(total == 0, torch.zeros_like(total),   # all -inf row -> zeros
                        q(1.0 / total.clamp_min(torch.finfo(total.dtype).tiny)))  # NaN stays NaN
    return q(q(torch.exp(x - safe[:, None])) * recip[:, None])  # (R, M)


class _EdgeMoESoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, dim: int, chunk_size: int, frac_bits):
        compute = _compute_dtype(x, frac_bits)
        moved = x.detach().to(compute).movedim(dim, -1)         # (..., M)
        shape = moved.shape
        if moved.numel() == 0:
            probs = moved.new_zeros(shape)
        else:
            rows = moved.reshape(-1, shape[-1])                 # (R, M)
            probs = _edgemoe_softmax_rows(rows, chunk_size, frac_bits).reshape(shape)
        probs = probs.movedim(-1, dim)
        ctx.dim = dim
        ctx.save_for_backward(probs)
        return probs.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        (probs,) = ctx.saved_tensors
        g = grad_out.to(probs.dtype)
        grad_x = probs * (g - (g * probs).sum(dim=ctx.dim, keepdim=True))   # softmax Jacobian
        return grad_x.to(grad_out.dtype), None, None, None


def edgemoe_softmax(x: Tensor, dim: int = -1, *, chunk_size: int = 1, frac_bits: int | None = FRAC_BITS) -> Tensor:
    """Edge-MoE single-pass softmax of `x` along `dim` (see the module docstring).

    Output has x's dtype. Arithmetic: float64 when emulating fixed point (`frac_bits`, default
    22 as in the paper's hardware), else float32 (float64 for float64 input). A slice of only
    -inf gives zeros; +inf or NaN give NaN, like torch.softmax.

    Equivalent PyTorch (frac_bits=None, up to rounding):
        p = torch.softmax(x.float(), dim).to(x.dtype)
    """
    _check_input("edgemoe_softmax", x)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"edgemoe_softmax: dim must be an int, got {type(dim).__name__}")
    n = max(x.dim(), 1)
    if not -n <= dim < n:
        raise ValueError(f"edgemoe_softmax: dim must be in [{-n}, {n - 1}] for a {x.dim()}-D tensor, got {dim}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"edgemoe_softmax: chunk_size must be a positive int, got {chunk_size!r}")
    _check_frac_bits("edgemoe_softmax", frac_bits)
    if x.dim() == 0:
        x1 = x.reshape(1)
        return _EdgeMoESoftmax.apply(x1, 0, chunk_size, frac_bits).reshape(())
    return _EdgeMoESoftmax.apply(x, dim % x.dim(), chunk_size, frac_bits)


def exact_softmax(x: Tensor, dim: int = -1) -> Tensor:
    """torch.softmax in float32 (float64 for float64 input), cast back; an all -inf slice -> zeros."""
    _check_input("exact_softmax", x)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    has_key = (xc != float("-inf")).any(dim=dim, keepdim=True)
    probs = torch.softmax(xc.masked_fill(~has_key, 0.0), dim=dim) * has_key
    return probs.to(x.dtype)


# --- GELU --------------------------------------------------------------------------------------

def _gelu_delta(a: float) -> float:
    """ReLU(x) - GELU(x) at |x| = a: a * Phi(-a)."""
    return a * 0.5 * math.erfc(a / math.sqrt(2.0))


def gelu_delta_table(frac_bits: int | None = FRAC_BITS) -> Tensor:
    """The lookup table T[i] = delta(i / 32), i = 0..176, rounded to nearest on the 2**-frac_bits
    grid (as the official table is), float64. With frac_bits=None, the exact values."""
    _check_frac_bits("gelu_delta_table", frac_bits)
    values = [_gelu_delta(i * GELU_STEP) for i in range(GELU_TABLE_SIZE)]
    if frac_bits is not None:
        values = [round(v * 2 ** frac_bits) / 2 ** frac_bits for v in values]
    return torch.tensor(values, dtype=torch.float64)


_TABLES: dict[tuple, Tensor] = {}


def _table(frac_bits, dtype, device) -> Tensor:
    key = (frac_bits, dtype, str(device))
    if key not in _TABLES:
        _TABLES[key] = gelu_delta_table(frac_bits).to(dtype=dtype, device=device)
    return _TABLES[key]


def _straight_through(t: Tensor, frac_bits) -> Tensor:
    """q(t) in the forward, identity in the backward."""
    if frac_bits is None:
        return t
    d = t.detach()
    return t + (_truncate(d, frac_bits) - d).nan_to_num(0.0)    # +-inf - +-inf: keep t


def edgemoe_gelu(x: Tensor, *, frac_bits: int | None = FRAC_BITS) -> Tensor:
    """Edge-MoE GELU: ReLU(x) minus a linearly interpolated 177-entry table of ReLU - GELU.

    Elementwise, output in x's dtype (float64 arithmetic when emulating fixed point, float32
    otherwise, float64 for float64 input). Differentiable (see the module docstring).

    Equivalent PyTorch (the function approximated; max abs difference ~1e-4):
        y = torch.nn.functional.gelu(x)
    """
    _check_input("edgemoe_gelu", x)
    _check_frac_bits("edgemoe_gelu", frac_bits)
    xc = _straight_through(x.to(_compute_dtype(x, frac_bits)), frac_bits)
    table = _table(frac_bits, xc.dtype, xc.device)                  # (177,)
    positive = xc >= 0
    a = torch.where(positive, xc, -xc)                              # |x|, with d|x|/dx = +1 at 0
    relu = torch.where(positive, xc, torch.zeros_like(xc))
    u = a / GELU_STEP                                               # fractional table index
    index = u.detach().nan_to_num(0.0).floor().clamp(max=GELU_TABLE_SIZE - 2).long()
    t = u - index                                                   # in [0, 1) inside the table
    lo, hi = table[index], table[index + 1]
    delta = _straight_through(lo + t * (hi - lo), frac_bits)
    out = torch.where(a >= GELU_TABLE_MAX, relu, relu - delta)
    out = torch.where(torch.isnan(xc), xc, out)                     # NaN stays NaN
    return out.to(x.dtype)


def exact_gelu(x: Tensor) -> Tensor:
    """GELU with the erf formula (torch.nn.functional.gelu)."""
    return F.gelu(x)


def tanh_gelu(x: Tensor) -> Tensor:
    """GELU with the tanh approximation of Hendrycks & Gimpel (torch approximate='tanh')."""
    return F.gelu(x, approximate="tanh")


# Names used by mhsa (`softmax=`) and by models.Block (`act=`, `softmax=`).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": exact_gelu,
    "gelu_tanh": tanh_gelu,
    "gelu_edgemoe": edgemoe_gelu,
}
SOFTMAXES: dict[str, Callable[..., Tensor]] = {
    "exact": exact_softmax,
    "edgemoe": edgemoe_softmax,
}


# --- eager attention with a chosen softmax -----------------------------------------------------

def softmax_attention(q: Tensor, k: Tensor, v: Tensor, *, softmax: str = "edgemoe",
                      attn_mask: Tensor | None = None, is_causal: bool = False,
                      scale: float | None = None, dropout_p: float = 0.0,
                      scores_hook: Callable[[Tensor], Tensor] | None = None,
                      probs_hook: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Eager attention with the softmax named in SOFTMAXES; attnlab's mask conventions.

    q (B, h, N, d), k (B, h_kv, M, d), v (B, h_kv, M, dv), h % h_kv == 0 -> (B, h, N, dv) in q's
    dtype. Scores and probabilities in float32 (float64 for float64 input); a query row with
    no allowed key outputs zeros. `scores_hook` / `probs_hook` see, and may replace, the softmax
    input (B, h, N, M) and its output before dropout.

    Equivalent PyTorch:
        scores = q @ k.transpose(-2, -1) * scale + mask      # (B, h, N, M)
        out = SOFTMAXES[softmax](scores, -1) @ v             # empty rows -> 0
    """
    if softmax not in SOFTMAXES:
        raise ValueError(f"softmax_attention: unknown softmax {softmax!r}; expected one of {sorted(SOFTMAXES)}")
    check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"softmax_attention: dropout_p must be in [0, 1), got {dropout_p}")
    B, h, N, d = q.shape
    M = k.shape[-2]
    k, v = expand_kv(k, v, h)  # grouped-query attention: (B, h_kv, M, .) -> (B, h, M, .)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    prepared = prepare_mask(attn_mask, B=B, h=h, N=N, M=M, is_causal=is_causal, dtype=compute, device=q.device)
    scores = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * scale     # (B, h, N, M)
    mask = prepared.mask
    if prepared.is_causal:  # N == M and no other mask
        mask = torch.ones(N, M, dtype=torch.bool, device=q.device).tril()[None, None]
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask
    if scores_hook is not None:
        scores = scores_hook(scores)
    probs = SOFTMAXES[softmax](scores, -1)                                  # (B, h, N, M)
    if prepared.row_valid is not None:
        probs = probs.masked_fill(~prepared.row_valid, 0.0)
    if probs_hook is not None:
        probs = probs_hook(probs)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = probs @ v.to(compute)                                             # (B, h, N, dv)
    return out.to(q.dtype)


__all__ = ["edgemoe_softmax", "exact_softmax", "edgemoe_gelu", "exact_gelu", "tanh_gelu",
           "gelu_delta_table", "softmax_attention", "ACTIVATIONS", "SOFTMAXES",
           "FRAC_BITS"]
