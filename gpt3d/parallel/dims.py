"""ParallelDims: degrees -> a validated layout -> one DeviceMesh with named axes.

Mesh axes, outermost first: ("pp", "dp_replicate", "dp_shard", "tp"). tp is innermost so
tensor-parallel peers sit on the fastest links (same node); pp is outermost.
Everything here runs before the first collective, so a bad layout is one clear ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt3d.model import GPTConfig

AXES = ("pp", "dp_replicate", "dp_shard", "tp")

# Schedules that drive one stage per rank vs several ("virtual") stages per rank.
SINGLE_STAGE_SCHEDULES = ("GPipe", "1F1B")
MULTI_STAGE_SCHEDULES = (
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
)
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")  # stage placement in a V, exactly 2 per rank


@dataclass(frozen=True)
class ParallelDims:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def describe(self) -> str:
        return (
            f"pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} "
            f"x tp={self.tp}"
        )


def resolve_dims(parallel, world_size: int) -> ParallelDims:
    """Fill dp_shard=-1 with what is left of the world size and check the product.

    In ddp mode the data-parallel degree lives on the dp_replicate axis (no sharding)."""
    p = parallel
    ddp = p.dp_mode == "ddp"
    if ddp and p.dp_shard not in (-1, 1):
        raise ValueError(
            f"dp_mode='ddp' replicates parameters, so parallel.dp_shard must be 1 or -1 "
            f"(got {p.dp_shard}); use dp_mode='fsdp' to shard, or set dp_replicate instead"
        )
    fixed = p.pp * p.tp * p.dp_replicate * (1 if p.dp_shard == -1 else p.dp_shard)
    if p.dp_shard == -1:
        if world_size % fixed:
            raise ValueError(_world_message(world_size, p, fixed, "is not divisible by"))
        rest = world_size // fixed
        dp_rep, dp_shard = (p.dp_replicate * rest, 1) if ddp else (p.dp_replicate, rest)
    else:
        dp_rep, dp_shard = p.dp_replicate, p.dp_shard
    dims = ParallelDims(pp=p.pp, dp_replicate=dp_rep, dp_shard=dp_shard, tp=p.tp)
    if dims.world_size != world_size:
        raise ValueError(_world_message(world_size, p, dims.world_size, "does not equal"))
    return dims


def _world_message(world_size: int, p, product: int, relation: str) -> str:
    return (
        f"world size {world_size} {relation} the layout's product {product} "
        f"(pp={p.pp} x dp_replicate={p.dp_replicate} x dp_shard={p.dp_shard} x tp={p.tp}); "
        f"launch with torchrun --nproc_per_node={product} or change "
        f"--parallel.pp/--parallel.tp/--parallel.dp_shard/--parallel.dp_replicate"
    )


def n_microbatches(parallel) -> int:
    """Pipeline microbatches per schedule step (0 in the config means one per stage)."""
    return parallel.pp_microbatches or parallel.pp * parallel.pp_stages_per_rank


def validate_layout(dims: ParallelDims, model: GPTConfig, training, parallel) -> None:
    """Every layout constraint, checked before any process group exists."""
    for check in (_check_tp, _check_pipeline, _check_batch):
        check(dims, model, training, parallel)


def _check_tp(dims: ParallelDims, model: GPTConfig, training, parallel) -> None:
    tp = dims.tp
    if tp == 1:
        return
    if model.n_head % tp:
        raise ValueError(
            f"model.n_head={model.n_head} is not divisible by parallel.tp={tp}: tensor "
            f"parallelism splits whole attention heads; pick tp dividing {model.n_head}"
        )
    if model.n_embd % tp:
        raise ValueError(f"model.n_embd={model.n_embd} is not divisible by parallel.tp={tp}")
    if model.padded_vocab_size % tp:
        raise ValueError(
            f"vocabulary of {model.padded_vocab_size} rows is not divisible by parallel.tp={tp}; "
            f"pad it: --model.pad_vocab_multiple={64 if 64 % tp == 0 else tp} "
            f"(padded rows never count in the loss)"
        )
    if parallel.sequence_parallel and training.seq_len % tp:
        raise ValueError(
            f"sequence parallelism splits the sequence over tp: training.seq_len="
            f"{training.seq_len} must be divisible by parallel.tp={tp}"
        )


def _check_pipeline(dims: ParallelDims, model: GPTConfig, training, parallel) -> None:
    name, v = parallel.pp_schedule, parallel.pp_stages_per_rank
    if name not in SINGLE_STAGE_SCHEDULES + MULTI_STAGE_SCHEDULES:
        raise ValueError(
            f"unknown parallel.pp_schedule {name!r}; choose one of "
            f"{list(SINGLE_STAGE_SCHEDULES + MULTI_STAGE_SCHEDULES)}"
        )
    if dims.pp == 1:
        if v != 1 or parallel.pp_layer_split:
            raise ValueError("pp_stages_per_rank / pp_layer_split need parallel.pp > 1")
        return
    if name in SINGLE_STAGE_SCHEDULES and v != 1:
        raise ValueError(
            f"schedule {name} runs one stage per rank: set parallel.pp_stages_per_rank=1, "
            f"or pick Interleaved1F1B/LoopedBFS/InterleavedZeroBubble for virtual stages"
        )
    if name in V_SCHEDULES and v != 2:
        raise ValueError(f"schedule {name} needs parallel.pp_stages_per_rank=2 (got {v})")
    if name in MULTI_STAGE_SCHEDULES and v < 2:
        raise ValueError(f"schedule {name} needs parallel.pp_stages_per_rank >= 2 (got {v})")
    _check_layer_split(dims.pp * v, model.n_layer, parallel.pp_layer_split)
    _check_microbatches(name, n_microbatches(parallel), dims.pp, dims.pp * v)


def _check_layer_split(n_stages: int, n_layer: int, split: list[int]) -> None:
    if not split:
        if n_layer < n_stages:
            raise ValueError(
                f"{n_layer} transformer layers cannot fill {n_stages} pipeline stages "
                f"(pp x pp_stages_per_rank); lower parallel.pp or pp_stages_per_rank"
            )
        return
    if len(split) != n_stages or sum(split) != n_layer or min(split) < 0:
        raise ValueError(
            f"parallel.pp_layer_split={split} must list {n_stages} non-negative block counts "
            f"(one per stage) summing to model.n_layer={n_layer}"
        )


def _check_microbatches(name: str, m: int, pp: int, n_stages: int) -> None:
    need = {"1F1B": pp, "DualPipeV": n_stages}.get(name, 1)
    if m < need:
        raise ValueError(
            f"schedule {name} needs at least {need} microbatches (got "
            f"parallel.pp_microbatches={m}); raise --parallel.pp_microbatches"
        )
    rounds = max(1, m // pp)
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and m % rounds:
        raise ValueError(
            f"schedule {name} needs pp_microbatches to be a multiple of the rounds "
            f"(microbatches // pp = {rounds}); use a multiple of pp={pp}"
        )


def _check_batch(dims: ParallelDims, model: GPTConfig, training, parallel) -> None:
    m = n_microbatches(parallel) if dims.pp > 1 else 1
    per_step = dims.dp * training.grad_accum * m
    if training.global_batch_size % per_step:
        raise ValueError(
            f"training.global_batch_size={training.global_batch_size} is not divisible by "
            f"dp ({dims.dp}) x grad_accum ({training.grad_accum}) x pipeline microbatches "
            f"({m}) = {per_step}; use a multiple of {per_step}"
        )
    if training.seq_len > model.block_size:
        raise ValueError(
            f"training.seq_len={training.seq_len} exceeds model.block_size={model.block_size}"
        )


def build_mesh(dims: ParallelDims, device_type: str):
    """One DeviceMesh with every axis named (size-1 axes included, so code never branches)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp)
    return init_device_mesh(device_type, shape, mesh_dim_names=AXES)
