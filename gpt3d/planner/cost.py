"""Step time from an explicit cost model, per optimizer step, on the slowest pipeline rank.

  compute    FLOPs / (peak(dtype) x compute_efficiency x share). Per token and block:
             6 x 12C^2 + 12 C s (PaLM appendix B; the attention term counts the full s x s
             product), + 2 x 12C^2 + 4 C s when the block is recomputed (activation
             checkpointing = one more forward); the lm_head adds 6 V C on the last stage.
             Everything inside a block and the head divide by tp.
  tp comm    per block and microbatch 4 all-reduces of (b, s, C) (2 forward, 2 backward;
             +2 when recomputed); with sequence parallelism each becomes an all-gather plus a
             reduce-scatter (same bytes, the cheaper-on-paper pair; on gloo reduce-scatter is
             slower, which calibrated profiles capture). Embedding: 1 more; lm_head: 1 more
             plus 3 small all-reduces of the vocab-parallel loss. Never overlapped (gpt3d has
             no async TP).
  bubble     bubble_units(schedule) x one microbatch's (compute + tp comm) on the slowest rank
             (gpt3d/planner/schedules.py).
  pp comm    point-to-point transfers of (b, s, C) (/tp under SP): the fill and drain of the
             pipeline, 2 (p v - 1), are exposed; of the steady state's 2 v m per rank the
             share (1 - comm_overlap) (torch's sends/receives are asynchronous).
  dp comm    FSDP: all-gather of the parameters in the param dtype twice per microbatch
             (forward, backward re-gather) and reduce-scatter of fp32 gradients once; with
             pp > 1 once per step (reshard_after_forward=False, gradient sync only on the
             last microbatch), per microbatch with parallel.fsdp_reshard_per_microbatch. A
             table sharded by vocabulary rows (parallel.embedding_sharding) is not gathered:
             per microbatch three (dp_shard tokens, C) all-gather-sized transfers instead.
             HSDP adds an all-reduce of the shard over dp_replicate. DDP: one all-reduce of
             fp32 gradients. Hidden behind comm_overlap x the compute it
             can overlap (all microbatches without pp, one with pp), never below
             `dp_exposed` of it (default 1 / (FSDP units + 1): the first all-gather and the
             last reduce-scatter have nothing to hide behind).
  optimizer  fused AdamW + clipping stream ~32 bytes per local parameter through memory.
Ring costs: all-reduce 2(n-1)/n x bytes, all-gather / reduce-scatter (n-1)/n x bytes,
send/recv bytes, each over the busbw of the link the mesh axis uses (gpt3d/planner/hardware.py).
More processes than cores (CPU) divide compute and communication rates alike by the share.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt3d.planner.hardware import GB, Cluster
from gpt3d.planner.layout import Layout, Workload, ddp_wrapper
from gpt3d.planner.memory import DTYPE_BYTES, ParamCounts, checkpointed, stage_params
from gpt3d.planner.schedules import bubble_units, local_stages


@dataclass(frozen=True)
class TimeBreakdown:
    """Seconds per optimizer step."""

    compute: float
    tp_comm: float
    pp_bubble: float
    pp_comm: float
    dp_comm: float  # the exposed part
    optimizer: float
    dp_comm_total: float = 0.0  # before overlap
    overhead: float = 0.0  # framework work per op (calibrated CPU profiles only)

    @property
    def step(self) -> float:
        return (
            self.compute
            + self.tp_comm
            + self.pp_bubble
            + self.pp_comm
            + self.dp_comm
            + self.optimizer
            + self.overhead
        )


@dataclass(frozen=True)
class RankWork:
    """One pipeline rank's work per microbatch and what it holds."""

    compute: float  # seconds
    tp_comm: float  # seconds
    numel: float  # parameters per tp rank (unsharded over dp)
    blocks: int


def estimate_time(w: Workload, lay: Layout, cluster: Cluster, dp_exposed: float | None = None):
    """The step on the slowest pipeline rank; dp_exposed overrides the exposed-DP floor."""
    from gpt3d.parallel.pipeline import layer_split

    splits = layer_split(w.model.n_layer, lay.n_stages)
    work = [rank_work(w, lay, cluster, r, splits) for r in range(lay.pp)]
    slow = max(work, key=lambda r: r.compute + r.tp_comm)
    biggest = max(work, key=lambda r: r.numel)  # holds the most parameters: the most traffic
    n = lay.n_microbatches
    per_mb, per_step = overheads(w, lay, cluster, slow.blocks)
    busy = slow.compute + slow.tp_comm + per_mb  # one microbatch on the slowest rank
    bubble = bubble_units(lay.schedule, lay.pp, lay.stages_per_rank) * busy
    if cluster.crowded:  # more processes than cores: a rank idle in the bubble yields its
        bubble = 0.0  # core to the others, whose time-sliced work is already in busy / share
    total = dp_comm(w, lay, cluster, biggest.numel) / cluster.comm_share
    hideable = cluster.hw.comm_overlap * slow.compute * (1 if lay.pp > 1 else n)
    floor = dp_exposed if dp_exposed is not None else 1.0 / (biggest.blocks + 2)
    exposed = max(total - hideable, floor * total)
    pp = pp_comm(w, lay, cluster) / cluster.comm_share
    optimizer = optimizer_time(lay, cluster, biggest.numel)
    return TimeBreakdown(
        n * slow.compute,
        n * slow.tp_comm,
        bubble,
        pp,
        exposed,
        optimizer,
        total,
        n * per_mb + per_step,
    )


def overheads(w, lay: Layout, cluster: Cluster, blocks: int) -> tuple[float, float]:
    """(seconds per microbatch, per step) of framework work from a calibrated profile's
    overhead_s (gpt3d/planner/overheads.py): per block and microbatch, the plain cost plus
    the tp / FSDP / DDP wrapper's; per step, a fixed part plus pipeline schedule actions
    (an F and a B per local stage and microbatch)."""
    o = cluster.hw.overhead_s
    if not o:
        return 0.0, 0.0
    fsdp, ddp = lay.dp > 1 and lay.dp_mode == "fsdp", ddp_wrapper(w, lay)
    block = o["block"] + o["tp"] * (lay.tp > 1) + o["fsdp"] * fsdp + o["ddp"] * ddp
    actions = 2 * lay.microbatches * lay.stages_per_rank if lay.pp > 1 else 0
    share = cluster.compute_share
    return blocks * block / share, (o["step"] + actions * o["pp_action"]) / share


def optimizer_time(lay: Layout, cluster: Cluster, numel: float) -> float:
    """Fused AdamW + grad clipping: ~32 bytes per local parameter through memory."""
    shard = lay.dp_shard if lay.dp_mode == "fsdp" else 1
    return 32 * numel / shard / (cluster.hw.mem_gbps * GB * cluster.compute_share)


def rank_work(w: Workload, lay: Layout, cluster: Cluster, rank: int, splits) -> RankWork:
    cfg, s = w.model, w.seq_len
    tokens = lay.microbatch_size(w.global_batch) * s
    counts = ParamCounts.of(cfg, lay.tp)
    rate = cluster.hw.peak_flops(w.dtype) * cluster.efficiency * cluster.compute_share
    C, V, mm = cfg.n_embd, cfg.padded_vocab_size, 12 * cfg.n_embd**2
    coll = tp_collective(w, lay, cluster, tokens)
    stages = local_stages(lay.schedule, rank, lay.pp, lay.stages_per_rank) if lay.pp > 1 else [0]
    flops = comm = numel = 0.0
    blocks = 0
    moe_mm = 4 * C * C + C * cfg.n_experts + 2 * cfg.moe_top_k * C * cfg.expert_hidden
    for st in stages:
        layers = splits[st]
        k = checkpointed(lay, layers, w.ac_every)
        last = st == lay.n_stages - 1
        moe = sum(cfg.is_moe_layer(i) for i in layers)
        flops += (len(layers) - moe) * 6 * mm + moe * 6 * moe_mm + len(layers) * 12 * C * s
        flops += k * (2 * mm + 4 * C * s) + 6 * V * C * last
        # a MoE block's experts all-reduce k routed copies of each token over tp (forward
        # output, backward input gradient) instead of the MLP's one
        comm += (4 * len(layers) + 2 * k + (st == 0) + last + 2 * moe * (cfg.moe_top_k - 1)) * coll
        comm += 4 * moe * ep_all_to_all(w, lay, cluster, tokens)
        comm += 3 * last * tp_link(lay, cluster).time("all_reduce", lay.tp, 4 * tokens)
        numel += stage_params(cfg, counts, lay, st, layers)[0]
        blocks += len(layers)
    return RankWork(flops * tokens / lay.tp / rate, comm / cluster.comm_share, numel, blocks)


def ep_all_to_all(w: Workload, lay: Layout, cluster: Cluster, tokens: int) -> float:
    """One all-to-all of the routed rows (tokens x top_k, C) over ep (dispatch or combine,
    forward or backward): (ep - 1) / ep of them leave, at the point-to-point bandwidth."""
    if lay.ep == 1:
        return 0.0
    link = cluster.link(lay.tp, lay.ep)  # ep is dp_shard's innermost part, next to tp
    nbytes = tokens * w.model.moe_top_k * w.model.n_embd * DTYPE_BYTES[w.dtype]
    return link.latency_s + (lay.ep - 1) / lay.ep * nbytes / (link.p2p * GB)


def tp_link(lay: Layout, cluster: Cluster):
    return cluster.link(1, lay.tp)


def tp_collective(w: Workload, lay: Layout, cluster: Cluster, tokens: int) -> float:
    """Seconds of one tensor-parallel activation collective of (b, s, C)."""
    if lay.tp == 1:
        return 0.0
    link, nbytes = tp_link(lay, cluster), tokens * w.model.n_embd * DTYPE_BYTES[w.dtype]
    if lay.sequence_parallel:
        return link.time("all_gather", lay.tp, nbytes) + link.time("reduce_scatter", lay.tp, nbytes)
    return link.time("all_reduce", lay.tp, nbytes)


def pp_comm(w: Workload, lay: Layout, cluster: Cluster) -> float:
    if lay.pp == 1:
        return 0.0
    tokens = lay.microbatch_size(w.global_batch) * w.seq_len
    nbytes = (
        tokens * w.model.n_embd * DTYPE_BYTES[w.dtype] / (lay.tp if lay.sequence_parallel else 1)
    )
    link = cluster.link(lay.tp * lay.dp, lay.pp)
    steady = 2 * lay.stages_per_rank * lay.microbatches * (1 - cluster.hw.comm_overlap)
    return (2 * (lay.n_stages - 1) + steady) * link.time("p2p", 2, nbytes)


def dp_comm(w: Workload, lay: Layout, cluster: Cluster, numel: float) -> float:
    """Seconds of data-parallel traffic per step (before any overlap)."""
    if lay.dp == 1:
        return 0.0
    per_microbatch = lay.pp == 1 or lay.reshard_per_microbatch
    syncs = lay.n_microbatches if per_microbatch else 1
    shard_link = cluster.link(lay.tp, lay.dp_shard)
    rep_link = cluster.link(lay.tp * lay.dp_shard, lay.dp_replicate)
    grads = 4 * numel  # fp32 gradient reduction (MixedPrecisionPolicy reduce_dtype)
    if lay.dp_mode == "ddp":
        return syncs * rep_link.time("all_reduce", lay.dp_replicate, grads)
    gathers = 1 if lay.fsdp_whole_stage else 2
    rows = 0.0  # the table sharded by vocabulary rows: activations move instead, per microbatch
    if lay.table_by_rows(w):
        C, n = w.model.n_embd, lay.dp_shard * lay.tp  # the rows' flattened (dp_shard, tp) group
        numel -= w.model.padded_vocab_size * C * (1 if w.model.tie_embeddings else 2) / lay.tp
        tokens = lay.microbatch_size(w.global_batch) * w.seq_len * lay.dp_shard
        moved = DTYPE_BYTES[w.dtype] * tokens * C  # embeddings, hidden states, their gradient
        rows = lay.n_microbatches * 3 * cluster.link(1, n).time("all_gather", n, moved)
    params, grads = DTYPE_BYTES[w.dtype] * numel, 4 * numel
    t = gathers * shard_link.time("all_gather", lay.dp_shard, params)
    t += shard_link.time("reduce_scatter", lay.dp_shard, grads)
    t += rep_link.time("all_reduce", lay.dp_replicate, grads / lay.dp_shard)
    return syncs * t + rows


def mfu(w: Workload, cluster: Cluster, step_s: float) -> float:
    """Model FLOPs utilisation as gpt3d's metrics report it (6N + 12LCs per token)."""
    from gpt3d.metrics import flops_per_token

    achieved = flops_per_token(w.model, w.seq_len) * w.tokens / step_s
    return achieved / (cluster.hw.peak_flops(w.dtype) * cluster.n_devices)
