"""Functional attention kernels in the SDPA layout (B, h, N, d)."""
from attnlab.ops._dispatch import BackendUnavailable, default_backend, use_backend
from attnlab.ops.neighborhood import neighborhood_attention
from attnlab.ops.numerics import (ACTIVATIONS, SOFTMAXES, edgemoe_gelu, edgemoe_softmax,
                                  exact_softmax, softmax_attention)
from attnlab.ops.reference import reference_attention
from attnlab.ops.sdpa import attention, check_qkv

__all__ = ["attention", "use_backend", "default_backend", "reference_attention", "BackendUnavailable",
           "check_qkv", "edgemoe_softmax", "edgemoe_gelu", "exact_softmax", "softmax_attention",
           "ACTIVATIONS", "SOFTMAXES", "neighborhood_attention"]
