"""Checks shared by every mechanism (constructor arguments, the forward call's inputs) and by the configs."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def shape_text(t: Tensor) -> str:
    """A tensor's shape as the error messages write it: (2, 4, 16, 8)."""
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_dims(name: str, dim: int, num_heads: int) -> int:
    """Validate width and heads; return the head dim."""
    for arg, value in (("dim", dim), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")
    if dim % num_heads:
        raise ValueError(f"{name}: dim ({dim}) must be divisible by num_heads ({num_heads})")
    return dim // num_heads


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_dropout(name: str, **probs) -> None:
    """Each keyword (attn_drop=..., proj_drop=...) must be a probability in [0, 1).

    One message for every mechanism: "<name>: <arg> must be a number in [0, 1), got <value>".
    """
    for arg, p in probs.items():
        if not _is_number(p) or not 0.0 <= p < 1.0:
            raise ValueError(f"{name}: {arg} must be a number in [0, 1), got {p!r}")


def check_positive(name: str, arg: str, value) -> float:
    """`value` must be a finite number > 0; returned as a float."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: {arg} must be a finite number > 0, got {value!r}")
    return float(value)


def check_int(arg: str, value, low: int) -> int:
    """A config field that must be an int (not a bool) >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
    return value


def check_number(arg: str, value, low: float, *, strict: bool = False, high: float | None = None) -> float:
    """A config field that must be a finite number >= low (> low with strict), <= high if given."""
    ok = _is_number(value) and math.isfinite(value) and (value > low if strict else value >= low) \
        and (high is None or value <= high)
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{arg} must be a finite number {bound}" + (f" and <= {high}" if high is not None else "")
                         + f", got {value!r}")
    return value


def check_tokens(name: str, x: Tensor, dim: int, *, what: str = "x", length: str = "N") -> None:
    """`what` must be (B, N, C) floating point with C == dim (`length` names the token axis)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected {what} as a torch.Tensor (B, {length}, C), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name}: expected {what} of shape (B, {length}, C={dim}), got {tuple(x.shape)} ({x.dim()}-D)")
    if x.shape[-1] != dim:
        raise ValueError(f"{name}: expected {what} of width C={dim}, got {x.shape[-1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected floating point {what}, got {x.dtype}")


def check_finite(name: str, x: Tensor, *, what: str = "x") -> None:
    """`what` must hold no NaN or infinite value (one host sync). Models with BatchNorm call it: in training
    a single bad input would otherwise poison the running statistics, and every later output, silently."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name}: {what} has {bad} NaN or infinite value(s) of {x.numel()} "
                         f"(shape {tuple(x.shape)}); fill or drop them first")


def check_context(name: str, x: Tensor, context: Tensor, dim: int, context_dim: int) -> None:
    """The cross layout's inputs: queries x (B, N, dim) and a context (B, M, context_dim), both
    floating point, with one batch size and one dtype."""
    check_tokens(name, x, dim)
    check_tokens(name, context, context_dim, what="context", length="M")
    if context.shape[0] != x.shape[0]:
        raise ValueError(f"{name}: x and context must share the batch size, got x {shape_text(x)} "
                         f"and context {shape_text(context)}")
    if context.dtype != x.dtype or context.device != x.device:
        raise TypeError(f"{name}: x and context must share dtype and device, got x {x.dtype} on {x.device} "
                        f"and context {context.dtype} on {context.device}")


def check_positive_int(name: str, arg: str, value, *, allow_zero: bool = False) -> int:
    """A constructor option that must be an int (not a bool) > 0 (>= 0 with allow_zero)."""
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "a non-negative int" if allow_zero else "a positive int"
        raise ValueError(f"{name}: {arg} must be {what}, got {value!r}")
    return value


def check_image(name: str, x: Tensor, dim: int | None, *, what: str = "x") -> None:
    """`what` must be (B, H, W, C) floating point (channels-last), with C == dim unless dim is None."""
    width = "C" if dim is None else f"C={dim}"
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected {what} as a torch.Tensor (B, H, W, {width}), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected {what} of shape (B, H, W, {width}) (channels-last), "
                         f"got {tuple(x.shape)} ({x.dim()}-D)")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name}: expected {what} of width C={dim} in the last dim (channels-last), "
                         f"got {x.shape[-1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected floating point {what}, got {x.dtype}")


def check_features(module, *, attn_mask=None, is_causal: bool = False, cache=None) -> None:
    """Raise NotImplementedError for a feature the module's spec does not claim."""
    spec = type(module).spec
    asked = (("attn_mask", attn_mask is not None), ("causal", bool(is_causal)), ("kv_cache", cache is not None))
    for feature, used in asked:
        if used and not getattr(spec, feature):
            raise NotImplementedError(f"mechanism {spec.name!r} does not support {feature}")
