"""Trainer: builds one rank's share of the run from a preflight RunPlan, then train_step /
evaluate. The same code runs 1 process and any dp x pp x tp layout:

    run = preflight(cfg, world_size, rank)      # every check, no process group yet
    trainer = Trainer(run)                      # process group, mesh, model parts, optimizer
    stats = trainer.train_step()
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt3d import host_memory
from gpt3d.config import Config
from gpt3d.data import ShardedLoader, eval_batches
from gpt3d.errors import TrainingDiverged
from gpt3d.loss import GlobalMeanLoss, detached_local
from gpt3d.model import init_value
from gpt3d.moe import set_aux_scale
from gpt3d.optim import build_optimizer, lr_at, set_lr
from gpt3d.parallel.dims import build_mesh, dp_rank
from gpt3d.parallel.expert_parallel import sync_expert_balance
from gpt3d.parallel.parallelize import build_schedule, compile_mode, materialize, parallelize
from gpt3d.parallel.pipeline import release_evaluation
from gpt3d.parallel.utils import (
    clip_grads_,
    dist_env,
    init_process_group,
    sync_tied_embedding_grads,
)
from gpt3d.preflight import RunPlan, preflight, state_fits_comfortably


def host_allocator(run: RunPlan, device: torch.device) -> tuple[int, int, str]:
    """job.malloc_mmap_threshold_kb -> the glibc mmap thresholds (bytes; 0 = glibc's default)
    to pin for start-up and for training, and why. Auto on a CPU rank: lean while the model
    is built (its transients are one-off: nothing to reuse), then host_mmap_threshold."""
    kb = run.config.job.malloc_mmap_threshold_kb
    if kb >= 0:
        return kb * 1024, kb * 1024, "job.malloc_mmap_threshold_kb"
    if device.type != "cpu":
        return 0, 0, "auto: GPU host"
    sharded = run.dims.dp > 1 and run.config.parallel.dp_mode == "fsdp"
    fits, state = state_fits_comfortably(run.config, run.model, run.dims.world_size)
    training = host_mmap_threshold(sharded, fits)
    kind = "fast" if training == host_memory.FAST_MMAP_THRESHOLD else "lean"
    why = "auto, lean: sharded data parallel" if sharded else f"auto, {kind}: {state}"
    return host_memory.LEAN_MMAP_THRESHOLD, training, why


def host_mmap_threshold(sharded: bool, comfortable: bool) -> int:
    """The auto setting for training on a CPU rank (bytes): fast (a step's temporaries reused
    from the heap, no page faults; the heap keeps freed blocks it cannot reuse, docs/memory.md)
    where the unsharded model state fits comfortably and data parallelism does not shard it;
    lean (freed temporaries leave the resident set) where memory is the constraint."""
    if comfortable and not sharded:
        return host_memory.FAST_MMAP_THRESHOLD
    return host_memory.LEAN_MMAP_THRESHOLD


def _pin(mmap_threshold: int) -> int:
    """Pin glibc's mmap threshold (0: leave glibc alone); the threshold pinned, or 0."""
    pinned = mmap_threshold and host_memory.pin_mmap_threshold(mmap_threshold)
    return mmap_threshold if pinned else 0


@dataclass
class TrainState:
    """The training progress a checkpoint restores besides tensors and the data position."""

    step: int = 0  # optimizer steps taken


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    lr: float
    moe: dict | None = None  # MoE balance metrics (expert_parallel.sync_expert_balance)


class Trainer:
    def __init__(self, run: RunPlan):
        self.run, self.cfg, self.model_cfg, self.dims = run, run.config, run.model, run.dims
        self.env = dist_env()
        startup_malloc, training_malloc, self.malloc_why = host_allocator(run, self.env.device)
        self.malloc_mmap_startup = _pin(startup_malloc)
        init_process_group(self.env, self.cfg.parallel.timeout_s)
        self.mesh = build_mesh(self.dims, self.env.device.type) if self.env.world_size > 1 else None
        t, p = self.cfg.training, self.cfg.parallel
        self.loss_fn = GlobalMeanLoss(t.global_batch_size * t.seq_len, self.model_cfg.vocab_size)
        # The one composition order, in its three steps (gpt3d/parallel/parallelize.py).
        self.parts = parallelize(run, self.mesh)
        materialize(self.parts, self.env.device, self._initial_weights())
        host_memory.release()  # give start-up's transient blocks back to the OS
        self.malloc_mmap_threshold = _pin(training_malloc)
        for chunk in self.parts.chunks:  # the aux loss's gradient scale: coef / global sequences
            set_aux_scale(chunk, self.model_cfg.moe_aux_coef / t.global_batch_size)
        self._model_loss = self._forward_with_loss  # pp = 1: logits -> loss in one call
        stage_scope = t.compile and t.compile_scope == "stage"
        if self.dims.pp > 1:  # parallelize compiled the blocks; stage scope adds the loss
            loss_fn = self.loss_fn
            if stage_scope:
                loss_fn = torch.compile(loss_fn, mode=compile_mode(t))
            build_schedule(self.parts, self.mesh, self.env.device, p, loss_fn)
        elif stage_scope:  # model and loss as one graph
            self._model_loss = torch.compile(self._forward_with_loss, mode=compile_mode(t))
        self.params = self.parts.parameters()
        self.optimizer = build_optimizer(
            self.params, t.lr, t.weight_decay, (t.beta1, t.beta2), t.fused_optimizer
        )
        self.dp_rank = dp_rank(self.mesh, self.dims)
        self.loader = ShardedLoader(
            self.cfg.data.dataset,
            "train",
            t.seq_len,
            t.global_batch_size,
            self.cfg.job.seed,
            self.dp_rank,
            self.dims.dp,
        )
        self.state = TrainState()
        self._eval_batches = None

    @classmethod
    def from_config(cls, cfg: Config) -> Trainer:
        """Preflight for this process's rank and world size, then build."""
        env = dist_env()
        return cls(preflight(cfg, env.world_size, env.rank))

    def _initial_weights(self):
        """weights(name, full_shape, region): the pretrained tensors, else gpt3d's init."""
        if self.run.pretrained is not None:
            return self.run.pretrained
        seed = self.cfg.job.seed
        return lambda name, shape, region: init_value(self.model_cfg, name, shape, seed, region)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group() if self.dims.pp > 1 else None

    def tokens_per_step(self) -> int:
        return self.cfg.training.global_batch_size * self.cfg.training.seq_len

    # ---- one optimizer step --------------------------------------------------------------
    def train_step(self) -> StepStats:
        t = self.cfg.training
        lr = lr_at(self.state.step, t.lr, t.min_lr, t.warmup_steps, t.lr_decay_steps or t.steps)
        set_lr(self.optimizer, lr)
        x, y, _ = self.loader.next_batch()  # (B_local, T) each, B_local = G / dp
        x, y = x.to(self.env.device), y.to(self.env.device)
        self.parts.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.env.device)
        for xm, ym in zip(x.chunk(t.grad_accum), y.chunk(t.grad_accum), strict=True):
            loss += self._forward_backward(xm, ym)
        if self.parts.grad_sync is not None:  # gpt3d's own dp_replicate all-reduce, once a step
            self.parts.grad_sync.reduce(self.state.step)
        self._sync_tied_grads()
        norm = clip_grads_(self.params, t.grad_clip, self.pp_group, self._norm_params())
        loss_value = self._global_sum(loss)
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            raise TrainingDiverged(
                f"loss became {loss_value} (grad norm {norm}) at step {self.state.step + 1}; "
                f"lower training.lr (now {t.lr}) or check the data"
            )
        self.optimizer.step()
        moe = None
        if self.model_cfg.n_experts:  # balancing biases move after the step, before the next
            moe = sync_expert_balance(self.parts.chunks, self.mesh)
        self.state.step += 1
        return StepStats(loss_value, norm, lr, moe)

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One microbatch (or one pipeline schedule run); returns its share of the loss."""
        with self._autocast():
            if self.parts.schedule is None:
                loss = self._model_loss(x, y)
                loss.backward()
                return detached_local(loss)
            losses: list = []
            args = (x,) if self.parts.has_first else ()
            target = y if self.parts.has_last else None
            self.parts.schedule.step(*args, target=target, losses=losses, return_outputs=False)
            return self._sum_losses(losses)

    def _forward_with_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.parts.chunks[0](x), y)

    def _sum_losses(self, losses: list) -> torch.Tensor:
        if not losses:  # not the last stage
            return torch.zeros((), device=self.env.device)
        return torch.stack([detached_local(v) for v in losses]).sum()

    def _autocast(self):
        bf16 = self.cfg.training.dtype == "bfloat16"
        if not bf16 or self.dims.dp > 1:
            return contextlib.nullcontext()  # FSDP's MixedPrecisionPolicy casts instead
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16)

    def _sync_tied_grads(self) -> None:
        """pp > 1 with tied embeddings: first and last stage each hold a copy."""
        if self.dims.pp == 1 or not self.model_cfg.tie_embeddings:
            return
        first, last = self.parts.has_first, self.parts.has_last
        if not (first or last):
            return
        wte = self.parts.chunk_of_stage(0).wte.weight if first else None
        lm_head = (
            self.parts.chunk_of_stage(self.parts.n_stages - 1).lm_head.weight if last else None
        )
        peer = self.dims.pp - 1 if first else 0  # loop placement: last stage on pp rank pp-1
        sync_tied_embedding_grads(wte, lm_head, peer, self.pp_group)

    def _norm_params(self):
        """Count a tied embedding once: skip the last stage's copy when pp > 1."""
        if self.dims.pp == 1 or not self.model_cfg.tie_embeddings or not self.parts.has_last:
            return self.params
        head = self.parts.chunk_of_stage(self.parts.n_stages - 1).lm_head
        return [p for p in self.params if p is not head.weight]

    def _global_sum(self, value: torch.Tensor) -> float:
        """Sum a per-rank loss share over pipeline stages and data-parallel ranks."""
        if self.mesh is not None:
            value = value.clone()
            for axis in ("pp", "dp_replicate", "dp_shard"):
                if self.mesh[axis].size() > 1:
                    dist.all_reduce(value, group=self.mesh[axis].get_group())
        return value.item()

    # ---- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches (same batches every call)."""
        t = self.cfg.training
        if self._eval_batches is None:
            self._eval_batches = eval_batches(
                self.cfg.data.dataset,
                t.seq_len,
                t.global_batch_size,
                t.eval_steps,
                self.dp_rank,
                self.dims.dp,
            )
        self.parts.train(False)
        total = torch.zeros((), device=self.env.device)
        for x, y, _ in self._eval_batches:
            total += self._eval_batch(x.to(self.env.device), y.to(self.env.device))
        if self.parts.schedule is not None:  # no microbatch outputs kept into training
            release_evaluation(self.parts.schedule)
        self.parts.train(True)
        return self._global_sum(total) / len(self._eval_batches)

    def _eval_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            if self.parts.schedule is None:
                return detached_local(self.loss_fn(self.parts.chunks[0](x), y))
            losses: list = []
            args = (x,) if self.parts.has_first else ()
            target = y if self.parts.has_last else None
            self.parts.schedule.eval(*args, target=target, losses=losses, return_outputs=False)
            return self._sum_losses(losses)
