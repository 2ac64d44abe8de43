"""Hook points: identity modules on a mechanism's intermediate tensors (TransformerLens-style).

A probe reads or edits a tensor by registering a forward hook (or forward pre-hook) on the hook
point that carries it; with no hook registered a hook point is the identity and costs nothing.

The convention every mechanism in `attnlab.mechanisms` follows:

- Each hook point is an attribute `hook_<what>` holding a `HookPoint`, with the shape of what it
  carries in a comment where it is defined. Core names, where the formula has the tensor:
  `hook_q`, `hook_k`, `hook_v` (keys and values after the KV cache: all M positions),
  `hook_scores` (the softmax input: scaled q k^T plus masks and biases, -inf where masked),
  `hook_probs` (the softmax output, before attention dropout) and `hook_out` (per-head outputs
  before the output projection, unless its comment says otherwise). A mechanism whose formula has
  other intermediates names its hooks by what they hold (`hook_gates`, `hook_features`, ...).
- `hook_names` (class attribute): every hook point that exists on every instance and fires once
  on every eval-mode forward that runs the eager path (below). A hook that fires only with some
  option (e.g. selective's `hook_tau_v` with `value_temp=True`) is listed in
  `optional_hook_names` instead.
- `absent_hooks` (class attribute, optional): core names the formula never holds whole, each
  with the reason (linear_infsa projects q, k, v chunk by chunk). A mechanism whose heads come in
  kinds names its scores/probs hooks per kind (routing: `hook_scores_local`, `hook_probs_routed`).
- `eager_hook_names` (class attribute, a subset of `hook_names`): the hooks that fire only on
  the eager path, because the fast kernels (SDPA, FlexAttention, the blocked neighborhood kernel)
  never materialise the tensor: usually `hook_scores` and `hook_probs`.
- The eager path: a mechanism with a `backend` option runs it with `backend="reference"` (at
  construction, or by setting `module.backend = "reference"`, the one way that works for every
  mechanism). Those whose attention runs through `attnlab.ops.attention` also take it with
  `backend=None` inside `with attnlab.use_backend("reference"):` (or ATTNLAB_BACKEND=reference);
  the neighborhood mechanisms, whose op has its own backends, only with an explicit
  `backend="reference"`. A mechanism without a `backend` option (or a configuration that does
  not use one, e.g. random_features with relu) is always eager. The eager path is the
  reference backend itself, so the output is the same whether or not hooks are registered.
- Mechanisms hand `hook_scores` / `hook_probs` to `attnlab.ops.attention(..., scores_hook=,
  probs_hook=)` (or `softmax_attention`), which calls them on the reference backend only.
"""
from __future__ import annotations

import torch.nn as nn


class HookPoint(nn.Identity):
    """An identity module a probe hooks: forward(x) returns x (a hook may replace it)."""


__all__ = ["HookPoint"]
