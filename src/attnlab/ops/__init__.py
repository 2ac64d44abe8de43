"""Functional attention kernels in the SDPA layout (B, h, N, d)."""
import sys

from attnlab.ops import sdpa
from attnlab.ops.neighborhood import neighborhood_attention
from attnlab.ops.numerics import (ACTIVATIONS, SOFTMAXES, bench_numerics, edgemoe_gelu, edgemoe_softmax,
                                  exact_softmax, softmax_attention)
from attnlab.ops.reference import reference_attention
from attnlab.ops.sdpa import BackendUnavailable, attention, check_qkv, default_backend, use_backend

# `attnlab.ops.attention` is the function. The module that defines it is `attnlab.ops.sdpa`;
# the old module path stays importable (`from attnlab.ops.attention import attention`, as some
# mechanisms still write) through sys.modules, which leaves the attribute above the function.
sys.modules.setdefault(__name__ + ".attention", sdpa)

__all__ = ["attention", "use_backend", "default_backend", "reference_attention", "BackendUnavailable",
           "check_qkv", "edgemoe_softmax", "edgemoe_gelu", "exact_softmax", "softmax_attention",
           "bench_numerics", "ACTIVATIONS", "SOFTMAXES", "neighborhood_attention"]
