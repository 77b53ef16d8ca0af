"""ParallelDims: the layout's degrees, resolved against the world size, and the one DeviceMesh
with named axes built from them.

Mesh axes, outermost first: ("pp", "dp_replicate", "dp_shard", "tp"). tp is innermost so
tensor-parallel peers sit on the fastest links (same node); pp is outermost. Every rule a
layout must satisfy is checked in gpt3d/preflight.py before this mesh is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpt3d.errors import ConfigError

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
PP_SCHEDULES = SINGLE_STAGE_SCHEDULES + MULTI_STAGE_SCHEDULES
V_SCHEDULES = ("ZBVZeroBubble", "DualPipeV")  # stage placement in a V, exactly 2 per rank
# Schedules that split a microbatch's backward into input (I) and weight (W) gradients.
SPLIT_BACKWARD_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


@dataclass(frozen=True)
class ParallelDims:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    ep: int = 1  # expert parallel: a sub-axis of dp_shard, not a factor of the world size

    @property
    def efsdp(self) -> int:
        """FSDP degree of expert-parallel experts: what dp_shard leaves after ep."""
        return self.dp_shard // self.ep

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.tp

    def describe(self) -> str:
        ep = f" (ep={self.ep})" if self.ep > 1 else ""
        return (
            f"pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard}{ep} "
            f"x tp={self.tp}"
        )


def resolve_dims(parallel, world_size: int) -> ParallelDims:
    """Fill dp_shard=-1 with what is left of the world size and check the product.

    In ddp mode the data-parallel degree lives on the dp_replicate axis (no sharding)."""
    p = parallel
    ddp = p.dp_mode == "ddp"
    if ddp and p.dp_shard not in (-1, 1):
        raise ConfigError(
            f"dp_mode='ddp' replicates parameters, so parallel.dp_shard must be 1 or -1 "
            f"(got {p.dp_shard}); use dp_mode='fsdp' to shard, or set dp_replicate instead"
        )
    fixed = p.pp * p.tp * p.dp_replicate * (1 if p.dp_shard == -1 else p.dp_shard)
    if p.dp_shard == -1:
        if world_size % fixed:
            raise ConfigError(_world_message(world_size, p, fixed, "is not divisible by"))
        rest = world_size // fixed
        dp_rep, dp_shard = (p.dp_replicate * rest, 1) if ddp else (p.dp_replicate, rest)
    else:
        dp_rep, dp_shard = p.dp_replicate, p.dp_shard
    dims = ParallelDims(pp=p.pp, dp_replicate=dp_rep, dp_shard=dp_shard, tp=p.tp, ep=p.ep)
    if dims.world_size != world_size:
        raise ConfigError(_world_message(world_size, p, dims.world_size, "does not equal"))
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


def build_mesh(dims: ParallelDims, device_type: str):
    """One DeviceMesh with every axis named (size-1 axes included, so code never branches)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp)
    return init_device_mesh(device_type, shape, mesh_dim_names=AXES)


def expert_mesh(mesh, dims: ParallelDims):
    """The mesh expert parallelism runs on, or None when ep == 1: dp_shard split into
    ("efsdp", "ep"), ep innermost so all-to-all peers are neighbouring ranks (torchtitan's
    layout). Axes (pp, dp_replicate, efsdp, ep, tp); call once, it creates process groups."""
    if dims.ep == 1:
        return None
    return mesh._unflatten("dp_shard", (dims.efsdp, dims.ep), ("efsdp", "ep"))


def dp_rank(mesh, dims: ParallelDims) -> int:
    """This rank's index among the data-parallel ranks (0 without a mesh): which slice of
    each global batch it reads. Tensor and pipeline peers share it."""
    if mesh is None:
        return 0
    rep = mesh["dp_replicate"].get_local_rank()
    return rep * dims.dp_shard + mesh["dp_shard"].get_local_rank()
