"""Process-group setup, gradient clipping across meshes and stages, tied-embedding gradient
sync between pipeline stages, and a clean exit."""

from __future__ import annotations

import datetime
import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    device: torch.device  # cuda:LOCAL_RANK or cpu

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env() -> DistEnv:
    """Rank/world from torchrun's environment (1 process when absent) and the device:
    cuda:LOCAL_RANK when GPUs exist, else cpu. Starts no process group."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    return DistEnv(rank, world, device)


def init_process_group(env: DistEnv, timeout_s: float) -> None:
    """nccl on GPUs, gloo on CPU; a finite collective timeout so a dead peer ends the job."""
    if env.world_size == 1 or dist.is_initialized():
        return
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
        backend = "nccl"
    else:
        backend = "gloo"
    timeout_s = timeout_s or (1800.0 if backend == "nccl" else 120.0)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def clean_exit(code: int) -> None:
    """End a distributed entry point without the random SIGABRT at interpreter exit (torch
    2.13 on gloo aborts 3-7 of 8 trivial runs otherwise; docs/torch_notes.md): barrier,
    destroy the group, flush, then os._exit."""
    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _local_sq_norm(g: Tensor) -> tuple[Tensor, tuple]:
    """Squared norm of this rank's piece of a gradient, and the key of the mesh axes over
    which the pieces must be summed (the axes the gradient is sharded on)."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(g, DTensor):
        return _sq_norm(g), ()
    if any(p.is_partial() for p in g.placements):  # e.g. sequence-parallel LayerNorm grads
        g = g.redistribute(placements=[Replicate() if p.is_partial() else p for p in g.placements])
    # Shard and FSDP x TP's _StridedShard: pieces are disjoint, their squares add up.
    axes = tuple(i for i, p in enumerate(g.placements) if not p.is_replicate())
    mesh_key = (g.device_mesh, axes) if axes else ()
    return _sq_norm(g.to_local()), mesh_key


def _sq_norm(t: Tensor) -> Tensor:
    """Squared L2 norm in fp32 without a squared copy of the tensor (that copy cost ~3% of a
    gpt2-width CPU step: benchmarks/bench_step.py)."""
    return torch.linalg.vector_norm(t.detach(), dtype=torch.float32).square()


def total_grad_norm(params: list[Tensor], pp_group=None) -> Tensor:
    """L2 norm of all gradients, identical to one process whatever the layout: each rank
    sums squares of its pieces, pieces are summed over the axes they are sharded on (one
    all-reduce per distinct sharding), then over pipeline stages."""
    groups: dict = {}
    for p in params:
        if p.grad is None:
            continue
        sq, key = _local_sq_norm(p.grad)
        groups[key] = groups.get(key, 0.0) + sq
    total = torch.zeros((), device=_device_of(params))
    for key, sq in groups.items():
        sq = torch.as_tensor(sq, device=total.device)
        if key:
            mesh, axes = key
            for axis in axes:
                dist.all_reduce(sq, group=mesh.get_group(axis))
        total = total + sq
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


def _device_of(params: list[Tensor]) -> torch.device:
    for p in params:
        return p.device
    return torch.device("cpu")


def all_finite(tensors: list[Tensor]) -> bool:
    """True when every element of every tensor is finite on every rank (collective)."""
    ok = torch.stack([local_tensor(t).isfinite().all() for t in tensors]).all().float()
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return ok.item() == 1.0


def clip_grads_(params: list[Tensor], max_norm: float, pp_group=None, norm_params=None) -> float:
    """Clip in place to max_norm (0 = only measure). norm_params: the parameters to count in
    the norm (tied copies counted once); defaults to params. Returns the total norm."""
    norm = total_grad_norm(norm_params if norm_params is not None else params, pp_group)
    value = norm.item()
    if max_norm > 0 and math.isfinite(value):
        coef = min(1.0, max_norm / (value + 1e-6))
        if coef < 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
    return value


def sync_tied_embedding_grads(wte: Tensor | None, lm_head: Tensor | None, peer: int, pp_group):
    """Sum the gradients of the two copies of a tied embedding that live on the first and
    last pipeline stages (Megatron's embedding group), so both take the same update.

    wte is given on the rank holding stage 0, lm_head on the rank holding the last stage
    (both on one rank under a V schedule: then just add). peer: the other rank's index in
    the pp group. Gradients have identical local shapes (same dp/tp sharding)."""
    for param in (wte, lm_head):
        if param is not None:
            _match_param_placements(param)
    if wte is not None and lm_head is not None:
        total = local_tensor(wte.grad) + local_tensor(lm_head.grad)
        local_tensor(wte.grad).copy_(total)
        local_tensor(lm_head.grad).copy_(total)
        return
    mine = local_tensor((wte if wte is not None else lm_head).grad)
    theirs = torch.empty_like(mine)
    ops = [
        dist.P2POp(dist.isend, mine, group=pp_group, group_peer=peer),
        dist.P2POp(dist.irecv, theirs, group=pp_group, group_peer=peer),
    ]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    mine.add_(theirs)


def _match_param_placements(param: Tensor) -> None:
    """A vocab-parallel embedding's gradient can come back Replicate while its weight is
    Shard(0); bring it to the weight's placements (a local slice, no communication)."""
    grad = param.grad
    if hasattr(grad, "placements") and tuple(grad.placements) != tuple(param.placements):
        param.grad = grad.redistribute(param.device_mesh, param.placements)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's piece of a DTensor (a plain tensor is its own piece)."""
    return t.to_local() if hasattr(t, "to_local") else t
