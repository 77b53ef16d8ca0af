"""The vocab-parallel token embedding (Megatron's VocabParallelEmbedding) as a ParallelStyle.

A plan's `style = "rowwise"` on an nn.Embedding means: the table is split by rows over tp
(weight Shard(0)), token ids come in replicated, and the embeddings leave replicated
(`output_layouts = "replicate"`) or split over the sequence for sequence parallelism
(`"shard(1)"`). torch's RowwiseParallel does this through DTensor, and its forward is right,
but in torch 2.13 the table's gradient comes back Replicate: every tp rank zero-fills and
scatters a full (vocab, n_embd) gradient per microbatch (51 MiB at GPT-2's vocabulary and
256 wide), and the rows that are not its own are then cut off again.

`VocabParallelEmbedding` keeps the placements and does the work on the local rows only:

    ids (B, T) replicated -> local ids = ids - first row; out-of-range ids read row 0
    partial = F.embedding(local ids, local rows) with out-of-range tokens zeroed  (B, T, C)
    out = all-reduce(partial) (B, T, C)  or  reduce-scatter over T (B, T/tp, C)

Its backward is the identity (all-gather over T for the reduce-scatter) followed by
F.embedding's own backward on the local (vocab/tp, n_embd) rows, which arrives at the
parameter as a Shard(0) DTensor gradient. The values are exactly torch's: every token's
embedding is one rank's row plus zeros. Any other layout falls back to torch's style.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.parallel import RowwiseParallel


class VocabParallelEmbedding(RowwiseParallel):
    """RowwiseParallel for an nn.Embedding with replicated ids, computed on the local rows."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        (into,), (out,) = self.input_layouts, self.output_layouts
        seq_split = out == Shard(1)
        ours = isinstance(module, nn.Embedding) and into == Replicate()
        if not ours or out not in (Replicate(), Shard(1)):  # torch's style covers the rest
            return super()._apply(module, device_mesh)
        distribute_module(module, device_mesh, self._partition_embedding_fn)  # weight Shard(0)
        use_local = self.use_local_output

        def forward(ids: Tensor) -> Tensor:  # replaces nn.Embedding.forward on this instance
            y = vocab_parallel_embedding(ids, module.weight, seq_split)
            if use_local:
                return y
            return DTensor.from_local(y, device_mesh, [Shard(1) if seq_split else Replicate()])

        module.forward = forward
        return module


def vocab_parallel_embedding(ids: Tensor, weight, seq_split: bool) -> Tensor:
    """ids (B, T) (the same on every tp rank); weight: a DTensor Shard(0) over a 1-D tp mesh
    -> the embeddings (B, T, C), or this rank's sequence slice (B, T/tp, C) if seq_split."""
    if isinstance(ids, DTensor):
        ids = ids.to_local()
    partial = local_rows_lookup(ids, weight)
    group = weight.device_mesh.get_group()
    if seq_split:
        return _ReduceScatterSequence.apply(partial, group)
    return _AllReduce.apply(partial, group)


def local_rows_lookup(ids: Tensor, weight, dtype: torch.dtype | None = None) -> Tensor:
    """ids (..., T) of the whole table; weight: a DTensor Shard(0) over a 1-D mesh -> the
    embeddings (..., T, C) of the ids in this rank's rows, zeros for the others (in dtype)."""
    mesh = weight.device_mesh
    _, (first, _) = compute_local_shape_and_global_offset(weight.shape, mesh, weight.placements)
    rows = weight.to_local()  # (V/n, C); its gradient reaches the parameter as Shard(0)
    if dtype is not None:
        rows = rows.to(dtype)
    local = ids - first
    outside = (local < 0) | (local >= rows.shape[0])
    partial = F.embedding(local.masked_fill(outside, 0), rows)
    return partial.masked_fill(outside.unsqueeze(-1), 0.0)  # other ranks' tokens


class _AllReduce(torch.autograd.Function):
    """Sum of the ranks' partial embeddings; every partial gets the whole gradient back."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)  # x is this function's own fresh tensor
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _ReduceScatterSequence(torch.autograd.Function):
    """(B, T, C) partial sums -> this rank's (B, T/tp, C) slice of their sum; backward
    all-gathers the slices' gradients over T. The collectives run over dim 0, so T goes
    first: (T, B, C)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        n = dist.get_world_size(group)
        seq_first = x.transpose(0, 1).contiguous()  # (T, B, C)
        out = seq_first.new_empty((seq_first.shape[0] // n, *seq_first.shape[1:]))
        dist.reduce_scatter_single(out, seq_first, group=group)
        return out.transpose(0, 1).contiguous()  # (B, T/tp, C)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return all_gather_sequence(grad, ctx.group), None


def all_gather_sequence(piece: Tensor, group) -> Tensor:
    """(B, T/n, C) on each of the group's n ranks -> (B, T, C), rank r's slice at
    [r·T/n, (r+1)·T/n). The collective runs over dim 0, so T goes first."""
    n = dist.get_world_size(group)
    seq_first = piece.transpose(0, 1).contiguous()  # (T/n, B, C)
    whole = seq_first.new_empty((seq_first.shape[0] * n, *seq_first.shape[1:]))
    dist.all_gather_single(whole, seq_first, group=group)
    return whole.transpose(0, 1).contiguous()


def sequence_slice(x: Tensor, group) -> Tensor:
    """(B, T, ...) the same on the group's n ranks -> this rank's (B, T/n, ...) slice."""
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    step = x.shape[1] // n
    return x[:, rank * step : (rank + 1) * step].contiguous()
