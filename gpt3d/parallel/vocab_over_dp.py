"""The token embedding / lm_head table sharded by vocabulary rows over dp_shard, outside FSDP.

FSDP2 keeps the table in the root's group: the root all-gathers it before the forward and
holds it, and from the lm_head's backward on its whole (V, C) gradient too, until the end of
the backward. For GPT-2 medium over 8 ranks that is 0.38 GiB per rank beside 0.7 GiB of
sharded state. `parallel.embedding_sharding = "vocab"` keeps the table a DTensor Shard(0)
over dp_shard that FSDP ignores, and moves the activations instead (Megatron's vocab-parallel
embedding and loss, over the data-parallel ranks):

    embedding  ids (B, T) -> all-gather over dp (dp·B, T) -> this rank's rows looked up,
               zeros for the others' tokens (dp·B, T, C) -> reduce-scatter over the batch
               -> (B, T, C), this rank's sequences again
    head       h (B, T, C) -> all-gather (dp·B, T, C) -> h_all @ rows^T
               -> logits (dp·B, T, V/dp): every rank's tokens, this rank's vocabulary
               columns, a DTensor Shard(2) over dp_shard; gpt3d.loss gathers the targets and
               combines the columns as under loss parallel

Backward: the table's gradient is computed on the local rows from every rank's tokens, so it
is complete where it is made (no reduce-scatter); the hidden states' gradient is
reduce-scattered back over the batch. Per microbatch that moves (dp·B·T) ids and three
(dp·B·T, C) activations instead of the (V, C) table and gradient once a step, so it pays
while the gathered tokens are few next to the vocabulary (`vocab_rows_pay`). Under
pipelining the first stage's wte and the last stage's lm_head (a tied copy) are each sharded
so; their gradients have the same local shards, which the trainer sums over pp as before.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from gpt3d.parallel.vocab_parallel import local_rows_lookup

WHAT = "vocabulary rows over dp_shard"


def why_not_vocab_rows(dims, dp_mode: str) -> str:
    """'' when the table can be sharded by vocabulary rows over dp_shard on this layout, else
    the reason it cannot."""
    needs = [
        (dp_mode == "fsdp", "dp_mode=fsdp"),
        (dims.dp_shard > 1, "dp_shard > 1"),
        (dims.dp_replicate == 1, "no dp_replicate (HSDP)"),
        (dims.tp == 1, "tp = 1 (tp splits the rows already)"),
        (dims.ep == 1, "ep = 1"),
    ]
    missing = [what for ok, what in needs if not ok]
    return f"it needs {', '.join(missing)}" if missing else ""


def vocab_rows_pay(dp_shard: int, tokens_per_microbatch: int, padded_vocab: int) -> bool:
    """The gathered activations (dp·tokens rows, and their gradients) stay well below the
    (V, C) table and gradient they replace: at most half as many rows as the vocabulary."""
    return 2 * dp_shard * tokens_per_microbatch <= padded_vocab


def table_by_rows(asked: str, dims, dp_mode: str, tokens_per_microbatch: int, vocab: int) -> bool:
    """How parallel.embedding_sharding (asked: auto, fsdp or vocab) resolves on a layout:
    rows where they can work and were asked for, or (auto) where they pay."""
    if asked == "fsdp" or why_not_vocab_rows(dims, dp_mode):
        return False
    return asked == "vocab" or vocab_rows_pay(dims.dp_shard, tokens_per_microbatch, vocab)


def shard_table_over_dp(model: nn.Module, dp_mesh, dtype: torch.dtype | None) -> set[nn.Parameter]:
    """Make wte (and lm_head, tied or not) vocabulary-row-sharded over the 1-D dp_shard mesh,
    on the meta device before materialisation; returns the parameters FSDP must ignore.
    dtype: the compute dtype of FSDP's mixed precision (None = the parameters' own)."""
    wte, head = model.wte, model.lm_head
    for module in (wte, head):
        if module is not None and not isinstance(module.weight, DTensor):
            module.weight = nn.Parameter(distribute_tensor(module.weight, dp_mesh, [Shard(0)]))
    if model.config.tie_embeddings and wte is not None and head is not None:
        head.weight = wte.weight
    ignored = {m.weight for m in (wte, head) if m is not None}
    _replace_forward(model.wte, lambda ids: embed_over_dp(ids, model.wte.weight, dtype))
    _replace_forward(model.lm_head, lambda h: head_over_dp(h, model.lm_head.weight, dtype))
    return ignored


def _replace_forward(module: nn.Module | None, forward) -> None:
    if module is not None:  # the collectives stay eager inside a compiled model
        module.forward = torch.compiler.disable(forward)


def embed_over_dp(ids: Tensor, weight: DTensor, dtype: torch.dtype | None) -> Tensor:
    """ids (B, T) of this rank -> its embeddings (B, T, C); weight Shard(0) over dp_shard."""
    group = weight.device_mesh.get_group()
    all_ids = _all_gather_rows(ids.contiguous(), group)  # (dp·B, T), no gradient
    partial = local_rows_lookup(all_ids, weight, dtype)  # (dp·B, T, C), zeros off my rows
    return _ReduceScatterRows.apply(partial, group)  # (B, T, C)


def head_over_dp(h: Tensor, weight: DTensor, dtype: torch.dtype | None) -> DTensor:
    """h (B, T, C) of this rank -> logits of every rank's tokens over this rank's vocabulary
    columns, (dp·B, T, V/dp) locally: a DTensor of global shape (dp·B, T, V), Shard(2)."""
    mesh = weight.device_mesh
    h_all = _AllGatherRows.apply(h, mesh.get_group())  # (dp·B, T, C)
    rows = weight.to_local()  # (V/dp, C); its gradient reaches the parameter as Shard(0)
    logits = F.linear(h_all, rows if dtype is None else rows.to(dtype))
    shape = (h_all.shape[0], h_all.shape[1], weight.shape[0])
    stride = (shape[1] * shape[2], shape[2], 1)
    return DTensor.from_local(logits, mesh, [Shard(2)], run_check=False, shape=shape, stride=stride)


def _all_gather_rows(x: Tensor, group) -> Tensor:
    """(n, ...) on each rank -> (ranks · n, ...), rank r's rows at [r·n, (r+1)·n)."""
    out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
    dist.all_gather_single(out, x, group=group)
    return out


def _reduce_scatter_rows(x: Tensor, group) -> Tensor:
    """(ranks · n, ...) partial sums -> this rank's (n, ...) rows of their sum."""
    x = x.contiguous()
    out = x.new_empty((x.shape[0] // dist.get_world_size(group), *x.shape[1:]))
    dist.reduce_scatter_single(out, x, group=group)
    return out


class _AllGatherRows(torch.autograd.Function):
    """Every rank's rows; the gradient of each rank's rows is summed over the ranks (each
    used them against its own vocabulary columns) and scattered back."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _all_gather_rows(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _reduce_scatter_rows(grad, ctx.group), None


class _ReduceScatterRows(torch.autograd.Function):
    """Partial sums of every rank's rows -> this rank's rows of the sum; backward hands each
    rank every rank's gradient (its rows contributed to all of them)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return _reduce_scatter_rows(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_gather_rows(grad.contiguous(), ctx.group), None
