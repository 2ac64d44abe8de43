"""In-context linear regression (He, Pan, Chen & Yang, "In-Context Linear Regression Demystified", ICML 2025).

Every example draws its own regression vector and a prompt of `n` labelled points, then asks
for the label of a query point; the model has to fit the regression in context:

    w   ~ N(0, I_d / d)                  (the authors' code scales the prior by 1/d)
    x_i ~ N(0, I_d),  i = 1..n, and x_q ~ N(0, I_d)
    y_i = <w, x_i> + eps_i,  y_q = <w, x_q> + eps_q,  eps ~ N(0, noise^2)

    inputs   z_1 ... z_n z_q  with z_i = (x_i, y_i), z_q = (x_q, 0)      (B, n + 1, d + 1)
    targets  y_q                                                          (B,)
    weights  w (for analysis only; a model must not read it)              (B, d)

The paper trains with d = 5, n = 8d = 40 and noise^2 = 0.1 (the defaults here). Under this prior the
Bayes-optimal predictor is ridge regression with lambda = noise^2 / (1/d) = d * noise^2 (see
`ridge_predict`); the loss is the squared error of the query prediction ("mse", lower is better).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.tasks import Batch, Task, register_task
from attnlab.models import Classifier


@register_task
class ICLRegression(Task):
    name = "icl_regression"
    kind = "regress"
    quality = "mse"
    higher_is_better = False
    causal = False
    description = "in-context linear regression: predict y_q from n (x, y) pairs and x_q (mse)"

    def __init__(self, seed: int = 0, *, d: int = 5, n: int = 40, noise: float = math.sqrt(0.1)):
        super().__init__(seed)
        for label, v in (("d", d), ("n", n)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{label} must be a positive int, got {v!r}")
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            raise ValueError(f"noise must be a finite non-negative float (the label noise std), got {noise!r}")
        self.d, self.n, self.noise = d, n, float(noise)

    @property
    def seq_len(self) -> int:
        return self.n + 1

    @property
    def prior_var(self) -> float:
        """Variance of each coordinate of w."""
        return 1.0 / self.d

    @property
    def ridge_lambda(self) -> float:
        """The Bayes-optimal ridge penalty noise^2 / prior variance."""
        return self.noise ** 2 / self.prior_var

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "d": self.d, "n": self.n, "noise": self.noise}

    def batch(self, split: str, index: int, batch_size: int, *, n: int | None = None) -> Batch:
        """Batch `index` of `split`; `n` overrides the context length (to test length generalisation)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        n = self.n if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"context length n must be a positive int, got {n!r}")
        g = self.generator(split, index)
        B, d = batch_size, self.d
        w = torch.randn(B, d, generator=g) * math.sqrt(self.prior_var)          # (B, d)
        x = torch.randn(B, n + 1, d, generator=g)                               # (B, n + 1, d), last = query
        y = torch.einsum("bnd,bd->bn", x, w) + self.noise * torch.randn(B, n + 1, generator=g)  # (B, n + 1)
        targets = y[:, -1].clone()                                              # (B,)
        y[:, -1] = 0.0                                                          # the query's label is hidden
        inputs = torch.cat([x, y.unsqueeze(-1)], dim=-1)                        # (B, n + 1, d + 1)
        return {"inputs": inputs, "targets": targets, "weights": w}

    # -- model and loss -----------------------------------------------------------------
    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], **block_options) -> nn.Module:
        """A Transformer over the (d+1)-dim tokens, no positions (the prompt is a set), read at z_q."""
        return Classifier(1, dim, num_heads, layers, in_dim=self.d + 1, pos="none", pool="last",
                          max_len=max(4096, 8 * (self.n + 1)), **block_options)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        pred = model(batch["inputs"])
        return query_mse(pred, batch["targets"])


def query_mse(pred: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Mean squared error of query predictions `pred` (B,) or (B, 1) against `targets` (B,)."""
    if pred.dim() == 2 and pred.shape[-1] == 1:
        pred = pred.squeeze(-1)
    if pred.shape != targets.shape:
        raise ValueError(f"expected one prediction per example, shape {tuple(targets.shape)} or "
                         f"{tuple(targets.shape) + (1,)}, got {tuple(pred.shape)}")
    loss = F.mse_loss(pred.float(), targets.float())
    return loss, {"loss": loss.item(), "mse": loss.item()}


def _split(inputs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if inputs.dim() != 3 or inputs.shape[1] < 2 or inputs.shape[2] < 2:
        raise ValueError(f"expected prompts (B, n + 1, d + 1) with n >= 1, d >= 1, got {tuple(inputs.shape)}")
    x, y = inputs[:, :-1, :-1], inputs[:, :-1, -1]                              # (B, n, d), (B, n)
    return x, y, inputs[:, -1, :-1]                                             # x_q (B, d)


def ridge_predict(inputs: Tensor, lam: float) -> Tensor:
    """Ridge regression on each prompt's context, evaluated at its query: (B, n+1, d+1) -> (B,).

    w_hat = (X^T X + lam I)^-1 X^T y; with lam = noise^2 / prior variance this is the posterior mean
    of w, so its prediction is Bayes-optimal for the squared error.
    """
    if lam < 0:
        raise ValueError(f"ridge lambda must be non-negative, got {lam}")
    x, y, xq = _split(inputs.double())
    d = x.shape[-1]
    gram = x.transpose(1, 2) @ x + lam * torch.eye(d, dtype=x.dtype)            # (B, d, d)
    w_hat = torch.linalg.solve(gram, (x.transpose(1, 2) @ y.unsqueeze(-1)))     # (B, d, 1)
    return (xq.unsqueeze(1) @ w_hat).flatten().to(inputs.dtype)                 # (B,)


def ols_predict(inputs: Tensor) -> Tensor:
    """Least squares (minimum-norm pseudo-inverse when n < d) at each query: (B, n+1, d+1) -> (B,)."""
    x, y, xq = _split(inputs.double())
    w_hat = torch.linalg.pinv(x) @ y.unsqueeze(-1)                              # (B, d, 1)
    return (xq.unsqueeze(1) @ w_hat).flatten().to(inputs.dtype)                 # (B,)


def gd_statistic(inputs: Tensor) -> Tensor:
    """(1/n) sum_i y_i <x_i, x_q>: one step of gradient descent from w = 0, per unit step size."""
    x, y, xq = _split(inputs)
    return torch.einsum("bn,bnd,bd->b", y, x, xq) / x.shape[1]                   # (B,)
