"""One rank of a chaos run: recipes/train.py's train(args) unchanged, plus real SIGKILLs at
random moments that tests/distributed/chaos.py planned, and records of what happened.

Usage: torchrun --max-restarts=K chaos_worker.py <plan.json> <record_dir>
plan.json: {"args": [...], "kills": [{"attempt": a, "rank": r, "when": ..., ...}]}

Kills (at most one per attempt; the victim SIGKILLs itself, so the moment is exact):
    step     {"nth": j, "fraction": f}  the j-th step of the attempt: a timer fires f x (the
                                        attempt's mean step time) after the step starts
    save     {"nth": j, "fraction": f}  the j-th checkpoint write of the attempt (async: in
                                        the background thread): the rank's data file is cut
                                        to f of its size, then the rank dies
    startup  {"phase": p, "delay": d}   attempt >= 1, d seconds into a start-up phase:
                                        rendezvous (before the process group), process_group
                                        (after it), load (reading the checkpoint), first_step

Records in <record_dir>: ids_rank<r>.jsonl (every batch drawn, tests/distributed/
checkpoint_worker.py), attempts.jsonl (rank 0: the step each attempt started training at),
kills.jsonl (the victim, just before dying: steps done, the latest complete checkpoint).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import gpt3d.trainer  # noqa: E402
from gpt3d.checkpoint_dir import STEP_DIR, latest_complete  # noqa: E402
from gpt3d.checkpoint_safety import SafeFileSystemReader  # noqa: E402
from gpt3d.launch import guarded_main  # noqa: E402
from tests.distributed.checkpoint_worker import die, record_batches  # noqa: E402
from tests.helpers import recipe  # noqa: E402

ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
RANK = int(os.environ.get("RANK", 0))
LIVE: dict = {"trainer": None, "start": None, "times": [], "saves": 0}


def append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Chaos:
    def __init__(self, kill: dict | None, record: Path, ckpt_root: Path):
        self.kill, self.record, self.root = kill, record, ckpt_root

    def fire(self, moment: str) -> None:
        """Record the moment, then SIGKILL this process."""
        latest = latest_complete(self.root)
        trainer = LIVE["trainer"]
        done = trainer.step if trainer is not None else None
        line = {
            "attempt": ATTEMPT,
            "rank": RANK,
            "when": self.kill["when"],
            "moment": moment,
            "steps_done": done,
            "latest": int(STEP_DIR.match(latest.name)[1]) if latest is not None else 0,
            "time": time.time(),
        }
        append(self.record / "kills.jsonl", line)
        print(f"chaos: rank {RANK} killed ({moment})", flush=True)
        die()

    def wants(self, when: str) -> bool:
        return self.kill is not None and self.kill["when"] == when


def install(chaos: Chaos) -> None:
    """Wrap the points where a kill can land; every wrapper calls the original."""
    step_orig = gpt3d.trainer.Trainer.train_step
    pg_orig = gpt3d.trainer.init_process_group
    read_orig = SafeFileSystemReader.read_data
    from torch.distributed.checkpoint import FileSystemWriter

    write_orig = FileSystemWriter.write_data
    kill = chaos.kill or {}

    def startup(phase: str) -> None:
        if chaos.wants("startup") and kill["phase"] == phase:
            time.sleep(kill["delay"])
            chaos.fire(f"start-up: {phase}")

    def train_step(self):
        if LIVE["trainer"] is None:  # the first step of this attempt
            LIVE["trainer"], LIVE["start"] = self, self.step
            if RANK == 0:
                append(chaos.record / "attempts.jsonl", {"attempt": ATTEMPT, "start": self.step})
            if chaos.wants("startup"):  # a phase this attempt never reached ends here
                kill["phase"] = "first_step"
            startup("first_step")
        nth = self.step - LIVE["start"] + 1
        if chaos.wants("step") and nth == kill["nth"]:
            mean = sum(LIVE["times"]) / len(LIVE["times"])
            delay = kill["fraction"] * mean
            threading.Timer(delay, chaos.fire, (f"step {self.step + 1}, {delay:.2f}s in",)).start()
        t0 = time.perf_counter()
        stats = step_orig(self)
        LIVE["times"].append(time.perf_counter() - t0)
        return stats

    def init_process_group(*args, **kwargs):
        startup("rendezvous")
        pg_orig(*args, **kwargs)
        startup("process_group")

    def read_data(self, plan, planner):
        startup("load")
        return read_orig(self, plan, planner)

    def write_data(self, plan, planner):
        LIVE["saves"] += 1
        if not (chaos.wants("save") and LIVE["saves"] == kill["nth"]):
            return write_orig(self, plan, planner)
        write_orig(self, plan, planner).wait()
        data = Path(self.path) / f"{plan.storage_data.prefix}0.distcp"
        os.truncate(data, int(data.stat().st_size * kill["fraction"]))  # as if cut mid-write
        chaos.fire(f"writing {Path(self.path).name}, {kill['fraction']:.0%} on disk")

    gpt3d.trainer.Trainer.train_step = train_step
    gpt3d.trainer.init_process_group = init_process_group
    SafeFileSystemReader.read_data = read_data
    FileSystemWriter.write_data = write_data


def main(argv: list[str]) -> int:
    plan = json.loads(Path(argv[0]).read_text())
    record = Path(argv[1])
    record_batches(record)
    mine = [k for k in plan["kills"] if k["attempt"] == ATTEMPT and k["rank"] == RANK]
    args = plan["args"]
    out = next(a.split("=", 1)[1] for a in args if a.startswith("--job.output_dir="))
    install(Chaos(mine[0] if mine else None, record, Path(out) / "checkpoints"))
    return recipe("train")(args)


if __name__ == "__main__":
    guarded_main(main, sys.argv[1:])
