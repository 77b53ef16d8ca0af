"""Expert parallelism: the MoE experts named by a plan file's [experts] rules, split over the
ep and tp axes, with tokens dispatched to their experts' ranks by all-to-all.

Mesh (torchtitan's layout): ep is borrowed from dp_shard, dp_shard = efsdp x ep with ep
innermost, so all-to-all peers are neighbouring ranks (gpt3d.parallel.dims.expert_mesh; axes
pp, dp_replicate, efsdp, ep, tp). The stacked weights w1 (E, C, H) and w2 (E, H, C) become
DTensors:

    ep > 1   Shard(0) over ep             rank r of the ep group holds experts
                                          [r E/ep, (r+1) E/ep)
    tp > 1   w1 Shard(2), w2 Shard(1)     each expert's hidden dim split over tp (expert
                                          tensor parallel: the dense MLP's column/row split)

and FSDP2 then shards expert-parallel experts over efsdp (gpt3d/parallel/data_parallel.py).
Hooks around GroupedExperts.forward(x, tokens_per_expert) move the rows (x: rows grouped by
global expert, no padding):

    dispatch   all-to-all the (E,) counts; all-to-all the rows (uneven splits) so each rank
               receives its experts' rows, source-major; regroup them expert-major
    tp         into the experts: identity forward, all-reduce of the gradient in backward;
               out of them: all-reduce forward (the hidden slices' partial sums), identity
               backward (Megatron's f and g)
    combine    undo the regrouping, all-to-all the rows back to where they came from

Why experts are split over tp along the hidden dim: tp peers already hold the same tokens
(the MoE input is replicated over tp; gathered under sequence parallel), so this adds no
dispatch traffic, divides the experts' memory and FLOPs by tp like the dense MLP, and keeps
the router and the balancing state replicated. Its cost is an all-reduce of the k routed
copies of each token, (N k, C), instead of the dense MLP's (N, C). Replicating experts over
tp would multiply the largest part of a MoE model by tp; using tp ranks as more ep ranks
needs distinct tokens per tp rank (sequence parallel only) and ep outside dp_shard.

Balancing (sync_expert_balance): the tokens each expert received are summed over every rank
that routed different tokens (the data-parallel axes: not tp peers, which route the same
tokens, nor pipeline stages, which hold other layers) before the bias update, so every
rank's biases stay identical to one process's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gpt3d.errors import PlanError
from gpt3d.moe import (
    GroupedExperts,
    aux_loss_total,
    expert_counts,
    moe_layers,
    reset_moe_stats,
    update_expert_biases,
)

EXPERTS_CLASS = GroupedExperts.__name__


# ---------------------------------------------------------------- plan rules (preflight)


def check_expert_rules(rules, module_types: dict[str, str], path, tp: int, ep: int) -> None:
    """PlanError before any collective: [experts] rules may only name GroupedExperts modules,
    [modules] (tensor-parallel) rules never; with tp or ep > 1 every experts module of a MoE
    model needs an [experts] rule (a dense-only plan would leave them unsplit)."""
    experts = [n for n, t in module_types.items() if t == EXPERTS_CLASS]
    for rule in rules:
        hits = [n for n in module_types if rule.matches(n)]
        wrong = [
            n for n in hits if (module_types[n] == EXPERTS_CLASS) != (rule.section == "experts")
        ]
        if wrong and rule.section == "experts":
            raise PlanError(
                f'plan file {path}: [experts."{rule.glob}"] matches {wrong[0]} '
                f"({module_types[wrong[0]]}); expert rules apply to the MoE experts "
                "(GroupedExperts), e.g. h.*.moe.experts"
            )
        if wrong:
            raise PlanError(
                f'plan file {path}: [modules."{rule.glob}"] matches the MoE experts {wrong[0]}; '
                'tensor-parallel styles cannot split stacked experts: name them under [experts."'
                f'{rule.glob}"] with style = "expert_parallel"'
            )
    expert_rules = [r for r in rules if r.section == "experts"]
    uncovered = [n for n in experts if not any(r.matches(n) for r in expert_rules)]
    if uncovered and (tp > 1 or ep > 1):
        raise PlanError(
            f"plan file {path} has no [experts] rule for the MoE experts {uncovered[0]} "
            f"(parallel.tp={tp}, parallel.ep={ep}): a dense-only plan cannot split them; use "
            'the shipped parallel.plan=gpt_moe (gpt_moe_sp), or add [experts."h.*.moe.experts"] '
            'style = "expert_parallel"'
        )


# ---------------------------------------------------------------- sharding + hooks


def apply_expert_parallel(model: nn.Module, rules, emesh, tp_mesh) -> list[nn.Module]:
    """Shard the experts this (stage) model holds that [experts] rules name, over emesh's
    ep axis (emesh None: ep == 1) and tp_mesh (None: tp == 1); register the dispatch hooks.
    Returns the expert-parallel modules, which data parallelism shards over efsdp."""
    if emesh is None and tp_mesh is None:
        return []
    if emesh is not None and tp_mesh is not None:
        mesh = emesh["ep", "tp"]
    else:
        mesh = emesh["ep"] if emesh is not None else tp_mesh
    sharded = []
    for name, module in model.named_modules():
        if any(r.section == "experts" and r.matches(name) for r in rules):
            _shard_weights(module, mesh, ep=emesh is not None, tp=tp_mesh is not None)
            Dispatcher(module, mesh, emesh is not None, tp_mesh is not None)
            sharded.append(module)
    return sharded if emesh is not None else []


def _shard_weights(experts: nn.Module, mesh, ep: bool, tp: bool) -> None:
    """w1 (E, C, H), w2 (E, H, C) -> DTensor parameters: experts over ep (dim 0), hidden over
    tp (w1 dim 2, w2 dim 1). Built on the meta device: no communication."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for name, hidden_dim in (("w1", 2), ("w2", 1)):
        placements = ([Shard(0)] if ep else []) + ([Shard(hidden_dim)] if tp else [])
        full = getattr(experts, name)
        shard = distribute_tensor(full.data, mesh, placements, src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(shard, requires_grad=full.requires_grad))


class Dispatcher:
    """Forward pre-hook / forward hook pair on one experts module. The routing of the call
    in flight (splits, regrouping order) lives here between the two hooks: each forward call
    (activation-checkpoint recomputes included) runs both before the next begins."""

    def __init__(self, experts: nn.Module, mesh, ep: bool, tp: bool):
        self.ep_group = mesh.get_group("ep") if ep else None
        self.ep = dist.get_world_size(self.ep_group) if ep else 1
        self.tp_group = mesh.get_group("tp") if tp else None
        self.routing = None
        experts.register_forward_pre_hook(self.dispatch)
        experts.register_forward_hook(self.combine)

    def dispatch(self, module, args):
        x, counts = args  # (R, C) rows grouped by global expert; (E,) rows per expert
        if self.ep_group is not None:
            x, counts = self._exchange(x, counts)
        if self.tp_group is not None:
            x = _CopyToTP.apply(x, self.tp_group)
        return x, counts

    def combine(self, module, args, y):
        if self.tp_group is not None:
            y = _ReduceFromTP.apply(y, self.tp_group)  # (R_local, C) sum of hidden slices
        if self.ep_group is None:
            return y
        order, in_splits, out_splits = self.routing
        self.routing = None
        y = y[torch.argsort(order)]  # expert-major -> source-major
        with torch.profiler.record_function("ep.all_to_all"):
            return _AllToAll.apply(y, in_splits, out_splits, self.ep_group)  # (R, C)

    def _exchange(self, x: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        P = self.ep
        with torch.profiler.record_function("ep.all_to_all"):
            received = torch.empty_like(counts)  # (P * E_local,): source s's rows per expert
            dist.all_to_all_single(received, counts, group=self.ep_group)
            by_source = received.view(P, -1)  # (P, E_local)
            in_splits = counts.view(P, -1).sum(1).tolist()  # rows to each rank (host sync)
            out_splits = by_source.sum(1).tolist()  # rows from each rank
            x = _AllToAll.apply(x, out_splits, in_splits, self.ep_group)  # (R_local, C)
        order = expert_major_order(by_source)
        self.routing = (order, in_splits, out_splits)
        return x[order], by_source.sum(0)  # rows grouped by local expert, (E_local,)


def expert_major_order(by_source: Tensor) -> Tensor:
    """by_source: (P, E_local) rows received from each source rank for each local expert,
    the received rows laid out source-major (source 0's expert 0, expert 1, ..., source 1's
    ...). Returns the index (R,) that groups them expert-major, sources in order within each
    expert (a stable sort by local expert id)."""
    P, E = by_source.shape
    expert_of_segment = torch.arange(E, device=by_source.device).repeat(P)  # (P*E,)
    expert_of_row = torch.repeat_interleave(expert_of_segment, by_source.flatten())  # (R,)
    return torch.argsort(expert_of_row, stable=True)


class _AllToAll(torch.autograd.Function):
    """Rows of x (R_in, C) go to the ranks of `group` in in_splits-sized runs; out_splits
    rows come back from each. Backward sends the gradients the reverse way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        with torch.profiler.record_function("ep.all_to_all"):
            dx = grad.new_empty((sum(in_splits), *grad.shape[1:]))
            dist.all_to_all_single(dx, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return dx, None, None, None


class _CopyToTP(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient over tp in backward (each tp rank's
    hidden slice contributes part of the input's gradient)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce over tp forward (sum the hidden slices' partial outputs); identity
    backward (the summed output's gradient is what every slice needs)."""

    @staticmethod
    def forward(ctx, y, group):
        y = y.contiguous().clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


# ---------------------------------------------------------------- balancing, per step


@torch.no_grad()
def sync_expert_balance(chunks: list[nn.Module], mesh) -> dict[str, float]:
    """After the optimizer step, before the next forward (collective over dp and pp): sum
    this step's tokens per expert over the data-parallel axes, update every layer's
    balancing bias, reset the counters; return the step's MoE metrics for the log:

        moe_load_max / moe_load_mean   max / mean over MoE layers of max_e(tokens_e) /
                                       mean_e(tokens_e): 1.0 is perfect balance
        moe_bias_spread                max over layers of max(bias) - min(bias)
        moe_aux_loss                   the sequence-wise aux loss added this step (scaled)"""
    dp_groups = (
        []
        if mesh is None
        else [mesh[a].get_group() for a in ("dp_replicate", "dp_shard") if mesh[a].size() > 1]
    )
    pp_group = mesh["pp"].get_group() if mesh is not None and mesh["pp"].size() > 1 else None
    loads, spread, aux = [], 0.0, 0.0
    for chunk in chunks:
        counts = expert_counts(chunk)  # (L, E) tokens this rank routed
        if counts.numel():
            for group in dp_groups:
                dist.all_reduce(counts, group=group)
            update_expert_biases(chunk, counts)
            c = counts.double()
            loads += (c.max(1).values / c.mean(1).clamp(min=1e-9)).tolist()
            spread = max(
                [spread]
                + [
                    float(m.expert_bias.max() - m.expert_bias.min())
                    for m in moe_layers(chunk).values()
                ]
            )
        aux += aux_loss_total(chunk).item()
        reset_moe_stats(chunk)
    device = "cpu" if mesh is None else mesh.device_type
    aux_t = torch.tensor([aux], dtype=torch.float64, device=device)
    for group in dp_groups:  # each dp rank added its own sequences' share
        dist.all_reduce(aux_t, group=group)
    total = torch.tensor([aux_t.item(), sum(loads), len(loads)], dtype=torch.float64)
    worst = torch.tensor([max(loads, default=0.0), spread], dtype=torch.float64)
    if pp_group is not None:  # stages hold different layers
        total, worst = total.to(device), worst.to(device)
        dist.all_reduce(total, group=pp_group)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=pp_group)
    aux, load_sum, n = total.tolist()
    return {
        "moe_load_max": worst[0].item(),
        "moe_load_mean": load_sum / max(n, 1.0),
        "moe_bias_spread": worst[1].item(),
        "moe_aux_loss": aux,
    }
