"""Pipeline parallelism: which layers each stage holds, which stages each rank holds, and
the schedule, all from torch.distributed.pipelining.

A stage is the full GPT built on the meta device with everything it does not own removed:
blocks are deleted from the ModuleDict (keys stay "i"), the first stage keeps wte/wpe/drop,
the last keeps ln_f/lm_head. Parameter names never change.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from gpt3d.model import GPT, GPTConfig
from gpt3d.parallel.dims import SINGLE_STAGE_SCHEDULES, V_SCHEDULES


def layer_split(n_layer: int, n_stages: int, explicit: list[int] | None = None) -> list[range]:
    """Blocks per stage: the explicit counts, or an even split with the extra layers going
    to the middle stages (the first and last also carry embeddings and the lm_head)."""
    counts = list(explicit) if explicit else _even_counts(n_layer, n_stages)
    bounds, start = [], 0
    for c in counts:
        bounds.append(range(start, start + c))
        start += c
    return bounds


def _even_counts(n_layer: int, n_stages: int) -> list[int]:
    base, extra = divmod(n_layer, n_stages)
    counts = [base] * n_stages
    order = sorted(range(n_stages), key=lambda s: (s in (0, n_stages - 1), s))
    for s in order[:extra]:
        counts[s] += 1
    return counts


def stages_of_rank(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """Stage indices held by one pp rank: a loop (rank r: r, r+pp, ...) or a V for
    ZBV/DualPipeV (rank r: r and 2pp-1-r, so the last stage sits next to the first)."""
    if schedule in V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + i * pp for i in range(stages_per_rank)]


def build_stage_module(cfg: GPTConfig, stage: int, n_stages: int, layers: range) -> GPT:
    """The stage's slice of the model, on the meta device (materialised later)."""
    with torch.device("meta"):
        model = GPT(cfg)
    for key in list(model.h.keys()):
        if int(key) not in layers:
            del model.h[key]
    if stage != 0:
        model.wte = model.wpe = model.drop = None
    if stage != n_stages - 1:
        model.ln_f = model.lm_head = None
    return model


def build_pipeline_stage(
    module: nn.Module, stage: int, n_stages: int, device, pp_group, sharded_between=False
):
    """sharded_between: FSDP stays sharded between microbatches
    (parallel.fsdp_reshard_per_microbatch)."""
    return stage_class(sharded_between)(module, stage, n_stages, device, group=pp_group)


def stage_class(sharded_between: bool):
    """gpt3d's PipelineStage, or with sharded_between the one that also keeps FSDP sharded
    between microbatches (parallel.fsdp_reshard_per_microbatch)."""
    stage, sharded = _stage_classes()
    return sharded if sharded_between else stage


@functools.cache
def _stage_classes():
    """(Stage, ShardedBetweenMicrobatchesStage), built on first use (torch.distributed's
    pipelining is imported lazily)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining._backward import stage_backward

    class Stage(PipelineStage):
        """torch's PipelineStage, except that without a backward (evaluation) the last stage
        keeps one microbatch's output at a time: torch 2.13 keeps every microbatch's
        (output, inputs) for a backward that never comes, until the next step starts, so
        the last stage held all microbatches' logits (B x T x V/tp each) through the
        evaluation and into the next training step. The previous microbatch's entry goes
        when the next one starts (the schedule reads it once more after its forward, to
        send nothing); release_evaluation drops the last one."""

        def forward_one_chunk(self, fwd_chunk_id, args, kwargs=None, save_forward_output=True):
            if self.is_last and not self.has_backward:
                self.fwd_cache.clear()  # earlier microbatches': their losses are computed
            return super().forward_one_chunk(fwd_chunk_id, args, kwargs, save_forward_output)

    class ShardedBetweenMicrobatchesStage(Stage):
        """A Stage whose backward leaves FSDP's settings alone. torch 2.13's stage turns
        reshard-after-backward and gradient sync off for every microbatch but the last
        (backward_maybe_with_nosync), so an FSDP stage stays unsharded, with unsharded
        gradients, for the whole step. Here every microbatch's backward is a plain FSDP
        backward: each block is resharded and its gradient reduce-scattered into the sharded
        gradient (FSDP2 adds to it), as in gradient accumulation without pipelining. Full
        backward only (preflight refuses the split-backward schedules)."""

        def backward_maybe_with_nosync(self, backward_type, bwd_kwargs, last_backward=False):
            if backward_type != "full":
                raise RuntimeError(f"{backward_type} backward: only a full backward keeps FSDP "
                                   "sharded between microbatches")  # fmt: skip
            grads = stage_backward(
                bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"]
            )
            return grads, None

    return Stage, ShardedBetweenMicrobatchesStage


def release_evaluation(schedule) -> None:
    """Drop what a forward-only step (schedule.eval) left in this rank's stages: the
    microbatches' outputs and inputs kept for a backward (the next step would clear them
    only when it starts)."""
    for stage in schedule_stages(schedule):
        stage.clear_runtime_states()


def schedule_stages(schedule) -> list:
    """This rank's PipelineStages in a schedule (one, or several for multi-stage ones)."""
    return getattr(schedule, "_stages", None) or [schedule._stage]


def build_schedule(name: str, stages: list, n_microbatches: int, loss_fn):
    """Schedule by name. scale_grads=False: the loss is already normalised by the global
    token count (gpt3d/loss.py), so the schedule must not divide by microbatches again."""
    from torch.distributed.pipelining.schedules import get_schedule_class

    cls = get_schedule_class(name)
    if name in SINGLE_STAGE_SCHEDULES:
        (stage,) = stages
        return cls(stage, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
