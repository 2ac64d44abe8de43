"""Shared pieces of token tasks: a CausalLM head and a loss/accuracy over marked positions."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.tasks import Batch, Task
from attnlab.models import CausalLM


class TokenTask(Task):
    """A next-token task: batch = {"inputs": (B, N) int64, "targets": (B, N) int64, -100 = no loss}."""

    kind = "lm"
    causal = True
    quality = "accuracy"
    higher_is_better = True

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def build_model(self, dim: int, num_heads: int, layers: int | Sequence[Any], **block_options) -> nn.Module:
        return CausalLM(self.vocab_size, dim, num_heads, layers, max_len=self.seq_len, **block_options)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch["inputs"])                                    # (B, N, V)
        return token_loss(logits, batch["targets"])


def token_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy and accuracy over positions whose target is not -100."""
    marked = targets != -100                                               # (B, N)
    if not bool(marked.any()):
        raise ValueError("batch has no target positions (all targets are -100)")
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
    with torch.no_grad():
        hits = (logits.argmax(-1) == targets) & marked
        accuracy = hits.sum().item() / marked.sum().item()
    return loss, {"loss": loss.item(), "accuracy": accuracy}
