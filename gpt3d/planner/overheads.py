"""Framework overheads of gpt3d's step on this machine, for the CPU cost model.

FLOPs and bytes miss what a small model on a CPU spends most of its step on: Python, autograd
and dispatcher work per op, DTensor's sharding propagation, FSDP's hooks and buffer copies,
the pipeline schedule's bookkeeping per action. `recipes/plan.py --calibrate` measures them
by timing gpt3d's real Trainer on a tiny model (2 layers x 64, vocab 256, 8 x 32 tokens,
where compute is a few percent of the step) in six runs and subtracting what the cost model
already predicts (compute, communication, optimizer) from each:

    1 process, grad_accum 1 and 4     per step (S) and per block and microbatch (B)
    tp 2 / FSDP 2 / DDP 2             extra per block and microbatch (T / F / D)
    pp 2, 1F1B, 4 microbatches        per schedule action (P: one F or B of one stage)

The cost model (gpt3d/planner/cost.py) adds S + microbatches x blocks x (B + T|F|D) +
actions x P, divided by the compute share when processes outnumber cores. GPU profiles have
none (their per-op costs hide behind asynchronous kernels at the sizes the planner is for).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch

MODEL = ["--model.preset=tiny", "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64",
         "--model.block_size=32", "--model.vocab_size=256", "--training.seq_len=32",
         "--training.global_batch_size=8", "--training.eval_interval=0",
         "--training.warmup_steps=0", "--checkpoint.save_final=false", "--metrics.plot=false",
         "--training.memory_check=off"]  # fmt: skip
PP = ["--parallel.pp=2", "--parallel.pp_schedule=1F1B", "--parallel.pp_microbatches=4"]
CASES = {
    1: {"one": [], "accum4": ["--training.grad_accum=4"]},
    2: {
        "tp": ["--parallel.tp=2"],
        "fsdp": ["--parallel.dp_mode=fsdp", "--parallel.dp_shard=2"],
        "ddp": ["--parallel.dp_mode=ddp"],
        "pp": PP,
    },
}
STEPS, WARMUP = 6, 2


def measure_overheads(profile) -> dict[str, float]:
    """{"step", "block", "tp", "fsdp", "ddp", "pp_action"}: seconds, fitted as above."""
    with tempfile.TemporaryDirectory() as tmp:
        data = _dataset(Path(tmp) / "data")
        best = {}
        for world, cases in CASES.items():
            best.update(_launch(world, cases, data, Path(tmp)))
    return fit(best, profile)


def fit(best: dict[str, float], profile) -> dict[str, float]:
    """Residuals (measured best step - the cost model without overheads) -> constants."""
    from dataclasses import replace

    from gpt3d.planner.cost import estimate_time
    from gpt3d.planner.hardware import Cluster
    from gpt3d.planner.layout import Layout, Workload

    bare = replace(profile, overhead_s={})
    w = Workload.from_preset("tiny", 32, 8, "float32", 1, "cpu", n_layer=2, n_head=2,
                             n_embd=64, block_size=32, vocab_size=256)  # fmt: skip
    layouts = {"one": Layout(), "accum4": Layout(grad_accum=4), "tp": Layout(tp=2),
               "fsdp": Layout(dp_shard=2), "ddp": Layout(dp_replicate=2, dp_mode="ddp"),
               "pp": Layout(pp=2, microbatches=4)}  # fmt: skip
    r = {}
    for name, lay in layouts.items():
        predicted = estimate_time(w, lay, Cluster(lay.world, lay.world, bare)).step
        r[name] = best[name] - predicted
    block = max(0.0, (r["accum4"] - r["one"]) / 6)  # 2 blocks x (4 - 1) microbatches
    step = max(0.0, r["one"] - 2 * block)
    per_block = {k: max(0.0, (r[k] - step) / 2 - block) for k in ("tp", "fsdp", "ddp")}
    # pp: each rank runs 1 block x 4 microbatches and 8 actions (4 F + 4 B)
    action = max(0.0, (r["pp"] - step - 4 * block) / 8)
    return {"step": step, "block": block, **per_block, "pp_action": action}


def _dataset(path: Path) -> Path:
    """Synthetic tokens in recipes/prepare.py's format."""
    import numpy as np

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 50_000), ("val", 4_000)):
        rng.integers(0, 256, n).astype(np.uint16).tofile(path / f"{split}.bin")
    meta = {"tokenizer": "synthetic", "vocab_size": 256, "eot_id": 0, "dtype": "uint16",
            "train_tokens": 50_000, "val_tokens": 4_000}  # fmt: skip
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def _launch(world: int, cases: dict, data: Path, tmp: Path) -> dict[str, float]:
    import torch.multiprocessing as mp

    out = tmp / f"overheads{world}.json"
    os.environ["OMP_NUM_THREADS"] = "1"
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, cases, str(data), str(out)), nprocs=world, join=True)
    return json.loads(out.read_text())


def _worker(rank: int, world: int, port: int, cases: dict, data: str, out: str) -> None:
    """One process of a calibration launch: every case's best step (slowest rank)."""
    import torch.distributed as dist

    from gpt3d.config import load_config
    from gpt3d.trainer import Trainer

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    best = {}
    for name, args in cases.items():
        cfg = load_config([*MODEL, f"--data.dataset={data}", *args])
        trainer = Trainer.from_config(cfg)
        for _ in range(WARMUP):
            trainer.train_step()
        times = []
        for _ in range(STEPS):
            if dist.is_initialized():
                dist.barrier()
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
        step = torch.tensor([min(times)])
        if dist.is_initialized():
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
        best[name] = step.item()
        del trainer
    if rank == 0:
        Path(out).write_text(json.dumps(best))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)  # no interpreter teardown: gloo can abort at exit (docs/torch_notes.md)
