"""Runs several layouts of one world size in a single torchrun launch (launch cost is paid
once) and dumps what the parity tests compare against a 1-process reference:

    <out>/<case>/rank<r>.pt = {"losses": [...], "grad_norms": [...],
                              "grads": {name: full step-1 gradient}, "params": {name: full}}

Usage: torchrun --nproc_per_node=N parity_worker.py <cases.json> <out_dir>
cases.json: {"case name": ["--section.key=value", ...], ...}
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt3d.config import load_config  # noqa: E402
from gpt3d.launch import guarded_main  # noqa: E402
from gpt3d.trainer import Trainer  # noqa: E402
from tests.helpers import cases_main  # noqa: E402


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def named_full(trainer: Trainer, grads: bool) -> dict[str, torch.Tensor]:
    """Full tensors of this rank's parameters (collective over each parameter's mesh)."""
    out = {}
    for chunk in trainer.parts.chunks:
        for name, p in chunk.named_parameters():
            t = p.grad if grads else p
            if t is not None:
                out[name] = full(t)
    return out


def run_case(args: list[str], out: Path, after_step=None) -> None:
    """after_step(trainer), if given, runs after every optimizer step."""
    trainer = Trainer.from_config(load_config(args))
    losses, norms, grads = [], [], {}
    for _ in range(trainer.cfg.training.steps):
        stats = trainer.train_step()
        losses.append(stats.loss)
        norms.append(stats.grad_norm)
        if trainer.step == 1:
            grads = named_full(trainer, grads=True)
        if after_step is not None:
            after_step(trainer)
    params = named_full(trainer, grads=False)
    mesh = trainer.mesh
    writer = mesh is None or (trainer.dp_rank == 0 and mesh["tp"].get_local_rank() == 0)
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        rank = torch.distributed.get_rank() if mesh is not None else 0
        record = {"losses": losses, "grad_norms": norms, "grads": grads, "params": params}
        torch.save(record, out / f"rank{rank}.pt")
    del trainer
    gc.collect()


if __name__ == "__main__":
    guarded_main(cases_main(run_case), sys.argv[1:])
