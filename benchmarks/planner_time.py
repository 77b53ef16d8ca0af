"""Step times for bench_planner, each paired with how fast this shared machine was right then.

The 2-core box is shared: other jobs take 0-70 % of it, varying within seconds, so a step
time means little without the machine's speed at that moment. Before every timed step all
ranks run the calibration's own probe at once (gpt3d.planner.calibrate.model_flops_per_s: a
small GPT's forward and backward, ~0.1 s); the sum of their rates is the node's compute rate
then. bench_planner scales the calibrated profile by that rate over the calibration's, and
predicts that step.

    torchrun --nproc_per_node=N benchmarks/planner_time.py cases.json out/   (worker)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def node_rate() -> float:
    """Every rank probes at once; the sum of their rates (the node's, this moment)."""
    from gpt3d.planner.calibrate import model_flops_per_s

    if not dist.is_initialized():
        return model_flops_per_s(steps=2)
    dist.barrier()
    rate = torch.tensor([model_flops_per_s(steps=2)], dtype=torch.float64)
    dist.all_reduce(rate)
    return rate.item()


def run_case(spec: dict, out: Path) -> None:
    """Timed steps of one layout with gpt3d's Trainer: [(node rate, slowest rank's step)]."""
    from gpt3d.config import load_config
    from gpt3d.trainer import Trainer

    torch.set_num_threads(1)
    trainer = Trainer.from_config(load_config(spec["args"]))
    for _ in range(spec.get("warmup", 2)):
        trainer.train_step()
    pairs = []
    for _ in range(spec.get("steps", 6)):
        rate = node_rate()
        if dist.is_initialized():
            dist.barrier()
        t0 = time.perf_counter()
        trainer.train_step()
        step = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(step, op=dist.ReduceOp.MAX)
        pairs.append((rate, step.item()))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "pairs.json").write_text(json.dumps(pairs))


if __name__ == "__main__":
    from gpt3d.launch import guarded_main
    from tests.helpers import cases_main

    guarded_main(cases_main(run_case), sys.argv[1:])
