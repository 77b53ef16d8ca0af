"""Per-rank memory from gpt3d's own build path, without allocating: fake tensors, a fake
process group, and one optimizer step of bookkeeping.

For one global rank of a run (a gpt3d.preflight.RunPlan):

    init_process_group("fake", rank, world)       collectives return at once, move nothing
    build_mesh -> parallelize(run, mesh)          gpt3d's plan file, pipeline cut, TP, AC, FSDP
    under FakeTensorMode (shapes, no storage):
      allocate the chunks (materialize's steps)   to_empty, re-tie, buffers
      AdamW (build_optimizer), the schedule       gpt3d's schedule class, torch's PipelineStage
      a warm-up step, then one measured step      zero_grad, fwd/bwd or schedule.step, tied
                                                  embedding sync, optimizer step

counted by gpt3d/planner/livebytes.py. The result is the MemoryBreakdown every estimator
returns (gpt3d/planner/memory.py):

    params, grads, optimizer   this rank's state after the step (local shards)
    activations                the peak of tensors saved for backward
    temporaries                everything else alive at the step's peak of live bytes:
                               unsharded parameters and gradients, logits, pipeline buffers,
                               recomputed blocks, collective buffers
    detail["peak"]             the live-byte peak itself (gradients may not all exist yet at
                               it, so peak <= total, which counts them whole)

Pipelines: torch's PipelineStage learns shapes by sending metadata to its neighbours, which a
fake group cannot answer, so each stage is told its input and output shapes (static
metadata) and the schedule's warm-up vote is answered "static".

Isolation: each estimate runs in a fresh Python process (`estimate`). DTensor caches sharding
and redistribution plans by mesh *value*: a second mesh of the same shape in one process (a
second estimate, or the real run after an estimate) would reuse plans that carry the first
mesh's process groups. `fake_memory` itself is for a process that builds no other mesh.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace

import torch
import torch.distributed as dist

from gpt3d.planner.livebytes import IndexArithmetic, LiveBytes
from gpt3d.planner.memory import MemoryBreakdown


def run_plan(w, lay):
    """The RunPlan recipes/train.py would build for a planner Workload and Layout (gpt3d's
    config loading, layout checks and plan file; no dataset or checkpoint involved)."""
    from gpt3d.config import gpt_config, load_config
    from gpt3d.parallel.dims import resolve_dims
    from gpt3d.planner.layout import train_args
    from gpt3d.preflight import RunPlan, _plan_rules, check_layout, choose_embedding_sharding

    cfg = load_config(train_args(w, lay))
    model = gpt_config(cfg.model)
    dims = resolve_dims(cfg.parallel, lay.world)
    check_layout(dims, model, cfg.training, cfg.parallel)
    rules = _plan_rules(model, cfg, dims) if dims.tp > 1 or dims.ep > 1 else ()
    tp_rules = tuple(r for r in rules if r.section == "modules") if dims.tp > 1 else ()
    choose_embedding_sharding(cfg, model, dims, tp_rules)  # as recipes/train.py resolves it
    ep_rules = tuple(r for r in rules if r.section == "experts")
    return RunPlan(cfg, model, dims, tp_rules, {}, None, None, ep_rules)


def fake_memory(run, rank: int = 0, device_type: str = "cpu") -> MemoryBreakdown:
    """The breakdown of global rank `rank`, measured on fake tensors in this process (which
    must have no process group, and should build no other mesh: see the module docstring)."""
    import torch.distributed._tools.fake_collectives  # noqa: F401  fake kernels of c10d ops
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("fake_memory needs a process without a process group")
    world = run.dims.world_size
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    try:
        return _measure(run, torch.device(device_type), rank)
    finally:
        dist.destroy_process_group()


def estimate(run, ranks=None, device_type: str = "cpu", timeout: float = 600, workers: int = 2):
    """fake_memory of each rank (default: one per pipeline rank, its first global rank: tp
    and dp peers hold the same shapes), each in a fresh process, `workers` at a time.
    Raises RuntimeError with the child's error when an estimate fails."""
    if ranks is None:
        per_stage = run.dims.world_size // run.dims.pp
        ranks = [p * per_stage for p in range(run.dims.pp)]
    payload = pickle.dumps(replace(run, pretrained=None, resume=None))

    def one(rank: int) -> MemoryBreakdown:
        cmd = [sys.executable, "-m", "gpt3d.planner.fake", str(rank), device_type]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)  # the child starts its own (fake) world
        out = subprocess.run(cmd, input=payload, capture_output=True, timeout=timeout, env=env)
        if out.returncode != 0:
            error = out.stderr.decode()[-3000:]
            raise RuntimeError(f"fake estimate of rank {rank} failed:\n{error}")
        return MemoryBreakdown(**json.loads(out.stdout.decode().splitlines()[-1]))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, ranks))


def _measure(run, device: torch.device, rank: int) -> MemoryBreakdown:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gpt3d.parallel.dims import build_mesh
    from gpt3d.parallel.parallelize import parallelize

    dims = run.dims
    mesh = build_mesh(dims, device.type) if dims.world_size > 1 else None
    parts = parallelize(run, mesh)  # on the meta device: plan file, stage cut, TP, AC, FSDP
    pp_group = mesh["pp"].get_group() if dims.pp > 1 else None  # sub-meshes: real tensors
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    meter = LiveBytes(fake)
    with fake, meter.tracking(), IndexArithmetic():
        step = _Step(run, parts, device, pp_group)
        meter.skip = {meter.track(p) for p in step.params}
        step()  # warm-up: AdamW state, pipeline buffers, FSDP's lazy init
        meter.reset_peak()
        step()
        return meter.breakdown(step.params, step.optimizer, run.dims, rank)


def measure_real(cfg) -> MemoryBreakdown:
    """The same measurement on a real run, for this process's rank (under torchrun): the
    Trainer built inside the meter (every storage it allocates counts), a warm-up step,
    one measured step. What tests and benchmarks/bench_planner.py compare estimates with."""
    from gpt3d.trainer import Trainer

    meter = LiveBytes(None)
    with meter.tracking():
        trainer = Trainer.from_config(cfg)
        meter.skip = {meter.track(p) for p in trainer.params}
        trainer.train_step()
        meter.reset_peak()
        trainer.train_step()
    return meter.breakdown(trainer.params, trainer.optimizer, trainer.dims, trainer.env.rank)


def allocate(parts, device: torch.device) -> None:
    """gpt3d.parallel.parallelize.materialize without filling values (a fake tensor has
    none; tests/unit/test_planner_fake.py checks both allocate the same tensors)."""
    from gpt3d.moe import reset_moe_state
    from gpt3d.parallel.tensor_parallel import retie_embeddings

    for chunk in parts.chunks:
        chunk.to_empty(device=device)
        retie_embeddings(chunk)
        chunk.reset_buffers()
        reset_moe_state(chunk)


class _Step:
    """What Trainer.train_step does to memory: zero_grad, forward/backward per microbatch or
    one schedule step, the tied-embedding gradient sync, the optimizer step. (Clipping and
    the loss all-reduce move scalars only; the data loader is replaced by token ids.)"""

    def __init__(self, run, parts, device: torch.device, pp_group):
        from gpt3d.loss import GlobalMeanLoss
        from gpt3d.moe import set_aux_scale
        from gpt3d.optim import build_optimizer

        t, dims, model = run.config.training, run.dims, run.model
        self.run, self.parts, self.device, self.pp_group = run, parts, device, pp_group
        allocate(parts, device)
        for chunk in parts.chunks:
            set_aux_scale(chunk, model.moe_aux_coef / t.global_batch_size)
        self.params = parts.parameters()
        betas = (t.beta1, t.beta2)
        self.optimizer = build_optimizer(
            self.params, t.lr, t.weight_decay, betas, t.fused_optimizer
        )
        self.loss_fn = GlobalMeanLoss(t.global_batch_size * t.seq_len, model.vocab_size)
        shape = (t.global_batch_size // dims.dp, t.seq_len)  # this rank's (B_local, T)
        self.x = torch.zeros(shape, dtype=torch.long, device=device)
        self.y = torch.zeros(shape, dtype=torch.long, device=device)
        if dims.pp > 1:
            parts.schedule = static_schedule(run, parts, device, pp_group, self.loss_fn)

    def __call__(self) -> None:
        t, parts = self.run.config.training, self.parts
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            if parts.schedule is None:
                xs, ys = self.x.chunk(t.grad_accum), self.y.chunk(t.grad_accum)
                for x, y in zip(xs, ys, strict=True):
                    self.loss_fn(parts.chunks[0](x), y).backward()
            else:
                args = (self.x,) if parts.has_first else ()
                target = self.y if parts.has_last else None
                parts.schedule.step(*args, target=target, losses=[], return_outputs=False)
        self.sync_tied_grads()
        self.optimizer.step()

    def autocast(self):
        """As Trainer._autocast: bf16 autocast without data parallelism, else FSDP casts."""
        if self.run.config.training.dtype != "bfloat16" or self.run.dims.dp > 1:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync_tied_grads(self) -> None:
        """As Trainer._sync_tied_grads (the first and last stages' copies of wte)."""
        from gpt3d.parallel.utils import sync_tied_embedding_grads

        parts, dims = self.parts, self.run.dims
        if dims.pp == 1 or not self.run.model.tie_embeddings:
            return
        if not (parts.has_first or parts.has_last):
            return
        wte = parts.chunk_of_stage(0).wte.weight if parts.has_first else None
        last = parts.chunk_of_stage(parts.n_stages - 1) if parts.has_last else None
        peer = dims.pp - 1 if parts.has_first else 0
        sync_tied_embedding_grads(wte, last.lm_head.weight if last else None, peer, self.pp_group)


def static_schedule(run, parts, device: torch.device, pp_group, loss_fn):
    """gpt3d's schedule (gpt3d.parallel.pipeline.build_schedule) over PipelineStages told
    their shapes: inputs (B_mb, T, C) hidden states (T / tp under sequence parallelism) in
    the residual stream's dtype (bf16 when FSDP casts, fp32 under autocast or fp32), token
    ids on stage 0; outputs from one forward of each chunk."""
    from gpt3d.parallel import pipeline as pp_lib
    from gpt3d.parallel.dims import n_microbatches

    cfg, dims, model = run.config, run.dims, run.model
    t, m = cfg.training, n_microbatches(cfg.parallel)
    rows = t.global_batch_size // (dims.dp * m)
    seq = t.seq_len // (dims.tp if cfg.parallel.sequence_parallel else 1)
    hidden = torch.bfloat16 if t.dtype == "bfloat16" and dims.dp > 1 else torch.float32
    stages, cls = [], pp_lib.stage_class(cfg.parallel.fsdp_reshard_per_microbatch)
    for chunk, s in zip(parts.chunks, parts.stage_ids, strict=True):
        if s == 0:
            inp = torch.zeros(rows, t.seq_len, dtype=torch.long, device=device)
        else:
            inp = torch.empty(rows, seq, model.n_embd, dtype=hidden, device=device)
            inp.requires_grad_(True)
        with torch.no_grad(), _autocast_like(run, device):
            out = chunk(inp).detach().requires_grad_(True)
        stage = cls(
            chunk, s, parts.n_stages, device, input_args=inp, output_args=out, group=pp_group
        )
        stages.append(stage)
    schedule = pp_lib.build_schedule(cfg.parallel.pp_schedule, stages, m, loss_fn)
    schedule._warmup_p2p = _static_votes  # the neighbours' shapes are known: no exchange
    return schedule


def _autocast_like(run, device: torch.device):
    if run.config.training.dtype != "bfloat16" or run.dims.dp > 1:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _static_votes(stages, has_backward, p2p_done) -> None:
    """The schedule's warm-up vote, answered: every stage has static metadata."""
    from torch.distributed.pipelining.stage import InferenceMode

    for stage in stages:
        stage._inference_mode = InferenceMode.STATIC


class _RunPlanUnpickler(pickle.Unpickler):
    """Builds only the dataclasses a RunPlan is made of (stdin is not trusted to be estimate's
    own payload: any other class or callable is refused, so nothing runs on load)."""

    def find_class(self, module: str, name: str):
        from gpt3d import config, model, preflight
        from gpt3d.parallel import dims, tensor_parallel

        allowed = [preflight.RunPlan, model.GPTConfig, dims.ParallelDims, tensor_parallel.Rule]
        allowed += [c for c in vars(config).values() if isinstance(c, type) and
                    c.__module__ == config.__name__ and c.__name__.endswith("Config")]  # fmt: skip
        for cls in allowed:
            if (cls.__module__, cls.__qualname__) == (module, name):
                return cls
        raise pickle.UnpicklingError(f"a RunPlan never holds {module}.{name}; refusing it")


def _main(argv: list[str]) -> None:
    """python -m gpt3d.planner.fake RANK DEVICE_TYPE < pickled RunPlan: one JSON line."""
    run = _RunPlanUnpickler(sys.stdin.buffer).load()
    mb = fake_memory(run, int(argv[0]), argv[1])
    print(json.dumps(asdict(mb)), flush=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
