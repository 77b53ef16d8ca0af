"""The one cross-entropy every path uses (plain, loss-parallel, pipeline).

Normalisation happens exactly once, here: each microbatch returns its *summed* token loss
divided by the number of tokens in the whole global batch. Summing those over microbatches,
pipeline chunks and data-parallel ranks gives the global-batch mean, so data-parallel
wrappers reduce with SUM (gradient divide factor 1) and pipeline schedules run with
scale_grads=False.

The cross-entropy itself is gpt3d's own, written for the (tokens x vocabulary) logits that
dominate a small model's step:
- only the real vocabulary takes part (columns < vocab_size): padded rows of a padded
  vocabulary never receive probability mass and their logits get zero gradient, with no
  mask pass over the logits;
- the gradient (softmax - onehot) is computed in the forward pass, chunk by chunk, and
  written over the logits in place (nothing else reads them), so there is no log-softmax
  copy, no fp32 copy of bf16 logits and no separate backward pass over them;
- under loss parallel the logits are a DTensor sharded over the vocabulary on the tp mesh:
  each rank works on its own columns, and two all-reduces of a few floats per token combine
  the per-rank log-sum-exp and the target logit (what torch's loss_parallel does, minus the
  copies). With the table sharded over dp_shard (gpt3d/parallel/vocab_over_dp.py) the
  logits hold every dp rank's tokens: the targets are gathered the same way, and each rank
  returns the loss of its own tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


class GlobalMeanLoss:
    """loss_fn(logits, targets) -> summed loss / tokens in the global batch."""

    def __init__(self, global_tokens: int, vocab_size: int):
        self.global_tokens, self.vocab_size = global_tokens, vocab_size

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        # Inside a compiled stage the loss is compiled with it on GPUs; on CPUs inductor's
        # softmax over the vocabulary runs ~3x slower than ATen's, so it stays eager there.
        loss_sum = _eager_token_loss_sum if logits.device.type == "cpu" else token_loss_sum
        return loss_sum(logits, targets, self.vocab_size) / self.global_tokens


def token_loss_sum(logits: Tensor, targets: Tensor, vocab_size: int) -> Tensor:
    """Summed cross-entropy over the first vocab_size columns. logits (B, T, V_padded), a
    plain tensor or a DTensor Shard(-1) over a 1-D tp mesh; targets (B, T) < vocab_size.
    In training (grad enabled) the logits are overwritten with their gradient."""
    targets = targets.reshape(-1)  # (N,)
    if not hasattr(logits, "to_local"):
        flat = logits.reshape(-1, logits.shape[-1])  # (N, V_padded), a view
        return _VocabCrossEntropy.apply(flat, targets, 0, vocab_size, None)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, (placement,) = logits.device_mesh, logits.placements
    assert placement.is_shard(logits.ndim - 1), f"vocab-sharded logits expected: {placement}"
    _, offset = compute_local_shape_and_global_offset(logits.shape, mesh, logits.placements)
    local = logits.to_local()  # (B, T, V / tp); its gradient becomes a Shard(-1) DTensor
    group, mine = mesh.get_group(), None
    rows = logits.shape[:-1].numel()
    if rows != targets.numel():  # every dp rank's tokens (vocab_over_dp)
        targets, mine = _every_ranks_targets(targets, group, rows)
    return _VocabCrossEntropy.apply(
        local.reshape(-1, local.shape[-1]), targets, offset[-1], vocab_size, group, mine
    )


def _every_ranks_targets(targets: Tensor, group, rows: int) -> tuple[Tensor, slice]:
    """This rank's targets (N,) -> the targets of the logits' rows (rows = k·N: k blocks,
    each the tokens of ranks/k consecutive ranks of the group, which hold the same targets:
    the tp ranks of one dp rank under gpt3d.parallel.vocab_over_dp), and where this rank's
    block is."""
    import torch.distributed as dist

    n, ranks, rank = targets.numel(), dist.get_world_size(group), dist.get_rank(group)
    every = targets.new_empty(n * ranks)
    dist.all_gather_single(every, targets.contiguous(), group=group)
    per_block = ranks // (rows // n)  # ranks sharing a block's tokens
    every = every.view(ranks // per_block, per_block, n)[:, 0].reshape(-1)
    block = rank // per_block
    return every, slice(block * n, (block + 1) * n)


_eager_token_loss_sum = torch.compiler.disable(token_loss_sum)


class _VocabCrossEntropy(torch.autograd.Function):
    """sum_n lse(x_n[:vocab]) - x_n[target_n] for x: (N, V_local) = this rank's columns
    [col0, col0 + V_local) of the logits; group: the tp group when the columns are split.
    mine: when the rows are every data-parallel rank's tokens (gpt3d.parallel.vocab_over_dp),
    the rows whose loss is this rank's share. The gradient still covers every row: the
    ranks' shares add up to the loss, and only this rank holds these columns."""

    @staticmethod
    def forward(ctx, x: Tensor, targets: Tensor, col0: int, vocab_size: int, group, mine=None):
        real = max(0, min(x.shape[1], vocab_size - col0))  # this rank's real columns
        lse, target_logit = _lse_and_target_logit(x[:, :real], targets - col0, group)
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(_softmax_minus_onehot_(x, real, lse, targets - col0))
        per_token = lse - target_logit  # (N,)
        return (per_token if mine is None else per_token[mine]).sum()

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None, None


def _rows_per_chunk(x: Tensor) -> int:
    """Tokens per chunk: ~4 MB of fp32 logits on CPU (cache-sized), ~256 MB on GPUs."""
    budget = 1 << (20 if x.device.type == "cpu" else 26)  # fp32 elements
    return max(16, budget // max(1, x.shape[1]))


def _lse_and_target_logit(x: Tensor, local_target: Tensor, group) -> tuple[Tensor, Tensor]:
    """Per token (N,) fp32: log-sum-exp over the real columns and the target's logit, over
    every rank's columns when group is given."""
    N, rows = x.shape[0], _rows_per_chunk(x)
    lse = torch.empty(N, dtype=torch.float32, device=x.device)
    for a in range(0, N, rows):
        lse[a : a + rows] = torch.logsumexp(x[a : a + rows].float(), dim=1)
    mine = (local_target >= 0) & (local_target < x.shape[1])  # targets in my columns
    target_logit = torch.zeros(N, dtype=torch.float32, device=x.device)
    idx = local_target.clamp(0, max(x.shape[1] - 1, 0))[:, None]
    if x.shape[1]:
        target_logit = torch.where(mine, x.gather(1, idx).squeeze(1).float(), target_logit)
    if group is None:
        return lse, target_logit
    import torch.distributed as dist

    top = lse.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    parts = torch.stack([(lse - top).exp(), target_logit])  # (2, N)
    dist.all_reduce(parts, group=group)
    return top + parts[0].log(), parts[1]


@torch.no_grad()
def _softmax_minus_onehot_(x: Tensor, real: int, lse: Tensor, local_target: Tensor) -> Tensor:
    """d loss / d x, written over x: exp(x - lse) on real columns, 0 on padded ones, minus 1
    at each token's target (where this rank holds it)."""
    x = x.detach()
    rows = _rows_per_chunk(x)
    for a in range(0, x.shape[0], rows):
        chunk, shift = x[a : a + rows, :real], lse[a : a + rows, None]
        if chunk.dtype == torch.float32:
            chunk.sub_(shift).exp_()
        else:  # bf16 / fp16: exp in fp32, one small temporary per chunk
            chunk.copy_((chunk.float() - shift).exp_())
    x[:, real:] = 0
    mine = ((local_target >= 0) & (local_target < real)).nonzero().squeeze(1)
    x[mine, local_target[mine]] -= 1
    return x


def detached_local(loss: Tensor) -> Tensor:
    """The loss as a detached plain tensor (a DTensor's local value)."""
    local = getattr(loss, "to_local", None)
    return (local() if local is not None else loss).detach()
