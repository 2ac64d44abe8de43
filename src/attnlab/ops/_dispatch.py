"""One backend table and one `use_backend` for every op in `attnlab.ops`.

`BACKENDS` names every backend, says what it is and which ops it serves; its order is the
default priority, and an op's priority is that order restricted to the backends serving it
(an op may drop some from its automatic pick, e.g. `neighborhood_attention` skips `flex` on
CPU, where the blocked kernel is faster). Each op keeps its own implementations, keyed by these
names, and asks `choose` which one runs a call:

- `backend=` given: only that backend; it never falls back. A name no op knows, or one that
  does not serve this op, is a ValueError; one that cannot run the call is BackendUnavailable
  with its reasons.
- otherwise the default of `use_backend(name)` (innermost block wins) or, outside any block,
  the ATTNLAB_BACKEND environment variable (empty = unset). It is treated like `backend=`
  (no fallback) by every op it serves. An op it does not serve (`use_backend("blocked")` and
  `attention`, `use_backend("sdpa")` and `neighborhood_attention`) uses its own priority and
  says so at DEBUG.
- no default: the first backend in the op's priority that can run the call; the skipped ones
  and why are logged at DEBUG. When none can, BackendUnavailable lists every reason.

The FlexAttention helpers live here because the `flex` backend of every op shares them.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

__all__ = ["Backend", "BACKENDS", "BackendUnavailable", "use_backend", "default_backend", "serving",
           "check_backend", "choose", "implementations", "no_reasons", "flex_module", "flex_function",
           "flex_reasons"]

log = logging.getLogger("attnlab.ops")


@dataclass(frozen=True)
class Backend:
    name: str
    summary: str
    ops: tuple[str, ...]          # the ops (functions of attnlab.ops) that have this backend


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("sdpa", "torch.nn.functional.scaled_dot_product_attention (torch's fused kernels)",
            ("attention",)),
    Backend("flex", "FlexAttention (torch.nn.attention.flex_attention): compiled on GPU, eager and "
                    "forward-only on CPU", ("attention", "neighborhood_attention")),
    Backend("blocked", "attnlab's tiled neighborhood kernels, with backward: the fused C++ kernel on CPU, "
                       "else chunked PyTorch", ("neighborhood_attention",)),
    Backend("reference", "the naive eager oracles (dense masks, O(N^2) memory, float64-friendly)",
            ("attention", "neighborhood_attention")),
)}


class BackendUnavailable(RuntimeError):
    """No backend (or not the requested one) can run this call; the message says why."""


def serving(op: str) -> tuple[str, ...]:
    """The backends of `op`, in priority order."""
    return tuple(name for name, b in BACKENDS.items() if op in b.ops)


_default: contextvars.ContextVar[str | None] = contextvars.ContextVar("attnlab_backend", default=None)


def _known(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}unknown backend {name!r}; expected one of {tuple(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Within the block, ops called with `backend=None` use `name` where they have it
    (None restores the automatic pick). Any name of `BACKENDS` is accepted."""
    if name is not None:
        _known(name, "")
    token = _default.set(name)
    try:
        yield
    finally:
        _default.reset(token)


def default_backend() -> str | None:
    """The default set by `use_backend`, else ATTNLAB_BACKEND, else None (automatic)."""
    name = _default.get()
    if name is None:
        name = os.environ.get("ATTNLAB_BACKEND") or None
        if name is not None and name not in BACKENDS:
            raise ValueError(f"ATTNLAB_BACKEND={name!r} is not a backend; expected one of {tuple(BACKENDS)}")
    return name


def implementations(op: str, table: dict[str, tuple[Callable, Callable]]) -> dict[str, tuple[Callable, Callable]]:
    """An op's {backend: (reasons it cannot run a call, run it)}, checked against the backend
    table at import, so that a backend added on one side only fails loudly."""
    if set(table) != set(serving(op)):
        raise ImportError(f"{op} implements {sorted(table)} but the backend table says {serving(op)}")
    return table


def no_reasons(*args) -> list[str]:
    """The reasons of a backend that runs every call its op accepts: none."""
    return []


def check_backend(op: str, backend: str | None) -> None:
    """ValueError unless `backend` is None or a backend that serves `op`."""
    if backend is None:
        return
    _known(backend, f"{op}: ")
    if op not in BACKENDS[backend].ops:
        raise ValueError(f"{op}: backend {backend!r} does not serve {op}; expected one of {serving(op)}")


def choose(op: str, backend: str | None, priority: Sequence[str],
           reasons: Callable[[str], list[str]]) -> str:
    """The backend that runs this call of `op` (see the module docstring).

    `priority`: the op's automatic order for this call; `reasons(name)`: why that backend
    cannot run the call ([] when it can).
    """
    check_backend(op, backend)
    requested = backend
    if requested is None:
        default = default_backend()
        if default is not None and op in BACKENDS[default].ops:
            requested = default
        elif default is not None:
            log.debug("%s: the default backend %r does not serve it; picking from %s", op, default,
                      tuple(priority))
    found: dict[str, list[str]] = {}
    for name in (requested,) if requested is not None else priority:
        why = reasons(name)
        if not why:
            return name
        found[name] = why
        log.debug("%s: skipping backend %s: %s", op, name, "; ".join(why))
    detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in found.items())
    if requested is not None:
        raise BackendUnavailable(f"{op}: backend {requested!r} cannot run this call ({detail})")
    raise BackendUnavailable(f"{op}: no backend can run this call ({detail})")


# --- FlexAttention, shared by the flex backend of every op ---------------------------------------

def flex_module():
    """torch.nn.attention.flex_attention, or None where this torch lacks it."""
    try:
        from torch.nn.attention import flex_attention as fa   # optional: torch >= 2.5
    except ImportError:  # pragma: no cover - torch < 2.5
        return None
    return fa


def flex_reasons(q, k, v, dropout_p: float = 0.0) -> list[str]:
    """Why the flex backend cannot run these inputs ([] when it can), for every op."""
    reasons = []
    if flex_module() is None:
        reasons.append("torch.nn.attention.flex_attention is not available in this torch")
    if dropout_p > 0.0:
        reasons.append("FlexAttention has no attention dropout")
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        reasons.append("FlexAttention has no backward on CPU (inputs require grad)")
    if q.shape[-1] != v.shape[-1]:
        reasons.append("FlexAttention here needs the same head dim for q/k and v")
    return reasons


_compiled_flex: dict[str, Callable] = {}


def flex_function(device_type: str) -> Callable:
    """flex_attention for a device: eager on CPU (forward only there), compiled once elsewhere,
    since FlexAttention is only fast compiled."""
    fa = flex_module()
    if device_type == "cpu":
        return fa.flex_attention
    if device_type not in _compiled_flex:
        _compiled_flex[device_type] = torch.compile(fa.flex_attention, dynamic=False)
    return _compiled_flex[device_type]
