"""Data parallelism: FSDP2 (dp_shard), HSDP (dp_replicate x dp_shard) or DDP (dp_replicate).

DDP uses the FSDP-based `replicate` (torch.distributed._composable.replicate_with_fsdp):
unlike classic DistributedDataParallel it composes with pipelining and tensor parallelism.
Both reduce gradients with SUM (divide factor 1): the loss is already the global mean
(gpt3d/loss.py), so a second division by the data-parallel degree would be wrong.
"""

from __future__ import annotations

import torch
from torch import nn


def dp_mesh(mesh, dims):
    """The mesh (1-D or 2-D) that data parallelism reduces over, or None."""
    if dims.dp == 1:
        return None
    if dims.dp_replicate > 1 and dims.dp_shard > 1:
        return mesh["dp_replicate", "dp_shard"]  # HSDP: replicate across, shard within
    return mesh["dp_shard"] if dims.dp_shard > 1 else mesh["dp_replicate"]


def apply_data_parallel(
    model: nn.Module,
    mesh,
    dims,
    mode: str,
    param_dtype: torch.dtype | None,
    pipelined: bool,
    experts: list[nn.Module] = (),
    expert_mesh=None,
) -> None:
    """Wrap each transformer block, then the stage root, in FSDP2 or replicate (in place).
    experts: expert-parallel modules (gpt3d/parallel/expert_parallel.py), wrapped first over
    expert_mesh's efsdp axis (what dp_shard leaves after ep), so the blocks skip them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dmesh = dp_mesh(mesh, dims)
    if dmesh is None:
        return
    # bf16 compute, fp32 gradient reduction; master weights stay fp32.
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if mode == "ddp":
        from torch.distributed._composable.replicate_with_fsdp import replicate

        def wrap(m):
            return replicate(m, mesh=dmesh, mp_policy=mp_policy)
    else:
        # Under pipelining each block runs once per microbatch: keep it unsharded between.
        def wrap(m):
            return fully_shard(
                m, mesh=dmesh, mp_policy=mp_policy, reshard_after_forward=not pipelined
            )

    for m in experts:
        axes = ("dp_replicate", "efsdp") if dims.dp_replicate > 1 else ("efsdp",)
        emesh = expert_mesh[axes] if len(axes) > 1 else expert_mesh[axes[0]]
        fully_shard(m, mesh=emesh, mp_policy=mp_policy, reshard_after_forward=not pipelined)
    for block in model.h.values():
        wrap(block)
    wrap(model)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            # plain SUM collectives (gloo has no PREMUL_SUM; NCCL gets zero-copy SUM)
            module.set_force_sum_reduction_for_comms(True)
