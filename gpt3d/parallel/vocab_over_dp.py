"""The token embedding / lm_head table sharded by vocabulary rows over dp_shard (× tp), outside
FSDP.

FSDP2 keeps the table in the root's group: the root all-gathers it before the forward and
holds it, and from the lm_head's backward on its whole (V, C) gradient too, until the end of
the backward. For GPT-2 medium over 8 ranks that is 0.38 GiB per rank beside 0.7 GiB of
sharded state. `parallel.embedding_sharding = "vocab"` keeps the table a DTensor Shard(0)
that FSDP ignores, and moves the activations instead (Megatron's vocab-parallel embedding
and loss, over the data-parallel ranks). With tensor parallelism the plan file's
vocab-parallel wte / lm_head rules are set aside and the rows are split over the flattened
(dp_shard, tp) mesh: rank (d, t) holds rows block d·tp + t, and each rank brings 1/tp of its
dp rank's sequence (its sequence-parallel slice), so every token is handled once:

    embedding  ids (B, T) -> this rank's slice (B, T/tp) -> all-gather over the n = dp·tp
               ranks (n·B, T/tp) -> this rank's rows looked up, zeros for the others' tokens
               (n·B, T/tp, C) -> reduce-scatter -> (B, T/tp, C), this rank's tokens again;
               without sequence parallelism all-gathered over tp into (B, T, C)
    head       h (B, T/tp, C) (without SP: this rank's slice of h (B, T, C)) -> all-gather
               over the n ranks -> in batch order (dp·B, T, C) -> h_all @ rows^T
               -> logits (dp·B, T, V/n): every dp rank's tokens, this rank's vocabulary
               columns, a DTensor Shard(2) over the rows' mesh; gpt3d.loss gathers the
               targets and combines the columns as under loss parallel

Backward: the table's gradient is computed on the local rows from every rank's tokens, so it
is complete where it is made (no reduce-scatter); the hidden states' gradient is
reduce-scattered back to the ranks' slices (and, without SP, all-gathered over tp into the
whole replicated gradient). Per microbatch that moves (dp·B·T) ids and three (dp·B·T, C)
activations instead of the (V/tp, C) table and gradient once a step, so it pays while the
gathered tokens are few next to the rows it replaces (`vocab_rows_pay`). Under pipelining
the first stage's wte and the last stage's lm_head (a tied copy) are each sharded so; their
gradients have the same local shards, which the trainer sums over pp as before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from gpt3d.parallel.vocab_parallel import all_gather_sequence, local_rows_lookup, sequence_slice

WHAT = "vocabulary rows over dp_shard"
TABLE_MODULES = ("wte", "lm_head")  # the plan rules the rows replace under tp


def why_not_vocab_rows(dims, dp_mode: str, seq_len: int = 0, plan_why_not: str = "") -> str:
    """'' when the table can be sharded by vocabulary rows over dp_shard (× tp) on this
    layout, else the reason it cannot. plan_why_not: table_rules_why_not of the plan (tp > 1).
    """
    tp = dims.tp
    needs = [
        (dp_mode == "fsdp", "dp_mode=fsdp"),
        (dims.dp_shard > 1, "dp_shard > 1"),
        (dims.dp_replicate == 1, "no dp_replicate (HSDP)"),
        (dims.ep == 1, "ep = 1"),
        (tp == 1 or seq_len % tp == 0, f"training.seq_len divisible by tp ({tp})"),
        (tp == 1 or not plan_why_not, plan_why_not),
    ]
    missing = [what for ok, what in needs if not ok]
    return f"it needs {', '.join(missing)}" if missing else ""


def table_rules_why_not(rules, loss_parallel: bool) -> str:
    """'' when a tensor-parallel plan treats the table as gpt3d's shipped plans do, so the
    rows can stand in for its wte / lm_head rules: wte `rowwise` from replicated ids to
    replicated or sequence-split (shard(1)) embeddings, lm_head `colwise` from that same
    layout to vocabulary-split logits kept a DTensor (use_local_output = false), and
    parallel.loss_parallel on."""
    wte, head = (_rule_for(rules, name) for name in TABLE_MODULES)
    seq = _layout(wte, "output_layouts", "replicate")
    ok = [
        (wte is not None and wte.style == "rowwise", "a rowwise wte rule"),
        (_layout(wte, "input_layouts", "") == "replicate", "wte input_layouts = replicate"),
        (seq in ("replicate", "shard(1)"), "wte output_layouts replicate or shard(1)"),
        (wte is None or wte.options.get("use_local_output", True), "wte use_local_output"),
        (head is not None and head.style == "colwise", "a colwise lm_head rule"),
        (_layout(head, "input_layouts", "replicate") == seq, "lm_head input_layouts = wte's out"),
        (_layout(head, "output_layouts", "") in ("shard(-1)", "shard(2)"), "vocab-split logits"),
        (head is None or head.options.get("use_local_output") is False, "DTensor logits"),
        (loss_parallel, "parallel.loss_parallel"),
    ]
    missing = ", ".join(what for good, what in ok if not good)
    return f"the table rules of gpt3d's shipped plans ({missing})" if missing else ""


def sequence_split(rules) -> bool:
    """Whether the plan hands the blocks sequence-split embeddings (wte's output shard(1))."""
    return _layout(_rule_for(rules, "wte"), "output_layouts", "replicate") == "shard(1)"


def without_table_rules(rules) -> tuple:
    """The plan's rules minus those for wte / lm_head (the rows stand in for them)."""
    return tuple(r for r in rules if not any(r.matches(name) for name in TABLE_MODULES))


def _rule_for(rules, name: str):
    return next((r for r in rules if r.section == "modules" and r.matches(name)), None)


def _layout(rule, key: str, default: str) -> str:
    value = default if rule is None else rule.options.get(key, default)
    return "".join(str(value).split()).lower()


def vocab_rows_pay(dp_shard: int, tokens_per_microbatch: int, padded_vocab: int, tp: int = 1):
    """The gathered activations (dp·tokens rows, and their gradients) stay well below the
    (V/tp, C) table and gradient they replace: at most half as many rows."""
    return 2 * dp_shard * tokens_per_microbatch * tp <= padded_vocab


def table_by_rows(
    asked: str, dims, dp_mode: str, tokens: int, vocab: int, seq_len: int, plan_why_not=""
) -> bool:
    """How parallel.embedding_sharding (asked: auto, fsdp or vocab) resolves on a layout:
    rows where they can work (why_not_vocab_rows) and were asked for, or (auto) where they
    pay. tokens: per microbatch and dp rank; plan_why_not: table_rules_why_not (tp > 1)."""
    if asked == "fsdp" or why_not_vocab_rows(dims, dp_mode, seq_len, plan_why_not):
        return False
    return asked == "vocab" or vocab_rows_pay(dims.dp_shard, tokens, vocab, dims.tp)


def rows_what(tp: int) -> str:
    """How the log names where the rows live."""
    return WHAT + (" x tp" if tp > 1 else "")


@dataclass(frozen=True)
class RowsLayout:
    """Where the table's rows live and what the blocks around them take."""

    mesh: object  # 1-D: dp_shard, or (dp_shard, tp) flattened; rank r holds rows block r
    tp_group: object | None  # the tp group when tp > 1
    seq_split: bool  # the blocks take (B, T/tp, C) (sequence parallel), else (B, T, C)


def rows_layout(mesh, dims, rules) -> RowsLayout:
    """The rows' layout for this run; with tp > 1 it flattens (dp_shard, tp) into a new
    1-D mesh (process groups: call once)."""
    if dims.tp == 1:
        return RowsLayout(mesh["dp_shard"], None, False)
    flat = mesh["dp_shard", "tp"]._flatten("dp_shard_tp")
    return RowsLayout(flat, mesh["tp"].get_group(), sequence_split(rules))


def shard_table_over_dp(
    model: nn.Module, rows: RowsLayout, dtype: torch.dtype | None
) -> set[nn.Parameter]:
    """Make wte (and lm_head, tied or not) vocabulary-row-sharded over rows.mesh, on the meta
    device before materialisation; returns the parameters FSDP must ignore.
    dtype: the compute dtype of FSDP's mixed precision (None = the parameters' own)."""
    wte, head = model.wte, model.lm_head
    for module in (wte, head):
        if module is not None and not isinstance(module.weight, DTensor):
            module.weight = nn.Parameter(distribute_tensor(module.weight, rows.mesh, [Shard(0)]))
    if model.config.tie_embeddings and wte is not None and head is not None:
        head.weight = wte.weight
    ignored = {m.weight for m in (wte, head) if m is not None}
    _replace_forward(model.wte, lambda ids: embed_over_dp(ids, model.wte.weight, dtype, rows))
    _replace_forward(model.lm_head, lambda h: head_over_dp(h, model.lm_head.weight, dtype, rows))
    return ignored


def _replace_forward(module: nn.Module | None, forward) -> None:
    if module is not None:  # the collectives stay eager inside a compiled model
        module.forward = torch.compiler.disable(forward)


def embed_over_dp(ids: Tensor, weight: DTensor, dtype, rows: RowsLayout) -> Tensor:
    """ids (B, T) of this rank -> its embeddings (B, T, C), or (B, T/tp, C) under sequence
    parallelism; weight Shard(0) over rows.mesh."""
    group, tp = weight.device_mesh.get_group(), rows.tp_group
    mine = ids if tp is None else sequence_slice(ids, tp)  # (B, T/tp): the tokens I embed
    all_ids = _all_gather_rows(mine.contiguous(), group)  # (n·B, T/tp), no gradient
    partial = local_rows_lookup(all_ids, weight, dtype)  # (n·B, T/tp, C), zeros off my rows
    # this rank's tokens' sums; backward hands every rank every token's gradient
    x = _adjoint_pair(partial, group, _reduce_scatter_rows, _all_gather_rows)  # (B, T/tp, C)
    if tp is not None and not rows.seq_split:  # the gradient arrives whole on every tp rank
        x = _adjoint_pair(x, tp, all_gather_sequence, sequence_slice)  # (B, T, C)
    return x


def head_over_dp(h: Tensor, weight: DTensor, dtype, rows: RowsLayout) -> DTensor:
    """h (B, T, C) of this rank (under sequence parallelism (B, T/tp, C), local or ln_f's
    Shard(1) DTensor) -> logits of every dp rank's tokens over this rank's vocabulary
    columns, (dp·B, T, V/n) locally: a DTensor of global shape (dp·B, T, V), Shard(2)."""
    mesh, tp = weight.device_mesh, rows.tp_group
    if isinstance(h, DTensor):  # its gradient goes back as the same Shard(1)
        h = h.to_local()
    elif tp is not None and not rows.seq_split:
        # (B, T/tp, C): this rank's share of the tokens; the slices' complete gradients
        # are gathered back into the whole one, the same on every tp rank
        h = _adjoint_pair(h, tp, sequence_slice, all_gather_sequence)
    group = mesh.get_group()
    # (n·B, T/tp, C) in rank order; each rank's rows' gradient is summed over the ranks
    # (each used them against its own vocabulary columns) and scattered back
    gathered = _adjoint_pair(h, group, _all_gather_rows, _reduce_scatter_rows)
    h_all = _in_batch_order(gathered, dist.get_world_size(group), _size(tp))  # (dp·B, T, C)
    mine = weight.to_local()  # (V/n, C); its gradient reaches the parameter as Shard(0)
    logits = F.linear(h_all, mine if dtype is None else mine.to(dtype))
    shape = (h_all.shape[0], h_all.shape[1], weight.shape[0])
    stride = (shape[1] * shape[2], shape[2], 1)
    return DTensor.from_local(logits, mesh, [Shard(2)], run_check=False, shape=shape, stride=stride)


def _in_batch_order(x: Tensor, ranks: int, tp: int) -> Tensor:
    """(dp·tp·B, T/tp, C), rank (d, t)'s block at d·tp + t -> (dp·B, T, C): dp rank d's
    sequences whole, in order (a copy when tp > 1, a view otherwise; autograd inverts it)."""
    dp, b = ranks // tp, x.shape[0] // ranks
    blocks = x.view(dp, tp, b, *x.shape[1:]).transpose(1, 2)  # (dp, B, tp, T/tp, C)
    return blocks.reshape(dp * b, tp * x.shape[1], x.shape[2])


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


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _adjoint_pair(x: Tensor, group, forward, backward) -> Tensor:
    """forward(x, group), whose gradient is backward(grad, group): the collectives here come
    in adjoint pairs (all-gather / reduce-scatter over rows, sequence gather / slice)."""
    return _AdjointPair.apply(x, group, forward, backward)


class _AdjointPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, forward, backward) -> Tensor:
        ctx.group, ctx.adjoint = group, backward
        return forward(x.contiguous(), group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.adjoint(grad.contiguous(), ctx.group), None, None, None
