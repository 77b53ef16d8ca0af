"""Gradient compression on the data-parallel axes: lower-precision and low-rank reductions.

Gradients are reduced over at most two mesh axes: a reduce-scatter over dp_shard (FSDP2,
inside backward) and an all-reduce over dp_replicate (HSDP's inter-node axis; DDP's only
axis). [parallel] chooses what each one sends (docs/compression.md):

    grad_reduce_dtype            float32 | bfloat16 | float16       every dp axis
    grad_reduce_dtype_replicate  "" | float32 | bfloat16 | float16  dp_replicate only
    grad_compression             none | powersgd                    dp_replicate's all-reduce

Who does the work (`plan_reduction`):
- One dtype on every axis, float32 or bfloat16, no PowerSGD: FSDP2 / replicate themselves
  (MixedPrecisionPolicy.reduce_dtype), overlapped with backward. float32 is the default and
  leaves everything as it was.
- float16 over an FSDP2 reduce-scatter: `ScaledFP16ReduceScatter`, FSDP2's custom comm.
- DDP with fp32 compute on CPU/gloo: no wrapper; `GradSync` all-reduces once per step in
  32 MiB buckets (`own_ddp_all_reduce`: nothing overlaps on gloo, the hooks only cost).
- float16 over dp_replicate, a dp_replicate dtype that differs from dp_shard's, or PowerSGD:
  FSDP2 is applied over dp_shard only (size 1 in ddp mode, where it only does the mixed
  precision and gradient bookkeeping) and `GradSync` all-reduces over dp_replicate once per
  step, after the last backward and before clipping. FSDP2's own all-reduce offers a hook
  only after the collective, so it cannot send anything but reduce_dtype.

float16 needs scaling: gpt3d's loss is divided by the global token count, so gradient
elements are ~1e-4 and below, where float16 (smallest normal 6e-5) loses them. Each buffer
is multiplied by 2^k before the cast, k = floor(log2(2^15 / (n * amax))), amax = max |g| over
the group's ranks (one MAX all-reduce of a scalar): n ranks' sum stays below 2^15 (no
overflow), and small gradients move out of the subnormal range. Powers of two scale exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter  # no public path

from gpt3d.parallel.powersgd import PowerSGD

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NATIVE = ("float32", "bfloat16")  # what FSDP2's reduce_dtype can send unscaled
BUCKET_BYTES = 32 * 2**20  # fp32 payload per uncompressed all-reduce


@dataclass(frozen=True)
class ReductionPlan:
    """How one layout reduces gradients over its data-parallel axes."""

    fsdp_axes: tuple[str, ...]  # mesh axes FSDP2 / replicate is applied over; () = no dp
    fsdp_dtype: str  # their reduction dtype (float16: the scaled custom reduce-scatter)
    sync_dtype: str | None = None  # GradSync's all-reduce over dp_replicate; None = none
    powersgd_rank: int = 0  # 0: no low-rank compression in GradSync
    powersgd_start: int = 0  # optimizer steps before PowerSGD starts

    @property
    def scaled_fp16(self) -> bool:
        return self.fsdp_dtype == "float16"


def plan_reduction(parallel, dims) -> ReductionPlan:
    """[parallel] settings + the resolved layout -> who reduces what, in which dtype.
    Unsupported combinations are refused earlier, in gpt3d/preflight.py."""
    shard = parallel.grad_reduce_dtype
    replicate = parallel.grad_reduce_dtype_replicate or shard
    rank = parallel.powersgd_rank if parallel.grad_compression == "powersgd" else 0
    if dims.dp == 1:
        return ReductionPlan((), "float32")
    if not replicate_all_reduces(dims, parallel.dp_mode):  # one sharded axis
        axis = "dp_shard" if dims.dp_shard > 1 else "dp_replicate"
        return ReductionPlan((axis,), shard if axis == "dp_shard" else replicate)
    own = rank > 0 or replicate not in NATIVE or (dims.dp_shard > 1 and replicate != shard)
    if not own:
        axes = ("dp_replicate", "dp_shard") if dims.dp_shard > 1 else ("dp_replicate",)
        return ReductionPlan(axes, replicate)
    fsdp_dtype = shard if dims.dp_shard > 1 else "float32"  # size 1: nothing is sent
    return ReductionPlan(("dp_shard",), fsdp_dtype, replicate, rank, parallel.powersgd_start_step)


def own_ddp_all_reduce(plan: ReductionPlan, dims, device_type: str, param_dtype) -> ReductionPlan:
    """DDP (dp_replicate only) with fp32 compute on CPU/gloo: gpt3d's bucketed all-reduce
    once per step instead of FSDP2's replicate. gloo runs collectives on CPU threads that
    compete with the compute they would overlap (bench_breakdown: 0 % overlapped), so the
    wrapper's per-block, per-microbatch hooks were pure cost: 5.5 % of the CPU time of the
    8-process dp2 x tp2 x pp2 step. On GPUs (NCCL overlaps the per-block all-reduce with
    backward) and with bf16 compute (the wrapper's MixedPrecisionPolicy casts) FSDP2's
    replicate stays."""
    if plan.fsdp_axes != ("dp_replicate",) or dims.dp_shard > 1:
        return plan
    if device_type != "cpu" or param_dtype is not None:
        return plan
    return ReductionPlan((), "float32", plan.fsdp_dtype)


def replicate_all_reduces(dims, dp_mode: str) -> bool:
    """Whether dp_replicate reduces with an all-reduce (DDP, HSDP). In fsdp mode with
    dp_shard = 1, FSDP2 shards over dp_replicate instead (a reduce-scatter)."""
    return dims.dp_replicate > 1 and (dp_mode == "ddp" or dims.dp_shard > 1)


# ---------------------------------------------------------------- float16 with scaling


def fp16_scale(amax: Tensor, n: int) -> Tensor:
    """2^k with n * amax * 2^k <= 2^15 (a 0-d fp32 tensor). amax: max |g| over the ranks."""
    k = torch.floor(torch.log2(2.0**15 / (n * amax.float())))
    # amax 0 -> 1; a NaN/Inf gradient stays non-finite after scaling (the trainer stops)
    k = torch.where(amax > 0, k.clamp(-100, 100), torch.zeros_like(k))
    return torch.exp2(k)


def group_amax(t: Tensor, group) -> Tensor:
    amax = t.detach().abs().max() if t.numel() else torch.zeros((), device=t.device)
    amax = amax.float().reshape(1)
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax[0]


class ScaledFP16ReduceScatter(ReduceScatter):
    """FSDP2 custom reduce-scatter (FSDPModule.set_custom_reduce_scatter): fp32 buffers in and
    out, float16 on the wire, scaled by fp16_scale. Returns no Work: it runs synchronously
    (gloo's reduce_scatter_tensor blocks anyway)."""

    def allocate(self, size, *, dtype, device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        scale = fp16_scale(group_amax(input_tensor, group), dist.get_world_size(group))
        wire = (input_tensor * scale).to(torch.float16)
        out = torch.empty(output_tensor.shape, dtype=torch.float16, device=output_tensor.device)
        dist.reduce_scatter_single(out, wire, op=op, group=group)
        output_tensor.copy_(out.to(output_tensor.dtype).div_(scale))
        return None


# ---------------------------------------------------------------- gpt3d's own all-reduce


@torch.no_grad()
def all_reduce_in_dtype(tensors: list[Tensor], dtype: str, group) -> None:
    """SUM all-reduce of tensors in place, sent as `dtype` (float16 scaled), in flat buckets."""
    wire_dtype = DTYPES[dtype]
    for bucket in buckets(tensors):
        flat = torch.cat([t.reshape(-1).float() for t in bucket])
        if dtype == "float16":
            scale = fp16_scale(group_amax(flat, group), dist.get_world_size(group))
            wire = (flat * scale).to(wire_dtype)
        else:
            scale, wire = None, flat.to(wire_dtype)
        dist.all_reduce(wire, group=group)
        flat = wire.float() if scale is None else wire.float().div_(scale)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()


def buckets(tensors: list[Tensor], cap: int = BUCKET_BYTES) -> list[list[Tensor]]:
    """Consecutive groups of at most `cap` fp32 bytes (a bigger tensor goes alone)."""
    groups, size = [[]], 0
    for t in tensors:
        if groups[-1] and size + 4 * t.numel() > cap:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += 4 * t.numel()
    return [g for g in groups if g]


class GradSync:
    """The gradient all-reduce over dp_replicate that gpt3d runs itself when it is compressed
    (or in DDP mode on CPU: own_ddp_all_reduce): once per optimizer step, after the last
    backward (grad accumulation and pipeline microbatches included), before the
    tied-embedding sync and clipping. Matrices go through
    PowerSGD when it is on (from step powersgd_start), everything else as plan.sync_dtype."""

    def __init__(self, chunks, group, plan: ReductionPlan, seed: int, layout: str):
        self.chunks, self.group, self.plan, self.layout = chunks, group, plan, layout
        self.powersgd = PowerSGD(plan.powersgd_rank, seed) if plan.powersgd_rank else None

    def named_local(self, grads: bool) -> list[tuple[str, Tensor]]:
        """(name, this rank's piece) of every unique parameter, or of its gradient. A
        parameter without a gradient gets zeros: a peer may have one, and every rank must
        join the same collectives."""
        seen, out = set(), []
        for chunk in self.chunks:
            for name, p in chunk.named_parameters():
                if grads and p.grad is None and p.requires_grad:
                    p.grad = torch.zeros_like(p)
                t = p.grad if grads else p
                if id(p) in seen or t is None:
                    continue
                seen.add(id(p))
                out.append((name, t.to_local() if hasattr(t, "to_local") else t))
        return out

    def reduce(self, step: int) -> None:
        """Sum every gradient over dp_replicate, in place (collective over the axis)."""
        named = self.named_local(grads=True)
        low_rank = []
        if self.powersgd is not None and step >= self.plan.powersgd_start:
            low_rank = [(n, g) for n, g in named if self.powersgd.compressible(g)]
            chosen = {n for n, _ in low_rank}
            named = [(n, g) for n, g in named if n not in chosen]
        all_reduce_in_dtype([g for _, g in named if g.numel()], self.plan.sync_dtype, self.group)
        if self.powersgd is not None:
            self.powersgd.all_reduce(low_rank, self.group)

    # ---- checkpoint state: PowerSGD's errors and Q (see gpt3d/checkpoint.py) -------------
    def describe(self) -> str | None:
        """What the saved state is valid for (None: no state); a resume loads the state only
        when this matches: the same compressor on the same layout (the same local shapes)."""
        if self.powersgd is None:
            return None
        return f"powersgd rank {self.plan.powersgd_rank} on {self.layout}"

    def state_dict(self) -> dict[str, Tensor]:
        """This rank's state under rank-unique keys (the errors differ between replicas)."""
        if self.powersgd is None:
            return {}
        params = self.named_local(grads=False)
        self.powersgd.init_state([(n, p) for n, p in params if self.powersgd.compressible(p)])
        rank = dist.get_rank()
        return {f"rank{rank}.{k}": v for k, v in self.powersgd.state_dict().items()}
