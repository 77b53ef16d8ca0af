"""parity_worker.py for Mixture-of-Experts layouts: the same run_case (losses, grad norms,
full step-1 gradients, final parameters), plus every MoE layer's balancing bias after each
optimizer step, <out>/<case>/bias_rank<r>.pt = {"h.0.moe": [bias after step 1, ...], ...},
written by the same ranks (dp rank 0, tp rank 0; one per pipeline stage).

Usage: torchrun --nproc_per_node=N moe_worker.py <cases.json> <out_dir>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt3d.launch import guarded_main  # noqa: E402
from gpt3d.moe import moe_layers  # noqa: E402
from tests.distributed.parity_worker import run_case  # noqa: E402
from tests.helpers import cases_main  # noqa: E402


def run_moe_case(args: list[str], out: Path) -> None:
    biases: dict[str, list[torch.Tensor]] = {}
    writer = {"rank": None}

    def record(trainer) -> None:
        for chunk in trainer.parts.chunks:
            for name, layer in moe_layers(chunk).items():
                biases.setdefault(name, []).append(layer.expert_bias.detach().cpu().clone())
        mesh = trainer.mesh
        if mesh is None or (trainer.dp_rank == 0 and mesh["tp"].get_local_rank() == 0):
            writer["rank"] = torch.distributed.get_rank() if mesh is not None else 0

    run_case(args, out, after_step=record)
    if writer["rank"] is not None:
        torch.save(biases, out / f"bias_rank{writer['rank']}.pt")


if __name__ == "__main__":
    guarded_main(cases_main(run_moe_case), sys.argv[1:])
