"""Selective copying (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023).

A region of `region_len` positions holds `num_tokens` content tokens at random positions and
blank (noise) tokens everywhere else; `num_tokens` marker tokens follow, and at the i-th marker
the model must output the i-th content token of the region. Unlike plain copying the spacing
varies from example to example, so a fixed time-invariant filter cannot solve it: the model
has to select tokens by content (skip the blanks) and keep their order.

    tokens:  0 = blank, content 1..vocab, vocab + 1 = marker
    inputs   . . c1 . . . c2 c3 . . . ck .   M  M  ...  M          (B, region_len + num_tokens)
    targets  -100 over the region            c1 c2 ...  ck
"""
from __future__ import annotations

import torch

from attnlab.tasks import Batch, register_task
from attnlab.tasks._token import TokenTask


@register_task
class SelectiveCopy(TokenTask):
    name = "selective_copy"
    description = "selective copying: output the content tokens scattered among blanks, in order (accuracy)"

    BLANK = 0

    def __init__(self, seed: int = 0, *, region_len: int = 128, num_tokens: int = 16, vocab: int = 16):
        super().__init__(seed)
        for label, v in (("region_len", region_len), ("num_tokens", num_tokens), ("vocab", vocab)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{label} must be a positive int, got {v!r}")
        if num_tokens > region_len:
            raise ValueError(f"num_tokens ({num_tokens}) cannot exceed region_len ({region_len}): "
                             "each content token takes its own position")
        self.region_len, self.num_tokens, self.vocab = region_len, num_tokens, vocab

    @property
    def marker(self) -> int:
        return self.vocab + 1

    @property
    def seq_len(self) -> int:
        return self.region_len + self.num_tokens

    @property
    def vocab_size(self) -> int:
        return self.vocab + 2

    def options(self) -> dict:
        return {"seed": self.seed, "region_len": self.region_len, "num_tokens": self.num_tokens,
                "vocab": self.vocab}

    def batch(self, split: str, index: int, batch_size: int) -> Batch:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        g = self.generator(split, index)
        B, L, K = batch_size, self.region_len, self.num_tokens
        content = torch.randint(1, self.vocab + 1, (B, K), generator=g)                 # (B, K)
        where = torch.rand(B, L, generator=g).argsort(1)[:, :K].sort(1).values        # (B, K) increasing
        region = torch.full((B, L), self.BLANK, dtype=torch.long)
        region.scatter_(1, where, content)                                             # (B, L)
        markers = torch.full((B, K), self.marker, dtype=torch.long)
        inputs = torch.cat([region, markers], dim=1)                                   # (B, L + K)
        targets = torch.full_like(inputs, -100)
        targets[:, L:] = content                                                       # i-th marker -> c_i
        return {"inputs": inputs, "targets": targets}
