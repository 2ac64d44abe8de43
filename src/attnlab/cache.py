"""Caches a caller owns and passes to `forward`: `KVCache` (self-attention) and `ContextCache` (cross).

`KVCache`: the keys and values seen so far.

One cache serves one attention layer. It grows in place with amortised doubling (or holds a
fixed `max_len` preallocated), so decoding T tokens costs O(T) copies, not O(T^2).

    cache = attnlab.KVCache()
    for t in range(T):
        y_t = attn(x[:, t:t + 1], is_causal=True, cache=cache)   # same as the full causal forward

`ContextCache`: the keys and values of a FIXED context, for a cross-attention layer
(layout="cross") whose queries change from step to step while the context (an encoder's
output, an image's tokens) does not. The first call projects the context and fills the cache;
later calls reuse it, so each decoding step costs O(N M d) instead of O(M C d) more:

    cache = attnlab.ContextCache()
    for t in range(T):
        y_t = cross(x[:, t:t + 1], context, cache=cache)     # same as cross(x[:, t:t + 1], context)
    cache.reset()                                             # before a new context

The context is still passed on every call: the cache checks that its shape (B, M, C_ctx),
dtype and device are those it was filled with, and raises ValueError otherwise (a new batch or a
new context needs `reset()` first). It does not compare the context's values, which would cost
a read of the context and a device sync on every step: a different context of the same shape
must be announced with `reset()`. One cache serves one layer; a second module handing it its
context raises ValueError.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import Tensor


class KVCache:
    """Keys and values (B, h_kv, T, d) of the tokens already processed by one layer."""

    def __init__(self, max_len: int | None = None):
        if max_len is not None and (not isinstance(max_len, int) or max_len <= 0):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        self.max_len = max_len
        self._k: Tensor | None = None   # (B, h_kv, capacity, d)
        self._v: Tensor | None = None   # (B, h_kv, capacity, dv)
        self.length = 0

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        shape = None if self._k is None else tuple(self._k.shape[:2]) + (self.length,) + tuple(self._k.shape[3:])
        return f"KVCache(length={self.length}, shape={shape}, max_len={self.max_len})"

    @property
    def keys(self) -> Tensor | None:
        return None if self._k is None else self._k[:, :, :self.length]

    @property
    def values(self) -> Tensor | None:
        return None if self._v is None else self._v[:, :, :self.length]

    def reset(self) -> None:
        self._k = self._v = None
        self.length = 0

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (e.g. to roll back a draft)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"crop length must be in [0, {self.length}], got {length}")
        self.length = length

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k (B, h_kv, n, d) and v (B, h_kv, n, dv); return all keys and values so far."""
        if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"KVCache.update expects k (B, h, n, d) and v (B, h, n, dv) with matching "
                             f"(B, h, n), got k {tuple(k.shape)} and v {tuple(v.shape)}")
        B, h, n, _ = k.shape
        if self._k is not None:
            want = (self._k.shape[0], self._k.shape[1], self._k.shape[3], self._v.shape[3])
            got = (B, h, k.shape[3], v.shape[3])
            held = (self._k.dtype, self._v.dtype, self._k.device)
            if want != got or (k.dtype, v.dtype, k.device) != held:
                raise ValueError(f"KVCache holds (B, h, d, dv) = {want}, dtypes {held[0]}/{held[1]} on {held[2]}, "
                                 f"got {got}, dtypes {k.dtype}/{v.dtype} on {k.device}; "
                                 "use one cache per layer and batch")
        needed = self.length + n
        if self.max_len is not None and needed > self.max_len:
            raise ValueError(f"KVCache is full: max_len={self.max_len}, it holds {self.length} and got {n} more")
        if self._k is None or needed > self._k.shape[2]:
            capacity = self.max_len or max(needed, 2 * (0 if self._k is None else self._k.shape[2]), 16)
            new_k = k.new_empty(B, h, capacity, k.shape[3])
            new_v = v.new_empty(B, h, capacity, v.shape[3])
            if self.length:
                new_k[:, :, :self.length] = self._k[:, :, :self.length]
                new_v[:, :, :self.length] = self._v[:, :, :self.length]
            self._k, self._v = new_k, new_v
        # Written without autograd history: a cache is for inference. Gradients through the
        # cached past are not supported (use a full forward for training).
        with torch.no_grad():
            self._k[:, :, self.length:needed] = k
            self._v[:, :, self.length:needed] = v
        self.length = needed
        keys, values = self.keys, self.values
        if k.requires_grad or v.requires_grad:
            # Keep the gradient path for the new tokens (the past is constant).
            keys = torch.cat([keys[:, :, :needed - n], k], dim=2)
            values = torch.cat([values[:, :, :needed - n], v], dim=2)
        return keys, values


class ContextCache:
    """The keys and values of one fixed context, computed once by one cross-attention layer.

    `fetch(context, project, owner=module)`: on the first call `project(context)` runs and its
    tensors (typically k, v of shape (B, h_kv, M, d)) are kept; on later calls they are returned
    without running `project`, after checking that `context` has the shape, dtype and device of
    the one the cache was filled with. Gradients reach the context and the projection weights on
    the call that fills the cache only (later calls return the kept tensors, detached): a cache
    is for inference, as with `KVCache`.
    """

    def __init__(self):
        self._tensors: tuple[Tensor, ...] | None = None
        self._context: tuple | None = None       # (shape, dtype, device) of the context it holds
        self._owner: weakref.ref | None = None

    @property
    def full(self) -> bool:
        return self._tensors is not None

    def __len__(self) -> int:
        """Context tokens M held (0 when empty)."""
        return 0 if self._context is None else self._context[0][1]

    def __repr__(self) -> str:
        if self._context is None:
            return "ContextCache(empty)"
        shape, dtype, device = self._context
        return f"ContextCache(context={shape}, dtype={dtype}, device={device})"

    @property
    def keys(self) -> Tensor | None:
        return None if self._tensors is None else self._tensors[0]

    @property
    def values(self) -> Tensor | None:
        return None if self._tensors is None else self._tensors[1]

    def reset(self) -> None:
        """Forget the context (and the layer it was filled by): the next call fills it again."""
        self._tensors = self._context = self._owner = None

    def update(self, k: Tensor, v: Tensor):
        """Sequence decoding appends keys and values to a `KVCache`; a ContextCache holds one fixed
        context of a cross-attention layer. Passing it to a sequence layer ends here, clearly."""
        raise TypeError("a ContextCache holds the fixed context of a cross-attention layer (layout 'cross'); "
                        "incremental decoding of a sequence layer takes an attnlab.KVCache")

    def fetch(self, context: Tensor, project: Callable[[Tensor], tuple[Tensor, ...]], *,
              owner: object | None = None) -> tuple[Tensor, ...]:
        """`project(context)`, computed on the first call and kept for the later ones."""
        if not isinstance(context, Tensor):
            raise TypeError(f"ContextCache.fetch expects the context as a torch.Tensor, got {type(context).__name__}")
        held = (tuple(context.shape), context.dtype, context.device)
        if self._tensors is not None:
            if owner is not None and self._owner is not None and self._owner() is not owner:
                raise ValueError("ContextCache was filled by another layer; use one cache per layer "
                                 "(or cache.reset() first)")
            if held != self._context:
                shape, dtype, device = self._context
                raise ValueError(f"ContextCache holds a context of shape {shape}, {dtype} on {device}, "
                                 f"got {held[0]}, {held[1]} on {held[2]}; call cache.reset() before a new "
                                 "context or batch")
            return self._tensors
        tensors = tuple(project(context))
        # Kept without autograd history (a cache is for inference); this call keeps its graph.
        self._tensors = tuple(t.detach() for t in tensors)
        self._context = held
        self._owner = None if owner is None else weakref.ref(owner)
        return tensors
