"""Worker for tests/distributed/test_compression.py: several cases per torchrun launch.

Case kinds (cases.json: {name: {"kind": ..., ...}}):
- "train": {"args": [...]} -> parity_worker.run_case's rank*.pt dump (losses, grad norms,
  step-1 gradients, final parameters).
- "ledger": {"args": [...]} (a PowerSGD run) -> rank*.pt with, per compressed matrix, the
  exact gradient sum over dp_replicate of every step (an extra fp32 all-reduce of a copy
  taken before GradSync runs), the compressed sums GradSync delivered, and the errors left
  on each replica (summed over the axis) after the last step.
- "fixed": {"rank": r, "steps": T} -> PowerSGD alone on synthetic matrices that are the
  same every step (different on every rank): the relative error of the running mean of
  the compressed sums per step, and sum_s S~_s + sum_k E_k against T x the exact sum.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt3d.config import load_config  # noqa: E402
from gpt3d.launch import guarded_main  # noqa: E402
from gpt3d.parallel.powersgd import PowerSGD  # noqa: E402
from gpt3d.parallel.utils import dist_env, init_process_group  # noqa: E402
from gpt3d.trainer import Trainer  # noqa: E402
from tests.distributed.parity_worker import run_case  # noqa: E402
from tests.helpers import cases_main  # noqa: E402


def run(spec: dict, out: Path) -> None:
    kind = spec["kind"]
    if kind == "train":
        run_case(spec["args"], out, after_step=lambda trainer: replica_spread(trainer, out))
    elif kind == "ledger":
        ledger(spec["args"], out)
    elif kind == "fixed":
        fixed_matrices(spec["rank"], spec["steps"], out)
    if dist.is_initialized():
        dist.barrier()


def replica_spread(trainer: Trainer, out: Path) -> None:
    """After the last step: the largest elementwise difference between this rank's
    parameters and its dp_replicate peers' (which hold the same local shards): 0 when the
    replicas stayed identical. Written to <out>/spread_rank<r>.json."""
    if trainer.step != trainer.cfg.training.steps:
        return
    spread = 0.0
    if trainer.mesh is not None and trainer.dims.dp_replicate > 1:
        group = trainer.mesh["dp_replicate"].get_group()
        for p in trainer.params:
            local = p.detach().to_local() if hasattr(p, "to_local") else p.detach()
            hi, lo = local.clone(), local.clone()
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
            if hi.numel():
                spread = max(spread, (hi - lo).max().item())
    out.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    (out / f"spread_rank{rank}.json").write_text(json.dumps({"max_spread": spread}))


def ledger(args: list[str], out: Path) -> None:
    trainer = Trainer.from_config(load_config(args))
    sync = trainer.parts.grad_sync
    group = sync.group
    exact: dict[str, torch.Tensor] = {}
    delivered: dict[str, torch.Tensor] = {}
    reduce = sync.reduce

    def wrapped(step: int) -> None:
        grads = dict(sync.named_local(grads=True))
        names = [n for n, g in grads.items() if sync.powersgd.compressible(g)]
        for n in names:  # the uncompressed sum, for the record only
            full = grads[n].detach().float().clone()
            dist.all_reduce(full, group=group)
            exact[n] = exact.get(n, 0) + full
        reduce(step)
        for n in names:
            delivered[n] = delivered.get(n, 0) + grads[n].detach().float().clone()

    sync.reduce = wrapped
    for _ in range(trainer.cfg.training.steps):
        trainer.train_step()
    errors = {}
    for n in exact:
        e = sync.powersgd.error[n].clone().view(exact[n].shape)
        dist.all_reduce(e, group=group)
        errors[n] = e
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        record = {"exact": exact, "delivered": delivered, "errors": errors}
        torch.save(record, out / "rank0.pt")


def fixed_matrices(rank: int, steps: int, out: Path) -> None:
    """PowerSGD on the same matrices every step: "full" (64, 48) full rank and different on
    every rank; "low" whose sum over the ranks has rank <= `rank` (shared column space)."""
    init_process_group(dist_env(), timeout_s=0)  # a no-op after a "train" case
    group, me = dist.group.WORLD, dist.get_rank()
    g = torch.Generator().manual_seed(100 + me)
    full = torch.randn(64, 48, generator=g)
    u = torch.randn(64, rank, generator=torch.Generator().manual_seed(7))
    low = u @ torch.randn(rank, 48, generator=g)
    exact = {"full": full.clone(), "low": low.clone()}
    for t in exact.values():
        dist.all_reduce(t, group=group)
    psgd = PowerSGD(rank, seed=3)
    total = {k: torch.zeros(64, 48) for k in exact}
    rel_mean: dict[str, list[float]] = {k: [] for k in exact}
    for step in range(steps):
        mats = {"full": full.clone(), "low": low.clone()}
        psgd.all_reduce(list(mats.items()), group)
        for k, m in mats.items():
            total[k] += m
            mean = total[k] / (step + 1)
            rel_mean[k].append(((mean - exact[k]).norm() / exact[k].norm()).item())
    identity = {}
    for k in exact:
        errors = psgd.error[k].clone()
        dist.all_reduce(errors, group=group)
        want = steps * exact[k]
        identity[k] = ((total[k] + errors - want).norm() / want.norm()).item()
    if me == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"rel_mean": rel_mean, "identity": identity}, out / "rank0.pt")


if __name__ == "__main__":
    guarded_main(cases_main(run), sys.argv[1:])
