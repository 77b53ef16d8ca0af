"""Trainer: builds everything from a Config through gpt3d.parallel.parallelize, then
train_step / evaluate. The same code runs 1 process and any dp x pp x tp layout."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt3d.config import Config, gpt_config, resolve_plan_path
from gpt3d.data import ShardedLoader, eval_batches, validate_dataset
from gpt3d.loss import GlobalMeanLoss, loss_parallel_context, to_float
from gpt3d.model import GPT, init_value
from gpt3d.optim import build_optimizer, lr_at, set_lr
from gpt3d.parallel.dims import build_mesh, resolve_dims, validate_layout
from gpt3d.parallel.parallelize import parallelize
from gpt3d.parallel.plan import check_plan_matches, load_plan
from gpt3d.parallel.utils import (
    clip_grads_,
    dist_env,
    init_process_group,
    local_tensor,
    sync_tied_embedding_grads,
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf."""


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    lr: float


def preflight(cfg: Config, world_size: int):
    """All checks that need no process group: layout vs world size, model and batch; the
    plan file; the dataset. Returns (GPTConfig, ParallelDims, plan path or None)."""
    gpt = gpt_config(cfg.model)
    dims = resolve_dims(cfg.parallel, world_size)
    validate_layout(dims, gpt, cfg.training, cfg.parallel)
    rules = None
    if dims.tp > 1:
        plan_path = resolve_plan_path(cfg)
        rules = load_plan(plan_path)
        with torch.device("meta"):
            names = [n for n, _ in GPT(gpt).named_modules() if n]
        check_plan_matches(rules, names, plan_path)
    validate_dataset(cfg.data.dataset, gpt.vocab_size, cfg.training.seq_len)
    return gpt, dims, rules


class Trainer:
    def __init__(self, cfg: Config, weights=None):
        """weights(name, full_shape) -> tensor overrides the GPT-2 init (e.g. HF import)."""
        self.cfg, self.env = cfg, dist_env()
        # everything checkable happens before the first collective
        self.gpt, self.dims, self.plan_rules = preflight(cfg, self.env.world_size)
        init_process_group(self.env, cfg.parallel.timeout_s)
        self.mesh = build_mesh(self.dims, self.env.device.type) if self.env.world_size > 1 else None
        t = cfg.training
        self.loss_fn = GlobalMeanLoss(t.global_batch_size * t.seq_len)
        seed = cfg.job.seed
        weights = weights or (lambda name, shape: init_value(self.gpt, name, shape, seed))
        self.model = parallelize(
            self.gpt,
            cfg.parallel,
            t,
            self.dims,
            self.mesh,
            self.env.device,
            weights,
            self.loss_fn,
            self.plan_rules,
        )
        self.params = self.model.parameters()
        self.optimizer = build_optimizer(
            self.params, t.lr, t.weight_decay, (t.beta1, t.beta2), t.fused_optimizer
        )
        self.dp_rank = self._dp_rank()
        data = cfg.data.dataset
        self.loader = ShardedLoader(
            data, "train", t.seq_len, t.global_batch_size, seed, self.dp_rank, self.dims.dp
        )
        self.step = 0
        self.loss_parallel = self.dims.tp > 1 and cfg.parallel.loss_parallel
        self._eval_batches = None

    # ---- setup helpers -------------------------------------------------------------------
    def _dp_rank(self) -> int:
        if self.mesh is None:
            return 0
        rep = self.mesh["dp_replicate"].get_local_rank()
        return rep * self.dims.dp_shard + self.mesh["dp_shard"].get_local_rank()

    @property
    def pp_group(self):
        return self.mesh["pp"].get_group() if self.dims.pp > 1 else None

    # ---- one optimizer step --------------------------------------------------------------
    def train_step(self) -> StepStats:
        t = self.cfg.training
        lr = lr_at(self.step, t.lr, t.min_lr, t.warmup_steps, t.lr_decay_steps or t.steps)
        set_lr(self.optimizer, lr)
        x, y, _ = self.loader.next_batch()  # (B_local, T) each, B_local = G / dp
        x, y = x.to(self.env.device), y.to(self.env.device)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.env.device)
        for xm, ym in zip(x.chunk(t.grad_accum), y.chunk(t.grad_accum), strict=True):
            loss += self._forward_backward(xm, ym)
        self._sync_tied_grads()
        norm = clip_grads_(self.params, t.grad_clip, self.pp_group, self._norm_params())
        loss_value = self._global_sum(loss)
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            raise TrainingDiverged(
                f"loss became {loss_value} (grad norm {norm}) at step {self.step + 1}; "
                f"lower training.lr (now {t.lr}) or check the data"
            )
        self.optimizer.step()
        self.step += 1
        return StepStats(loss_value, norm, lr)

    def check_finite_params(self) -> None:
        """Raise TrainingDiverged if any parameter on any rank is NaN/Inf."""
        ok = torch.stack([local_tensor(p).isfinite().all() for p in self.params]).all().float()
        if self.mesh is not None:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if ok.item() < 1:
            raise TrainingDiverged(
                f"parameters became NaN/Inf after step {self.step}; lower training.lr "
                f"(now {self.cfg.training.lr}); the last checkpoint was kept"
            )

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One microbatch (or one pipeline schedule run); returns its share of the loss."""
        with self._autocast(), loss_parallel_context(self.loss_parallel):
            if self.model.schedule is None:
                loss = self.loss_fn(self.model.parts[0](x), y)
                loss.backward()
                return to_float(loss)
            losses: list = []
            args = (x,) if self.model.has_first else ()
            target = y if self.model.has_last else None
            self.model.schedule.step(*args, target=target, losses=losses, return_outputs=False)
            return self._sum_losses(losses)

    def _sum_losses(self, losses: list) -> torch.Tensor:
        if not losses:  # not the last stage
            return torch.zeros((), device=self.env.device)
        return torch.stack([to_float(v) for v in losses]).sum()

    def _autocast(self):
        bf16 = self.cfg.training.dtype == "bfloat16"
        if not bf16 or self.dims.dp_shard * self.dims.dp_replicate > 1:
            return contextlib.nullcontext()  # FSDP's MixedPrecisionPolicy casts instead
        return torch.autocast(self.env.device.type, dtype=torch.bfloat16)

    def _sync_tied_grads(self) -> None:
        """pp > 1 with tied embeddings: first and last stage each hold a copy."""
        if self.dims.pp == 1 or not self.gpt.tie_embeddings:
            return
        first, last = self.model.has_first, self.model.has_last
        if not (first or last):
            return
        parts = {s: p for s, p in zip(self.model.stage_ids, self.model.parts, strict=True)}
        wte = parts[0].wte.weight if first else None
        lm_head = parts[self.model.n_stages - 1].lm_head.weight if last else None
        peer = self.dims.pp - 1 if first else 0  # loop placement: last stage on pp rank pp-1
        sync_tied_embedding_grads(wte, lm_head, peer, self.pp_group)

    def _norm_params(self):
        """Count a tied embedding once: skip the last stage's copy when pp > 1."""
        if self.dims.pp == 1 or not self.gpt.tie_embeddings or not self.model.has_last:
            return self.params
        head = self.model.parts[self.model.stage_ids.index(self.model.n_stages - 1)].lm_head
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
        self.model.train(False)
        total = torch.zeros((), device=self.env.device)
        for x, y, _ in self._eval_batches:
            total += self._eval_batch(x.to(self.env.device), y.to(self.env.device))
        self.model.train(True)
        return self._global_sum(total) / len(self._eval_batches)

    def _eval_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self._autocast(), loss_parallel_context(self.loss_parallel):
            if self.model.schedule is None:
                return to_float(self.loss_fn(self.model.parts[0](x), y))
            losses: list = []
            args = (x,) if self.model.has_first else ()
            target = y if self.model.has_last else None
            self.model.schedule.eval(*args, target=target, losses=losses)
            return self._sum_losses(losses)

    # ---- state -----------------------------------------------------------------------------
    def tokens_per_step(self) -> int:
        return self.cfg.training.global_batch_size * self.cfg.training.seq_len
