"""The one composition order (torchtitan's parallelize_llama, for GPT-2), in three visible
steps that gpt3d/trainer.py calls one after the other:

    1. parallelize(run, mesh)        GPT on meta -> pipeline split -> tensor parallel (plan
                                     file) -> expert parallel (its [experts] rules) ->
                                     activation checkpointing -> compile per block
                                     -> the table by vocabulary rows over dp_shard (x tp,
                                     in place of the plan's wte / lm_head rules) when
                                     parallel.embedding_sharding resolved to "vocab"
                                     -> FSDP2 / HSDP / DDP                   (no memory yet)
    2. materialize(parts, device, weights)   allocate this rank's shards, fill them from
                                     weights(name, full_shape, region) (init or pretrained)
    3. build_schedule(parts, ...)    pipeline stages + schedule (pp > 1)

Every process group comes from a named mesh axis. With mesh=None (one process) the same
steps give the plain model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gpt3d.model import GPT, INIT_BLOCK_ELEMENTS
from gpt3d.moe import frozen_moe_stats, moe_layers, reset_moe_state
from gpt3d.parallel import pipeline as pp_lib
from gpt3d.parallel.compression import own_ddp_all_reduce, plan_reduction
from gpt3d.parallel.data_parallel import apply_data_parallel, grad_sync
from gpt3d.parallel.dims import expert_mesh, n_microbatches
from gpt3d.parallel.expert_parallel import apply_expert_parallel
from gpt3d.parallel.tensor_parallel import apply_tensor_parallel, retie_embeddings
from gpt3d.parallel.vocab_over_dp import rows_layout, shard_table_over_dp, without_table_rules

# (name, full shape, region: one slice per dim) -> that region of the parameter, fp32 CPU
Weights = Callable[[str, torch.Size, tuple], torch.Tensor]


@dataclass
class ModelParts:
    """What one rank holds: its model chunks (one per pipeline stage it runs, each a GPT with
    the parts of other stages removed), with pp > 1 the schedule that drives them, and when
    the dp_replicate all-reduce is compressed the GradSync that runs it after backward."""

    chunks: list[GPT]
    stage_ids: list[int]
    n_stages: int
    schedule: object | None = None
    grad_sync: object | None = None  # gpt3d.parallel.compression.GradSync

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def chunk_of_stage(self, stage: int) -> GPT:
        return self.chunks[self.stage_ids.index(stage)]

    def parameters(self) -> list[nn.Parameter]:
        """Unique parameters of every chunk (a tied embedding once)."""
        seen, params = set(), []
        for chunk in self.chunks:
            for p in chunk.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def train(self, mode: bool = True) -> None:
        for chunk in self.chunks:
            chunk.train(mode)


def parallelize(run, mesh) -> ModelParts:
    """Step 1: this rank's chunks on the meta device, every parallelism applied.
    run: the gpt3d.preflight.RunPlan (model shape, layout, validated tensor-parallel rules)."""
    parallel, training, dims = run.config.parallel, run.config.training, run.dims
    stage_ids, layers = _stage_layout(run, mesh)
    param_dtype = torch.bfloat16 if training.dtype == "bfloat16" else None
    reduction = plan_reduction(parallel, dims)  # gradient dtypes / compression per dp axis
    if mesh is not None:
        reduction = own_ddp_all_reduce(reduction, dims, mesh.device_type, param_dtype)
    emesh = expert_mesh(mesh, dims)  # (pp, dp_replicate, efsdp, ep, tp) when ep > 1
    tp_rules, rows = run.tp_rules, None  # rows: the table by vocabulary rows (vocab_over_dp)
    if parallel.embedding_sharding == "vocab":
        rows = rows_layout(mesh, dims, tp_rules)
        tp_rules = without_table_rules(tp_rules)  # the rows stand in for wte / lm_head's
    chunks = []
    for s in stage_ids:
        chunk = pp_lib.build_stage_module(run.model, s, len(layers), layers[s])
        if dims.tp > 1:
            apply_tensor_parallel(chunk, mesh["tp"], tp_rules, parallel.loss_parallel)
        tp_mesh = mesh["tp"] if dims.tp > 1 else None
        experts = apply_expert_parallel(chunk, run.ep_rules, emesh, tp_mesh)
        apply_activation_checkpointing(chunk, training.activation_checkpointing, training.ac_every)
        # compile_scope "stage" compiles the model with the loss in the trainer (pp = 1); a
        # pipeline's schedule calls the stage module itself, so there its blocks are compiled
        # here and the trainer compiles the loss
        if training.compile and (training.compile_scope == "blocks" or dims.pp > 1):
            for block in chunk.h.values():
                block.compile(mode=compile_mode(training))
        table = set()  # the embedding table when FSDP leaves it sharded by vocabulary rows
        if rows is not None:
            table = shard_table_over_dp(chunk, rows, param_dtype)
        if mesh is not None:
            apply_data_parallel(
                chunk,
                mesh,
                dims,
                parallel.dp_mode,
                param_dtype,
                dims.pp > 1 and not parallel.fsdp_reshard_per_microbatch,
                reduction,
                experts,
                emesh,
                table,
            )
        chunks.append(chunk)
    sync = None
    if mesh is not None:
        sync = grad_sync(chunks, mesh, reduction, run.config.job.seed, dims.describe())
    return ModelParts(chunks, stage_ids, len(layers), grad_sync=sync)


def compile_mode(training) -> str | None:
    """training.compile_mode as torch.compile's `mode` argument."""
    return None if training.compile_mode == "default" else training.compile_mode


def _stage_layout(run, mesh) -> tuple[list[int], list[range]]:
    """(stages this rank holds, blocks of every stage)."""
    cfg, parallel = run.model, run.config.parallel
    if run.dims.pp == 1:
        return [0], [range(cfg.n_layer)]
    v = parallel.pp_stages_per_rank
    layers = pp_lib.layer_split(cfg.n_layer, run.dims.pp * v, parallel.pp_layer_split)
    pp_rank = mesh["pp"].get_local_rank()
    return pp_lib.stages_of_rank(pp_rank, run.dims.pp, v, parallel.pp_schedule), layers


def apply_activation_checkpointing(model: GPT, mode: str, every: int) -> None:
    """Recompute block activations in backward: every block (full) or every k-th
    (selective). The composable API keeps parameter names unchanged."""
    if mode == "none":
        return
    from torch.distributed._composable import checkpoint

    for key, block in model.h.items():
        if mode == "full" or int(key) % every == 0:
            checkpoint(block)


# ---------------------------------------------------------------- step 2: memory and values


def materialize(parts: ModelParts, device: torch.device, weights: Weights) -> None:
    """Step 2: allocate each chunk on the device, fill every parameter from its full value
    and rebuild the non-persistent buffers."""
    for chunk in parts.chunks:
        chunk.to_empty(device=device)
        retie_embeddings(chunk)  # to_empty of a plain module allocates the tied names apart
        load_weights(chunk, weights)
        chunk.reset_buffers()
        reset_moe_state(chunk)  # MoE balancing bias (persistent): a fresh run starts at 0


@torch.no_grad()
def load_weights(model: nn.Module, weights: Weights) -> None:
    """Fill every parameter from weights(name, full_shape, region): each rank asks for just
    its own shard (region: one slice per dim of the full tensor), so no full tensor of a
    sharded parameter is ever built on a rank; and it asks piece by piece (rows aligned with
    the init's blocks), so the transient copy is one 256 KiB piece, not a second shard."""
    from gpt3d.errors import CheckpointError

    for name, p in model.named_parameters():
        region = local_region(p)
        local = p.to_local() if hasattr(p, "to_local") else p
        for rows, sub in _pieces(p.shape, region):
            piece = weights(name, p.shape, sub)
            target = local[rows] if rows is not None else local
            if tuple(piece.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"{name}: expected a {tuple(target.shape)} piece of {tuple(p.shape)}, got "
                    f"{tuple(piece.shape)}"
                )
            target.copy_(piece.to(local.device, local.dtype))


def _pieces(shape: torch.Size, region: tuple):
    """(local rows, sub-region) pieces of a region, cut along dim 0 at multiples of the
    init's rows per block (gpt3d.model.INIT_BLOCK_ELEMENTS: each block is drawn once)."""
    if not shape:
        yield None, region
        return
    lo, hi, _ = region[0].indices(shape[0])
    step = max(1, INIT_BLOCK_ELEMENTS // max(math.prod(shape[1:]), 1))
    a = lo
    while a < hi:
        b = min(hi, (a // step + 1) * step)
        yield slice(a - lo, b - lo), (slice(a, b), *region[1:])
        a = b
    if hi <= lo:  # an empty shard: one empty piece, as before
        yield slice(0, 0), region


def local_region(param: torch.Tensor) -> tuple[slice, ...]:
    """The slices of the full tensor this rank holds (everything for a plain tensor)."""
    if not hasattr(param, "device_mesh"):
        return tuple(slice(0, n) for n in param.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        param.shape, param.device_mesh, param.placements
    )
    return tuple(slice(o, o + n) for n, o in zip(shape, offset, strict=True))


# ---------------------------------------------------------------- step 3: the schedule


def build_schedule(parts: ModelParts, mesh, device: torch.device, parallel, loss_fn) -> None:
    """Step 3 (pp > 1): wrap each chunk in a PipelineStage and attach the schedule."""
    group = mesh["pp"].get_group()
    between = parallel.fsdp_reshard_per_microbatch
    stages = [
        pp_lib.build_pipeline_stage(chunk, s, parts.n_stages, device, group, between)
        for chunk, s in zip(parts.chunks, parts.stage_ids, strict=True)
    ]
    for stage, chunk in zip(stages, parts.chunks, strict=True):
        _uncounted_metadata_inference(stage, chunk)
    m = n_microbatches(parallel)
    parts.schedule = pp_lib.build_schedule(parallel.pp_schedule, stages, m, loss_fn)


def _uncounted_metadata_inference(stage, chunk: GPT) -> None:
    """torch.distributed.pipelining runs each stage's forward once on example tensors to
    learn shapes (metadata inference: at the first step and after every eval <-> train
    switch). MoE token counts and aux losses must not see that forward: it is no training."""
    infer = getattr(stage, "_prepare_forward_infra", None)
    if infer is None or not moe_layers(chunk):
        return

    def prepare_forward_infra(*args, **kwargs):
        with frozen_moe_stats(chunk):
            return infer(*args, **kwargs)

    stage._prepare_forward_infra = prepare_forward_infra
