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
from torch import Tensor, nn

from attnlab.tasks import Batch, register_task
from attnlab.tasks._token import TokenTask, token_loss


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


@register_task
class AssocRecallSweep(TokenTask):
    """MQAR over a range of difficulties in one model, scored per difficulty (Zoology's sweep).

    Every row draws its number of pairs P from `pairs` (the val split cycles through them, so
    each val batch holds every P) and a gap of filler tokens (0) between the stored pairs and
    the queries, uniform in [0, seq_len - 4P]; all P pairs are asked, in random order, and the
    row is padded with filler to `seq_len`:

        inputs   k1 v1 ... kP vP  0 ... 0 (gap)  q1 a1 ... qP aP  0 ... 0      (B, seq_len)
        targets  -100 everywhere except at each qi, where it is ai

    One model trains on the mixture (easy rows help the hard ones form the lookup, as in
    Zoology's training mixtures); in eval mode the loss's metrics break accuracy down by P
    (`accuracy_p{P}`) and by the distance from a query back to its stored key
    (`accuracy_d{lo}_{hi}`, buckets of DISTANCE_BUCKETS), so a sliding window shows where
    pairs leave its reach and a fixed-size state shows where P outgrows it.
    """

    name = "mqar_sweep"
    description = "MQAR at several pair counts and distances in one run, accuracy per difficulty"
    DISTANCE_EDGES = (0, 8, 16, 32, 64, 128, 256, 512, 1024)

    def __init__(self, seed: int = 0, *, seq_len: int = 64, pairs: tuple | list = (2, 4, 8, 12),
                 num_keys: int = 32, num_values: int = 32):
        super().__init__(seed)
        pairs = tuple(pairs) if isinstance(pairs, (tuple, list)) else pairs
        if not isinstance(pairs, tuple) or not pairs or any(not isinstance(p, int) or isinstance(p, bool) or p < 1
                                                            for p in pairs):
            raise ValueError(f"pairs must be a non-empty list of positive ints, got {pairs!r}")
        for label, v in (("seq_len", seq_len), ("num_keys", num_keys), ("num_values", num_values)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{label} must be a positive int, got {v!r}")
        if max(pairs) > num_keys:
            raise ValueError(f"pairs up to {max(pairs)} need at least that many keys, got num_keys={num_keys}")
        if 4 * max(pairs) > seq_len:
            raise ValueError(f"{max(pairs)} pairs and their queries take {4 * max(pairs)} tokens, more than "
                             f"seq_len={seq_len}")
        self.pairs = tuple(sorted(set(pairs)))
        self._seq_len, self.num_keys, self.num_values = seq_len, num_keys, num_values

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def vocab_size(self) -> int:
        return 1 + self.num_keys + self.num_values

    def options(self) -> dict:
        return {"seed": self.seed, "seq_len": self._seq_len, "pairs": list(self.pairs),
                "num_keys": self.num_keys, "num_values": self.num_values}

    def distance_buckets(self) -> list[tuple[int, int]]:
        edges = [e for e in self.DISTANCE_EDGES if e < self._seq_len] + [self._seq_len]
        return list(zip(edges[:-1], edges[1:]))

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        g = self.generator(split, index)
        B, N, Pmax = batch_size, self._seq_len, max(self.pairs)
        if split == "val":
            P = torch.tensor(self.pairs)[torch.arange(B) % len(self.pairs)]                  # (B,) every P
        else:
            P = torch.tensor(self.pairs)[torch.randint(0, len(self.pairs), (B,), generator=g)]
        keys = torch.rand(B, self.num_keys, generator=g).argsort(1)[:, :Pmax] + 1          # (B, Pmax) distinct
        values = torch.randint(0, self.num_values, (B, Pmax), generator=g) + 1 + self.num_keys
        order = torch.rand(B, Pmax, generator=g)
        slot = torch.arange(Pmax).expand(B, Pmax)
        order = order.masked_fill(slot >= P[:, None], 2.0).argsort(1)                     # asked pairs first
        gap = (torch.rand(B, generator=g) * (N - 4 * P + 1).float()).floor().long()        # (B,)
        inputs = torch.zeros(B, N, dtype=torch.long)
        targets = torch.full((B, N), -100, dtype=torch.long)
        distance = torch.full((B, N), -1, dtype=torch.long)
        rows = torch.arange(B)
        for j in range(Pmax):
            live = j < P                                                                   # (B,)
            r = rows[live]
            inputs[r, 2 * j], inputs[r, 2 * j + 1] = keys[live, j], values[live, j]
            asked = order[live, j]                                                          # pair index
            qpos = 2 * P[live] + gap[live] + 2 * j
            inputs[r, qpos] = keys[live].gather(1, asked[:, None]).squeeze(1)
            inputs[r, qpos + 1] = values[live].gather(1, asked[:, None]).squeeze(1)
            targets[r, qpos] = inputs[r, qpos + 1]
            distance[r, qpos] = qpos - 2 * asked
        return {"inputs": inputs, "targets": targets, "pairs": P, "distance": distance}

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["inputs"])                                                    # (B, N, V)
        loss, metrics = token_loss(logits, batch["targets"])
        if model.training:        # the breakdown is for evaluation: no per-step syncs while training
            return loss, metrics
        with torch.no_grad():
            marked = batch["targets"] != -100
            hit = (logits.argmax(-1) == batch["targets"]) & marked                          # (B, N)
            pairs = batch.get("pairs")
            if pairs is not None:
                for p in self.pairs:
                    m = marked & (pairs == p)[:, None]
                    if bool(m.any()):
                        metrics[f"accuracy_p{p}"] = hit[m].float().mean().item()
            distance = batch.get("distance")
            if distance is not None:
                for lo, hi in self.distance_buckets():
                    m = marked & (distance >= lo) & (distance < hi)
                    if bool(m.any()):
                        metrics[f"accuracy_d{lo}_{hi}"] = hit[m].float().mean().item()
        return loss, metrics
