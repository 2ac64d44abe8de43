"""Functional attention kernels in the SDPA layout (B, h, N, d)."""
from attnlab.ops.attention import BackendUnavailable, attention, default_backend, use_backend
from attnlab.ops.reference import reference_attention

__all__ = ["attention", "use_backend", "default_backend", "reference_attention", "BackendUnavailable"]
