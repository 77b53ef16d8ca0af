"""The one composition order (torchtitan's parallelize_llama, for GPT-2):

    GPT on meta -> pipeline split -> tensor parallel (plan file) -> re-tie embeddings
    -> activation checkpointing -> compile per block -> FSDP2 / HSDP / DDP
    -> materialise on the device -> weights (init or load) -> pipeline stages + schedule

Every process group comes from a named mesh axis. With mesh=None (one process) the same
function returns the plain model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gpt3d.model import GPT, GPTConfig
from gpt3d.parallel import pipeline as pp_lib
from gpt3d.parallel.data_parallel import apply_data_parallel
from gpt3d.parallel.dims import ParallelDims, n_microbatches
from gpt3d.parallel.plan import plan_for


@dataclass
class ModelParts:
    """What one rank holds: its model chunks (pipeline stages) and, with pp > 1, the schedule."""

    parts: list[GPT]
    stage_ids: list[int]
    n_stages: int
    schedule: object | None = None

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last(self) -> bool:
        return self.n_stages - 1 in self.stage_ids

    def parameters(self) -> list[nn.Parameter]:
        seen, params = set(), []
        for part in self.parts:
            for p in part.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)


def parallelize(
    cfg: GPTConfig,
    parallel,
    training,
    dims: ParallelDims,
    mesh,
    device: torch.device,
    weights: Callable[[str, torch.Size], torch.Tensor],
    loss_fn=None,
    rules: list | None = None,
) -> ModelParts:
    """Build this rank's model chunks in the one composition order.

    weights(name, full_shape) -> full fp32 CPU tensor of that parameter (init or checkpoint);
    each rank copies out only its own shard. rules: the validated tensor-parallel plan
    (gpt3d.parallel.plan.load_plan + check_plan_matches), needed when tp > 1."""
    stage_ids, layers = _stage_layout(cfg, parallel, dims, mesh)
    n_stages = len(layers)
    assert dims.tp == 1 or rules is not None, "tp > 1 needs a tensor-parallel plan"
    param_dtype = torch.bfloat16 if training.dtype == "bfloat16" else None
    parts = []
    for s in stage_ids:
        model = pp_lib.build_stage_module(cfg, s, n_stages, layers[s])
        if dims.tp > 1:
            apply_tensor_parallel(model, mesh["tp"], rules, parallel.loss_parallel)
        apply_activation_checkpointing(model, training.activation_checkpointing, training.ac_every)
        if training.compile:
            for block in model.h.values():
                block.compile()
        if mesh is not None:
            apply_data_parallel(model, mesh, dims, parallel.dp_mode, param_dtype, dims.pp > 1)
        materialize(model, device, mesh["tp"] if dims.tp > 1 else None, parallel)
        load_weights(model, weights)
        parts.append(model)
    mp = ModelParts(parts, stage_ids, n_stages)
    if dims.pp > 1:
        group = mesh["pp"].get_group()
        stages = [
            pp_lib.build_pipeline_stage(m, s, n_stages, device, group)
            for m, s in zip(parts, stage_ids, strict=True)
        ]
        m = n_microbatches(parallel)
        mp.schedule = pp_lib.build_schedule(parallel.pp_schedule, stages, m, loss_fn)
    return mp


def _stage_layout(cfg: GPTConfig, parallel, dims: ParallelDims, mesh):
    if dims.pp == 1:
        return [0], [range(cfg.n_layer)]
    v = parallel.pp_stages_per_rank
    layers = pp_lib.layer_split(cfg.n_layer, dims.pp * v, parallel.pp_layer_split)
    pp_rank = mesh["pp"].get_local_rank()
    return pp_lib.stages_of_rank(pp_rank, dims.pp, v, parallel.pp_schedule), layers


def apply_tensor_parallel(model: GPT, tp_mesh, rules, loss_parallel: bool) -> None:
    """parallelize_module with this stage's entries of the plan, then re-tie wte/lm_head
    (parallelize_module replaces both parameters, silently untying them)."""
    from torch.distributed.tensor.parallel import parallelize_module

    plan = plan_for(rules, model, loss_parallel)
    if plan:
        parallelize_module(model, tp_mesh, plan)
    _retie(model)


def _retie(model: GPT) -> None:
    both = model.wte is not None and model.lm_head is not None
    if model.config.tie_embeddings and both and model.lm_head.weight is not model.wte.weight:
        model.lm_head.weight = model.wte.weight


def apply_activation_checkpointing(model: GPT, mode: str, every: int) -> None:
    """Recompute block activations in backward: every block (full) or every k-th
    (selective). The composable API keeps parameter names unchanged."""
    if mode == "none":
        return
    from torch.distributed._composable import checkpoint

    for key, block in model.h.items():
        if mode == "full" or int(key) % every == 0:
            checkpoint(block)


def materialize(model: GPT, device: torch.device, tp_mesh, parallel) -> None:
    """Allocate the meta parameters on the device and rebuild non-persistent buffers."""
    model.to_empty(device=device)
    _retie(model)  # to_empty of a plain module allocates the two tied names separately
    if not hasattr(model, "vocab_pad_mask"):
        return
    cfg = model.config
    mask = torch.arange(cfg.padded_vocab_size, device=device) >= cfg.vocab_size
    if tp_mesh is not None and parallel.loss_parallel:
        from torch.distributed.tensor import Shard, distribute_tensor

        # Logits are vocab-sharded DTensors: the mask must be sharded the same way.
        mask = distribute_tensor(mask, tp_mesh, [Shard(0)], src_data_rank=None)
    model.vocab_pad_mask = mask


@torch.no_grad()
def load_weights(model: nn.Module, weights: Callable[[str, torch.Size], torch.Tensor]) -> None:
    """Fill every parameter from its full value: plain tensors copy, DTensors (TP, FSDP,
    both) copy just their local slice. One full parameter at a time is ever in memory."""
    for name, p in model.named_parameters():
        full = weights(name, p.shape)
        if tuple(full.shape) != tuple(p.shape):
            raise ValueError(f"{name}: expected shape {tuple(p.shape)}, got {tuple(full.shape)}")
        _copy_full_into(p, full)


def _copy_full_into(param: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        param.copy_(full.to(param.device, param.dtype))
        return
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        full.shape, param.device_mesh, param.placements
    )
    piece = full[tuple(slice(o, o + n) for n, o in zip(shape, offset, strict=True))]
    local = param.to_local()
    local.copy_(piece.to(local.device, local.dtype))
