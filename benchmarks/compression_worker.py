"""Worker of benchmarks/bench_compression.py (one torchrun launch per layout or for the
convergence runs): cases.json {name: {"kind": "speed" | "converge", ...}} -> <out>/<name>/
rank<r>.json.

- speed: every option of one layout built at once; per option, counting steps with
  torch.distributed's collectives wrapped (payload bytes, socket bytes from /proc/self/io,
  seconds, per mesh axis), then timed steps round-robin over the options.
- converge: one option trained on the corpus, train loss every step, val loss every
  eval_every steps.

    torchrun --nproc_per_node=N benchmarks/compression_worker.py cases.json out/
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt3d.config import load_config  # noqa: E402
from gpt3d.launch import guarded_main  # noqa: E402
from gpt3d.trainer import Trainer  # noqa: E402
from tests.helpers import cases_main  # noqa: E402


class CollectiveCounter:
    """Wraps torch.distributed's collectives: per axis, payload bytes and socket bytes."""

    NAMES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single")
    GATHERS = ("all_gather_into_tensor", "all_gather_single")

    def __init__(self, mesh):
        self.dist, self.axes = dist, {}
        for axis in mesh.mesh_dim_names:
            group = mesh[axis].get_group()
            ranks = tuple(dist.get_process_group_ranks(group))
            if len(ranks) > 1:
                self.axes[ranks] = axis
        self.reset()

    def reset(self):
        self.counts: dict[str, dict[str, int]] = {}

    def _axis(self, group) -> str:
        ranks = tuple(self.dist.get_process_group_ranks(group or self.dist.group.WORLD))
        return self.axes.get(ranks, "local" if len(ranks) == 1 else f"ranks {ranks}")

    def _wrap(self, name: str, kind: str):
        original = getattr(self.dist, name)
        signature = inspect.signature(original)

        def wrapped(*args, **kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            tensor = next(bound[k] for k in ("tensor", "input", "input_tensor") if k in bound)
            before, t0 = _wchar(), time.perf_counter()
            work = original(*args, **kwargs)
            if work is not None and bound.get("async_op"):
                work.wait()  # counting steps only: this call's bytes, not a later one's
            entry = self.counts.setdefault(self._axis(bound.get("group")), {})
            for key, value in (
                ("payload", tensor.numel() * tensor.element_size()),
                ("socket", _wchar() - before),
                ("seconds", time.perf_counter() - t0),
                ("calls", 1),
            ):
                entry[f"{kind}_{key}"] = entry.get(f"{kind}_{key}", 0) + value
            return work

        return original, wrapped

    @contextlib.contextmanager
    def counting(self):
        patched = {}
        for names, kind in ((self.NAMES, "reduce"), (self.GATHERS, "gather")):
            for name in names:
                if hasattr(self.dist, name):
                    original, wrapped = self._wrap(name, kind)
                    patched[name] = original
                    setattr(self.dist, name, wrapped)
        try:
            yield
        finally:
            for name, original in patched.items():
                setattr(self.dist, name, original)


def _wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    return 0


def speed_case(spec: dict, out: Path) -> None:
    """Every option of one layout, built together, stepped round-robin."""
    torch.set_num_threads(1)
    trainers = {
        name: Trainer.from_config(load_config([*spec["args"], *extra]))
        for name, extra in spec["options"].items()
    }
    counter = CollectiveCounter(next(iter(trainers.values())).mesh)
    record = {"rank": dist.get_rank(), "options": {}}
    for name, trainer in trainers.items():
        for _ in range(spec["warmup"]):
            trainer.train_step()
        steps = []
        with counter.counting():
            for _ in range(spec["count_steps"]):
                counter.reset()
                trainer.train_step()
                steps.append(counter.counts)
        # bytes: the same every step (max); seconds: the least disturbed step (min)
        per_step = {
            axis: {
                k: (min if k.endswith("seconds") else max)(s.get(axis, {}).get(k, 0) for s in steps)
                for k in steps[0][axis]
            }
            for axis in steps[0]
        }
        record["options"][name] = {"bytes": per_step, "step_s": [], "losses": []}
    for _ in range(spec["steps"]):
        for name, trainer in trainers.items():
            dist.barrier()
            t0 = time.perf_counter()
            stats = trainer.train_step()
            record["options"][name]["step_s"].append(time.perf_counter() - t0)
            record["options"][name]["losses"].append(stats.loss)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
    del trainers
    gc.collect()


def converge_case(spec: dict, out: Path) -> None:
    torch.set_num_threads(1)
    trainer = Trainer.from_config(load_config(spec["args"]))
    losses, val, t0 = [], {}, time.perf_counter()
    while trainer.step < trainer.cfg.training.steps:
        losses.append(trainer.train_step().loss)
        if trainer.step % spec["eval_every"] == 0 or trainer.step == trainer.cfg.training.steps:
            val[trainer.step] = trainer.evaluate()
    record = {"losses": losses, "val": val, "seconds": time.perf_counter() - t0}
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rank0.json").write_text(json.dumps(record))
    del trainer
    gc.collect()


def worker_main(argv: list[str]) -> int:
    def run(spec: dict, out: Path) -> None:
        (speed_case if spec["kind"] == "speed" else converge_case)(spec, out)

    return cases_main(run)(argv)


if __name__ == "__main__":
    guarded_main(worker_main, sys.argv[1:])
