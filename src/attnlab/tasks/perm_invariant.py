"""Permutation-invariant regression of a query against a set of keys (Fu, Guo, Bai & Mei, "What can a
Single Attention Layer Learn? A Study Through the Random Features Lens", NeurIPS 2023).

The paper's input is a query x_0 and N keys x_1..x_N, all on the sphere of radius sqrt(d), and its
targets are permutation invariant in the keys, mostly of the form (1/N) sum_i F(x_0, x_i). With
t_i = <x_0, x_i> / sqrt(d) (exactly mean 0, variance 1; the t_i are iid since the keys are uniform
and independent of x_0), beta a fixed unit vector and S a fixed random d x d matrix (both drawn
from the task seed), the `target` option picks

    inner_relu     (1/N) sum_i ReLU(t_i)                          a function of <x_0, x_i>
    inner_quad     (1/N) sum_i (t_i^2 - 1)                        He_2 of <x_0, x_i>
    inner_cubic    (1/N) sum_i (t_i^3 - 3 t_i)                    He_3 of <x_0, x_i>
    keys_quad      (1/N) sum_i (<beta, x_i>^2 - 1)                a function of the keys alone
    bilinear_quad  (1/N) sum_i <x_0, S x_i>^2 / d                 a function of <x_0, S x_i>
    softmax_read   sum_i softmax_i(t) <beta, x_i>                 attention-like; not a plain sum

and every target is standardised (mean 0, variance 1 over a fixed reference sample of 16384
examples), so "mse" = 1 is the error of predicting the mean.

    inputs   x_1 ... x_N x_0   (keys first, the query last)       (B, N + 1, d)
    targets  f(x_0; x_1..x_N)                                     (B,)

The query comes last so the random-feature attention layer's single-query reading
(attnlab.mechanisms.random_features: keys hidden from nothing, the query hidden from the
keys, read at position N) applies as is. The paper's exact list of target examples could not be
read from this machine (only its abstract); the targets above follow its stated classes
(functions of x_0, of the keys, of <x_0, x_i> and of <x_0, S x_i>, averaged over the keys).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from attnlab.tasks import Batch, Task, register_task
from attnlab.tasks.icl_regression import query_mse
from attnlab.models import Classifier

TARGETS = ("inner_relu", "inner_quad", "inner_cubic", "keys_quad", "bilinear_quad", "softmax_read")
_REFERENCE_SIZE = 16384
_REFERENCE_SEED = 2**31 - 1       # the standardising sample is the same for every task seed


def sphere(shape: Sequence[int], d: int, generator: torch.Generator, dtype=torch.float32) -> Tensor:
    """Uniform points on the sphere of radius sqrt(d) in R^d: shape + (d,)."""
    x = torch.randn(*shape, d, generator=generator, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True) * math.sqrt(d)).to(dtype)


@register_task
class PermInvariant(Task):
    name = "perm_invariant"
    kind = "regress"
    quality = "mse"
    higher_is_better = False
    causal = False
    description = "regress a permutation-invariant function of a query and N keys on the sphere (mse)"

    def __init__(self, seed: int = 0, *, target: str = "inner_relu", d: int = 8, N: int = 8):
        super().__init__(seed)
        for label, v in (("d", d), ("N", N)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{label} must be a positive int, got {v!r}")
        if d < 2:
            raise ValueError(f"d must be at least 2 (points on a sphere in R^d), got {d}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.target, self.d, self.N = target, d, N
        g = torch.Generator().manual_seed(seed * 7_919 + 101)
        beta = torch.randn(d, generator=g, dtype=torch.float64)
        self.beta = beta / beta.norm()                                          # (d,) unit
        self.S = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)   # (d, d)
        ref = sphere((_REFERENCE_SIZE, N + 1), d, torch.Generator().manual_seed(_REFERENCE_SEED), torch.float64)
        raw = self._raw(ref)
        self.offset, self.scale = float(raw.mean()), float(raw.std())

    @property
    def seq_len(self) -> int:
        return self.N + 1

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "target": self.target, "d": self.d, "N": self.N}

    def _raw(self, inputs: Tensor) -> Tensor:
        """The unstandardised target of inputs (B, N + 1, d) in float64: (B,)."""
        x = inputs.double()
        keys, query = x[:, :-1], x[:, -1]                                       # (B, N, d), (B, d)
        t = torch.einsum("bd,bnd->bn", query, keys) / math.sqrt(self.d)        # (B, N)
        if self.target == "inner_relu":
            return torch.relu(t).mean(1)
        if self.target == "inner_quad":
            return (t ** 2 - 1).mean(1)
        if self.target == "inner_cubic":
            return (t ** 3 - 3 * t).mean(1)
        if self.target == "keys_quad":
            return ((keys @ self.beta) ** 2 - 1).mean(1)
        if self.target == "bilinear_quad":
            return torch.einsum("bd,de,bne->bn", query, self.S, keys).pow(2).mean(1) / self.d
        return (torch.softmax(t, dim=1) * (keys @ self.beta)).sum(1)           # softmax_read

    def target_fn(self, inputs: Tensor) -> Tensor:
        """f(x_0; x_1..x_N) for inputs (B, N + 1, d) (keys first, query last): (B,) standardised."""
        if inputs.dim() != 3 or inputs.shape[1:] != (self.N + 1, self.d):
            raise ValueError(f"expected inputs (B, N + 1, d) = (B, {self.N + 1}, {self.d}), got {tuple(inputs.shape)}")
        return ((self._raw(inputs) - self.offset) / self.scale).to(inputs.dtype)

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        g = self.generator(split, index)
        inputs = sphere((batch_size, self.N + 1), self.d, g)                   # (B, N + 1, d)
        return {"inputs": inputs, "targets": self.target_fn(inputs)}

    # -- model and loss -----------------------------------------------------------------
    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], **block_options) -> nn.Module:
        """A Transformer over the d-dim tokens with learned positions (they mark the query), read at x_0."""
        return Classifier(1, dim, num_heads, layers, in_dim=self.d, pos="learned", pool="last",
                          max_len=self.N + 1, **block_options)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        return query_mse(model(batch["inputs"]), batch["targets"])             # (B, 1), (B,)
