"""Generalized Neighborhood Attention over 1 to 3 spatial axes, laid out like NATTEN.

- `api`: `neighborhood_attention(q, k, v, kernel_size, dilation, stride, is_causal, ...)` and
  its backend dispatch (flex, blocked, reference).
- `rules`: argument checks, the window rules, the reference mask, `neighborhood_pairs`.
- `flex`: the FlexAttention backend (block mask, token tiling).
- `chunked`: the blocked backend's PyTorch kernels (tiles, thread pool, autograd Function)
  and its tuning knobs, `BlockedConfig`.
- `fused`: the blocked backend's C++ CPU kernel (`csrc/na_cpu.cpp`), built on first use.
This module only re-exports.
"""
from attnlab.ops.neighborhood.api import NA_BACKENDS, neighborhood_attention
from attnlab.ops.neighborhood.chunked import BlockedConfig
from attnlab.ops.neighborhood.flex import flex_tile, tile_tokens, untile_tokens
from attnlab.ops.neighborhood.rules import (axis_windows, neighborhood_args, neighborhood_mask_mod,
                                            neighborhood_options, neighborhood_pairs, reference_neighborhood_mask)

__all__ = ["neighborhood_attention", "reference_neighborhood_mask", "neighborhood_mask_mod",
           "neighborhood_args", "neighborhood_options", "neighborhood_pairs", "axis_windows", "BlockedConfig",
           "NA_BACKENDS", "flex_tile", "tile_tokens", "untile_tokens"]
