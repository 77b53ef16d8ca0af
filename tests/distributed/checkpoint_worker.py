"""Runs several checkpoint scenarios of one world size in a single torchrun launch.

Usage: torchrun --nproc_per_node=N checkpoint_worker.py <cases.json> <out_dir>
cases.json: {"case": {"kind": "train" | "hf_logits", "args": [...], "faults": {...}}}

kind "train" runs recipes/train.py's train(args) unchanged, and records every batch the
trainer draws from the data loader, one JSON line per draw in <out>/<case>/ids_rank<r>.jsonl:
    {"attempt": torchrun restart count, "dp_rank": d, "ids": [global sample ids]}
kind "hf_logits" builds the Trainer from checkpoint.init_from and saves the full logits of
a fixed batch (<out>/<case>/logits.pt, from the rank holding the last stage, tp/dp rank 0).

Faults (real signals, for the crash and preemption tests):
    kill_in_save: [step, rank]  on attempt 0 that rank writes half of its checkpoint data
                                file for step-N, then SIGKILLs itself
    kill_at_step: [step, rank]  on attempt 1 that rank SIGKILLs itself after that step
    sigterm_at_step: [step, rank]  that rank sends itself SIGTERM after that step
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gpt3d.data import ShardedLoader  # noqa: E402
from gpt3d.launch import guarded_main  # noqa: E402
from gpt3d.trainer import Trainer  # noqa: E402
from tests.helpers import recipe  # noqa: E402

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
RANK = int(os.environ.get("RANK", 0))


ORIGINAL = {"next_batch": ShardedLoader.next_batch, "train_step": Trainer.train_step}


def record_batches(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)

    def next_batch(self):
        x, y, ids = ORIGINAL["next_batch"](self)
        line = {"attempt": ATTEMPT, "dp_rank": self.dp_rank, "ids": ids.tolist()}
        with open(out / f"ids_rank{RANK}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        return x, y, ids

    ShardedLoader.next_batch = next_batch


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def inject_faults(faults: dict) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    if "kill_in_save" in faults and ATTEMPT == 0:
        step, victim = faults["kill_in_save"]
        write_data = FileSystemWriter.write_data

        def half_write_then_die(self, plan, planner):
            if victim == RANK and Path(self.path).name == f"step-{step}.tmp":
                write_data(self, plan, planner).wait()
                data = Path(self.path) / f"__{RANK}_0.distcp"
                os.truncate(data, data.stat().st_size // 2)  # as if killed mid-write
                print(f"fault: rank {RANK} killed while writing step-{step}", flush=True)
                die()
            return write_data(self, plan, planner)

        FileSystemWriter.write_data = half_write_then_die

    def step_with_faults(self):
        stats = ORIGINAL["train_step"](self)
        if faults.get("kill_at_step") == [self.step, RANK] and ATTEMPT == 1:
            print(f"fault: rank {RANK} killed after step {self.step}", flush=True)
            die()
        if faults.get("sigterm_at_step") == [self.step, RANK]:
            os.kill(os.getpid(), signal.SIGTERM)
        return stats

    Trainer.train_step = step_with_faults


def hf_logits(args: list[str], out: Path) -> None:
    from gpt3d.config import load_config

    trainer = Trainer.from_config(load_config(args))  # checkpoint.init_from in args
    g = torch.Generator().manual_seed(0)
    x = torch.randint(trainer.model_cfg.vocab_size, (4, trainer.cfg.training.seq_len), generator=g)
    parts = trainer.parts
    parts.train(False)
    with torch.no_grad():
        if parts.schedule is None:
            logits = parts.chunks[0](x)
        else:
            first = (x,) if parts.has_first else ()
            target = x if parts.has_last else None
            logits = parts.schedule.eval(*first, target=target, losses=[])
    if parts.has_last:
        logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
        mesh = trainer.mesh
        if mesh is None or (trainer.dp_rank == 0 and mesh["tp"].get_local_rank() == 0):
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"x": x, "logits": logits}, out / "logits.pt")


def main(argv: list[str]) -> int:
    cases = json.loads(Path(argv[0]).read_text())
    train = recipe("train")
    for name, case in cases.items():
        out = Path(argv[1]) / name
        if case["kind"] == "hf_logits":
            hf_logits(case["args"], out)
            continue
        record_batches(out)
        inject_faults(case.get("faults", {}))
        code = train(case["args"])
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    guarded_main(main, sys.argv[1:])
