"""The one cross-entropy every path uses (plain, loss-parallel, pipeline).

Normalisation happens exactly once, here: each microbatch returns its *summed* token loss
divided by the number of tokens in the whole global batch. Summing those over microbatches,
pipeline chunks and data-parallel ranks gives the global-batch mean, so data-parallel
wrappers reduce with SUM (gradient divide factor 1) and pipeline schedules run with
scale_grads=False.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from torch import Tensor


def token_loss_sum(logits: Tensor, targets: Tensor) -> Tensor:
    """Summed cross-entropy. logits (B, T, V) plain or DTensor Shard(-1); targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(0, 1), reduction="sum")


class GlobalMeanLoss:
    """loss_fn(logits, targets) -> summed loss / tokens in the global batch."""

    def __init__(self, global_tokens: int):
        self.global_tokens = global_tokens

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        return token_loss_sum(logits, targets) / self.global_tokens


def loss_parallel_context(enabled: bool) -> contextlib.AbstractContextManager:
    """Context for forward-loss and backward when logits are vocab-sharded DTensors."""
    if not enabled:
        return contextlib.nullcontext()
    from torch.distributed.tensor.parallel import loss_parallel

    return loss_parallel()


def detached_local(loss: Tensor) -> Tensor:
    """The loss as a detached plain tensor (it is a Replicate DTensor under loss parallel)."""
    full = getattr(loss, "full_tensor", None)
    return (full() if full is not None else loss).detach()
