"""Multi-query associative recall (MQAR; Arora et al., "Zoology", 2023).

A sequence lists `num_pairs` key-value pairs, then asks for the values of `num_queries` of
those keys: each query key is followed by its value, and the model is scored on predicting
that value from the query key (teacher forcing). Solving it needs content-based lookup over
the whole prefix: the skill attention has and fixed-state recurrences lose as pairs grow.

    tokens:  0 = padding (unused), keys 1..num_keys, values num_keys+1..num_keys+num_values
    inputs   k1 v1 k2 v2 ... kP vP  q1 a1 q2 a2 ... qQ aQ          (B, 2P + 2Q)
    targets  -100 everywhere except at each qi, where it is ai
"""
from __future__ import annotations

import torch

from attnlab.arena.tasks import Batch, register_task
from attnlab.arena.tasks._token import TokenTask


@register_task
class AssocRecall(TokenTask):
    name = "assoc_recall"
    description = "multi-query associative recall: look up values of keys seen earlier (accuracy)"

    def __init__(self, seed: int = 0, *, num_pairs: int = 16, num_queries: int = 16, num_keys: int = 64,
                 num_values: int = 64):
        super().__init__(seed)
        for label, v in (("num_pairs", num_pairs), ("num_queries", num_queries), ("num_keys", num_keys),
                         ("num_values", num_values)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{label} must be a positive int, got {v!r}")
        if num_pairs > num_keys:
            raise ValueError(f"num_pairs ({num_pairs}) cannot exceed num_keys ({num_keys}): keys are distinct")
        if num_queries > num_pairs:
            raise ValueError(f"num_queries ({num_queries}) cannot exceed num_pairs ({num_pairs}): "
                             "each query asks a distinct stored key")
        self.num_pairs, self.num_queries = num_pairs, num_queries
        self.num_keys, self.num_values = num_keys, num_values

    @property
    def seq_len(self) -> int:
        return 2 * (self.num_pairs + self.num_queries)

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_keys + self.num_values

    def options(self) -> dict:
        return {"seed": self.seed, "num_pairs": self.num_pairs, "num_queries": self.num_queries,
                "num_keys": self.num_keys, "num_values": self.num_values}

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        g = self.generator(split, index)
        B, P, Q = batch_size, self.num_pairs, self.num_queries
        keys = torch.rand(B, self.num_keys, generator=g).argsort(1)[:, :P] + 1          # (B, P) distinct
        values = torch.randint(0, self.num_values, (B, P), generator=g) + 1 + self.num_keys
        asked = torch.rand(B, P, generator=g).argsort(1)[:, :Q]                         # (B, Q) pair indices
        q_keys, q_values = keys.gather(1, asked), values.gather(1, asked)              # (B, Q)
        store = torch.stack([keys, values], dim=2).reshape(B, 2 * P)
        queries = torch.stack([q_keys, q_values], dim=2).reshape(B, 2 * Q)
        inputs = torch.cat([store, queries], dim=1)                                     # (B, 2P + 2Q)
        targets = torch.full_like(inputs, -100)
        targets[:, 2 * P::2] = q_values                                                 # predict a_i at q_i
        return {"inputs": inputs, "targets": targets}
