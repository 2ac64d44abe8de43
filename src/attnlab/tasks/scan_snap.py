"""Sequence classes with distinct and common tokens (Tian, Wang, Chen & Du, "Scan and Snap", NeurIPS 2023).

The paper's synthetic next-token setting (its Sec. 3.2 "sequence classes", and the `Dataset2`
generator of the authors' experiments). There are K = num_last * next_per_last sequence classes,
one per next token n. Class n fixes

  * its query token m = psi(n): the last token of the sequence. `next_per_last` classes share each
    query token, so the query alone does not determine the next token;
  * a distribution P(l | n) over contextual tokens l, from which the first T - 1 tokens are drawn
    i.i.d. (no order, no positions). It puts weight on two kinds of tokens:
      - common tokens (CT), shared by every class: unnormalised weight `common_weight` each;
      - distinct tokens (DT), owned by class n alone: `num_distinct` tokens with unnormalised weights
        evenly spaced from `distinct_min` to `distinct_max` (so they co-occur with n more or less often).

    inputs   l_1 l_2 ... l_{T-1} m          (B, T), l_i ~ P(. | n) i.i.d., m = psi(n)
    targets  -100 ... -100 n                (B, T): only the query position is scored
    classes  n's index in 0..K-1            (B,)   (for analysis; a model must not read it)

Token ids: common 0..C-1, then the distinct tokens of class 0, class 1, ..., then the query tokens,
then the next tokens (vocab_size = C + K * num_distinct + num_last + K). The paper's claim is that a
1-layer transformer trained on this data attends more and more to the distinct tokens of the class
and less to the common ones ("scan"), and that this stops ("snap") at a time set by the learning
rates; `context_probs`, `distinct_mask` and `common_mask` give what is needed to measure that.
Paper defaults (the authors' synthetic runs): T = 128, C = 10, 10 distinct tokens per class with
weights 0.1..1, common weight 1.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from attnlab.tasks import Batch, register_task
from attnlab.tasks._token import TokenTask


@register_task
class ScanSnap(TokenTask):
    name = "scan_snap"
    description = "next token from distinct vs common context tokens of a sequence class (accuracy)"

    def __init__(self, seed: int = 0, *, num_last: int = 2, next_per_last: int = 2, num_common: int = 10,
                 num_distinct: int = 10, length: int = 128, common_weight: float = 1.0,
                 distinct_min: float = 0.1, distinct_max: float = 1.0):
        super().__init__(seed)
        for label, v, low in (("num_last", num_last, 1), ("next_per_last", next_per_last, 1),
                              ("num_common", num_common, 0), ("num_distinct", num_distinct, 1), ("length", length, 2)):
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise ValueError(f"{label} must be an int >= {low}, got {v!r}")
        for label, v in (("common_weight", common_weight), ("distinct_min", distinct_min),
                         ("distinct_max", distinct_max)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
                raise ValueError(f"{label} must be a positive finite number, got {v!r}")
        if distinct_min > distinct_max:
            raise ValueError(f"distinct_min ({distinct_min}) must not exceed distinct_max ({distinct_max})")
        self.num_last, self.next_per_last = num_last, next_per_last
        self.num_common, self.num_distinct, self.length = num_common, num_distinct, length
        self.common_weight, self.distinct_min, self.distinct_max = float(common_weight), float(distinct_min), float(distinct_max)

        K, C, D = self.num_classes, num_common, num_distinct
        self._query_offset = C + K * D
        self._next_offset = self._query_offset + num_last
        weights = torch.zeros(K, self.vocab_size, dtype=torch.float64)     # (K, M) unnormalised P(l | n)
        weights[:, :C] = self.common_weight
        ramp = torch.linspace(self.distinct_min, self.distinct_max, D, dtype=torch.float64)
        for n in range(K):
            weights[n, C + n * D:C + (n + 1) * D] = ramp
        self.context_probs = (weights / weights.sum(1, keepdim=True)).float()          # (K, M)
        self.distinct_mask = torch.zeros(K, self.vocab_size, dtype=torch.bool)          # (K, M)
        for n in range(K):
            self.distinct_mask[n, C + n * D:C + (n + 1) * D] = True
        self.common_mask = torch.zeros(self.vocab_size, dtype=torch.bool)               # (M,)
        self.common_mask[:C] = True
        self.query_tokens = torch.arange(K) // next_per_last + self._query_offset       # (K,) m = psi(n)
        self.next_tokens = torch.arange(K) + self._next_offset                          # (K,)

    @property
    def num_classes(self) -> int:
        """K: sequence classes, one per next token."""
        return self.num_last * self.next_per_last

    @property
    def seq_len(self) -> int:
        return self.length

    @property
    def vocab_size(self) -> int:
        return self.num_common + self.num_classes * self.num_distinct + self.num_last + self.num_classes

    def options(self) -> dict[str, Any]:
        return {"seed": self.seed, "num_last": self.num_last, "next_per_last": self.next_per_last,
                "num_common": self.num_common, "num_distinct": self.num_distinct, "length": self.length,
                "common_weight": self.common_weight, "distinct_min": self.distinct_min,
                "distinct_max": self.distinct_max}

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        g = self.generator(split, index)
        classes = torch.randint(0, self.num_classes, (batch_size,), generator=g)            # (B,)
        context = torch.multinomial(self.context_probs[classes], self.length - 1, replacement=True,
                                    generator=g)                                            # (B, T - 1)
        inputs = torch.cat([context, self.query_tokens[classes].unsqueeze(1)], dim=1)       # (B, T)
        targets = torch.full_like(inputs, -100)
        targets[:, -1] = self.next_tokens[classes]
        return {"inputs": inputs, "targets": targets, "classes": classes}

    def expected_attention(self, query_key_logits: Tensor) -> Tensor:
        """c_n: the attention the query of class n puts on each token id, for long sequences.

        With logits Z[m, l] from query m to key token l (M, M), a long sequence of class n holds token l
        a fraction P(l | n) of the time, so its softmax attention per token id tends to
        c_n(l) = P(l | n) exp(Z[psi(n), l]) / sum_l' P(l' | n) exp(Z[psi(n), l'])   -> (K, M).
        """
        M = self.vocab_size
        if query_key_logits.shape != (M, M):
            raise ValueError(f"expected query-key logits of shape ({M}, {M}), got {tuple(query_key_logits.shape)}")
        logits = query_key_logits.detach().float()[self.query_tokens]                     # (K, M)
        logits = logits.masked_fill(self.context_probs == 0, float("-inf"))
        weights = self.context_probs * torch.softmax(logits, dim=1)
        return weights / weights.sum(1, keepdim=True)                                     # (K, M)
