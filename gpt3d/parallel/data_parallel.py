"""Data parallelism: FSDP2 (dp_shard), HSDP (dp_replicate x dp_shard) or DDP (dp_replicate).

DDP uses the FSDP-based `replicate` (torch.distributed._composable.replicate_with_fsdp):
unlike classic DistributedDataParallel it composes with pipelining and tensor parallelism.
With fp32 compute on CPU/gloo no wrapper is applied and GradSync all-reduces once per step
instead (compression.own_ddp_all_reduce says why).
Both reduce gradients with SUM (divide factor 1): the loss is already the global mean
(gpt3d/loss.py), so a second division by the data-parallel degree would be wrong.

The reduction's dtype and compression come from a ReductionPlan (gpt3d/parallel/
compression.py). When the dp_replicate all-reduce is compressed beyond what FSDP2 can send
(float16, a dtype of its own, PowerSGD), FSDP2 covers dp_shard only and GradSync all-reduces
over dp_replicate after backward.
"""

from __future__ import annotations

import torch
from torch import nn

from gpt3d.parallel.compression import (
    DTYPES,
    GradSync,
    ReductionPlan,
    ScaledFP16ReduceScatter,
    plan_reduction,
)


def dp_mesh(mesh, plan: ReductionPlan):
    """The mesh (1-D or 2-D) FSDP2 / replicate reduces over, or None."""
    if not plan.fsdp_axes:
        return None
    axes = plan.fsdp_axes
    return mesh[axes] if len(axes) > 1 else mesh[axes[0]]


def apply_data_parallel(
    model: nn.Module,
    mesh,
    dims,
    mode: str,
    param_dtype: torch.dtype | None,
    pipelined: bool,
    plan: ReductionPlan | None = None,
    experts: list[nn.Module] = (),
    expert_mesh=None,
    ignored: set[nn.Parameter] = frozenset(),
) -> None:
    """Wrap each transformer block, then the stage root, in FSDP2 or replicate (in place).
    plan: from compression.plan_reduction; None = float32 everywhere (the default).
    experts: expert-parallel modules (gpt3d/parallel/expert_parallel.py), wrapped first over
    expert_mesh's efsdp axis (what dp_shard leaves after ep), so the blocks skip them.
    ignored: parameters the root leaves alone (a table sharded by gpt3d.parallel.vocab_over_dp,
    whose gradient is complete where it is computed)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plan = plan or default_plan(dims, mode)
    dmesh = dp_mesh(mesh, plan)
    if dmesh is None:
        return
    # Master weights stay fp32; param_dtype bf16 = bf16 compute. reduce_dtype: what the
    # gradient collectives send (float16 goes as fp32 into the scaled custom reduce-scatter).
    reduce_dtype = torch.float32 if plan.scaled_fp16 else DTYPES[plan.fsdp_dtype]
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    if mode == "ddp" and plan.fsdp_axes == ("dp_replicate",):
        from torch.distributed._composable.replicate_with_fsdp import replicate

        def wrap(m):
            return replicate(m, mesh=dmesh, mp_policy=mp_policy)
    else:
        # Under pipelining each block runs once per microbatch: keep it unsharded between
        # (unless parallel.fsdp_reshard_per_microbatch: then `pipelined` is False here).
        def wrap(m):
            return fully_shard(
                m,
                mesh=dmesh,
                mp_policy=mp_policy,
                reshard_after_forward=not pipelined,
                ignored_params=set(ignored) if m is model else None,
            )

    for m in experts:
        axes = tuple("efsdp" if a == "dp_shard" else a for a in plan.fsdp_axes)
        emesh = expert_mesh[axes] if len(axes) > 1 else expert_mesh[axes[0]]
        fully_shard(m, mesh=emesh, mp_policy=mp_policy, reshard_after_forward=not pipelined)
    for block in model.h.values():
        wrap(block)
    wrap(model)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            if dmesh.device_type == "cpu":
                # No overlap to win on CPU: gloo's all-gather runs in the caller, so backward's
                # default prefetch (the next block's all-gather, issued before this block's
                # backward) would only hold one more unsharded block. Prefetching itself,
                # already unsharded, is a no-op that replaces the default.
                module.set_modules_to_backward_prefetch([module])
            module.set_gradient_divide_factor(1.0)
            # plain SUM collectives (gloo has no PREMUL_SUM; NCCL gets zero-copy SUM)
            module.set_force_sum_reduction_for_comms(True)
            if plan.scaled_fp16:
                module.set_custom_reduce_scatter(ScaledFP16ReduceScatter())


def default_plan(dims, mode: str) -> ReductionPlan:
    """float32 on every axis, no compression."""
    from gpt3d.config import ParallelConfig

    return plan_reduction(ParallelConfig(dp_mode=mode), dims)


def grad_sync(chunks: list[nn.Module], mesh, plan: ReductionPlan, seed: int, layout: str):
    """gpt3d's own dp_replicate all-reduce when the plan compresses it, else None."""
    if plan.sync_dtype is None:
        return None
    return GradSync(chunks, mesh["dp_replicate"].get_group(), plan, seed, layout)
