"""Benchmark worker: runs several cases (layouts) in one launch with gpt3d's real Trainer
and writes <out>/<case>/rank<r>.json per rank.

    python worker.py cases.json out/                      # 1 process
    torchrun --nproc_per_node=N worker.py cases.json out/

cases.json: {name: {"args": [--section.key=value ...], "warmup": 2, "steps": 5,
                    "memory": false, "stage_compute": false, "threads": 1,
                    "barrier": true, "profile": 0, "warm_baseline": false}}
Per rank: step times (whole train_step and the forward/backward or pipeline-schedule part),
and optionally bytes held (parameters, gradients, optimizer state, saved activations) and the
pipeline stages' compute time per microbatch without communication, after each step.
barrier: start each timed step together (false: free-running steps, as a plain training loop
times them). profile: after the timed steps, that many more steps under torch.profiler, each a
`bench_step#<i>` range, written as <out>/trace_rank<r>.json (bench_breakdown reads them).
warm_baseline: take the resident-memory baseline after one step of the same layout on a
near-zero-size model (warm_up_process), so that RSS above it is what the model costs.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from step_profile import mesh_groups, profiled_steps  # noqa: E402

from gpt3d import host_memory  # noqa: E402
from gpt3d.config import load_config  # noqa: E402
from gpt3d.launch import guarded_main  # noqa: E402
from gpt3d.parallel.utils import dist_env  # noqa: E402
from gpt3d.preflight import preflight  # noqa: E402
from gpt3d.trainer import Trainer  # noqa: E402
from tests.helpers import cases_main  # noqa: E402


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * t.element_size() for t in tensors if t is not None)


class SavedActivations:
    """Bytes of tensors saved for backward that are alive at once (peak), by storage, with
    parameters excluded: autograd's saved-tensor hooks see every save, and each saved tensor
    is released when its graph node is freed. Tensors saved inside a checkpointed block are
    the checkpoint's business (it stores nothing until the recompute in backward)."""

    def __init__(self, params):
        self.live: dict[int, list] = {}  # storage ptr -> [refcount, bytes]
        self.now = self.peak = 0
        self.params = {local(p).untyped_storage().data_ptr() for p in params}

    def pack(self, t: torch.Tensor):
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return t  # a weight or a view of one (addmm saves weight.t())
        try:
            storage = local(t).untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # a wrapper subclass, e.g. an async
            key, size = id(t), t.numel() * t.element_size()  # collective's result
        if size == 0 or key in self.params:  # shares a parameter's storage
            return t
        entry = self.live.setdefault(key, [0, size])
        if entry[0] == 0:
            self.now += size
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        return _Held(self, key, t)

    @staticmethod
    def unpack(held):
        return held.t if isinstance(held, _Held) else held

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[key]


class _Held:
    __slots__ = ("meter", "key", "t")

    def __init__(self, meter, key, t):
        self.meter, self.key, self.t = meter, key, t

    def __del__(self):
        self.meter.release(self.key)


def timed_forward_backward(trainer: Trainer, times: list[float]) -> None:
    """Record the time of each forward/backward (or pipeline schedule) call of train_step."""
    inner = trainer._forward_backward

    def wrapper(x, y):
        t0 = time.perf_counter()
        out = inner(x, y)
        times.append(time.perf_counter() - t0)
        return out

    trainer._forward_backward = wrapper


def memory_record(trainer: Trainer) -> dict:
    """Bytes this rank holds after a step, with a measured peak of saved activations."""
    meter = SavedActivations(trainer.params)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        trainer.train_step()
    state = [v for s in trainer.optimizer.state.values() for v in s.values()]
    return {
        "param_bytes": nbytes(trainer.params),
        "grad_bytes": nbytes(p.grad for p in trainer.params),
        "optim_bytes": nbytes(t for t in state if isinstance(t, torch.Tensor)),
        "activation_peak_bytes": meter.peak,
    }


def stage_compute(trainer: Trainer, repeats: int) -> float:
    """Seconds of forward+backward of one microbatch through this rank's pipeline stages,
    with no communication (best of `repeats`): the bubble-free work per microbatch."""
    cfg, t = trainer.cfg, trainer.cfg.training
    m = cfg.parallel.pp_microbatches
    mb = t.global_batch_size // (trainer.dims.dp * m)
    x, y, _ = trainer.loader.next_batch()
    x, y = x[:mb], y[:mb]
    width = trainer.model_cfg.n_embd
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for stage, part in zip(trainer.parts.stage_ids, trainer.parts.chunks, strict=True):
            inp = x if stage == 0 else torch.randn(mb, t.seq_len, width, requires_grad=True)
            out = part(inp)
            if stage == trainer.parts.n_stages - 1:
                trainer.loss_fn(out, y).backward()
            else:
                out.backward(torch.randn_like(out))
        best = min(best, time.perf_counter() - t0)
    trainer.optimizer.zero_grad(set_to_none=True)
    return best


def import_torch_distributed() -> None:
    """Import what building and training import lazily, so that the baseline holds it."""
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.pipelining  # noqa: F401
    import torch.distributed.tensor.parallel  # noqa: F401
    from torch.distributed._composable import checkpoint, replicate_with_fsdp  # noqa: F401


def released_rss_gib() -> float:
    """Resident memory once garbage is collected and free heap memory returned."""
    gc.collect()
    host_memory.release()
    return host_memory.rss_gib()


def warm_up_process(args: list[str]) -> None:
    """One step of the same layout on a near-zero-size model (width 8 per head, 16-token
    sequences), then everything it built dropped: what stays is the process's fixed cost of
    having trained at all (process groups and their buffers, autograd's and gloo's threads,
    kernels' first-use caches, lazily imported code), whatever the model's size."""
    heads = preflight(load_config(args), dist_env().world_size).model.n_head  # preset resolved
    tiny = [*args, f"--model.n_embd={8 * heads}", "--training.seq_len=16"]
    trainer = Trainer.from_config(load_config(tiny))
    trainer.train_step()
    del trainer


def build(spec: dict) -> tuple[Trainer, dict]:
    """The Trainer, and resident memory around its construction: the process baseline
    before it (freed memory of earlier cases returned first) and the start-up peak. With
    spec["warm_baseline"], the baseline is taken after warm_up_process; rss_cold_gib is the
    process before the warm-up."""
    import_torch_distributed()
    rss = {}
    if spec.get("warm_baseline"):
        rss["rss_cold_gib"] = released_rss_gib()
        warm_up_process(spec["args"])
    rss["rss_baseline_gib"] = released_rss_gib()
    host_memory.reset_peak_rss()
    trainer = Trainer.from_config(load_config(spec["args"]))
    rss["rss_startup_peak_gib"] = host_memory.peak_rss_gib()
    host_memory.reset_peak_rss()
    return trainer, rss


def run_case(spec: dict, out: Path) -> None:
    torch.set_num_threads(spec.get("threads", 1))
    trainer, rss = build(spec)
    fb_times: list[float] = []
    for _ in range(spec.get("warmup", 2)):
        trainer.train_step()
    timed_forward_backward(trainer, fb_times)
    steps, losses, work = [], [], []
    pipelined = spec.get("stage_compute") and trainer.dims.pp > 1
    for _ in range(spec.get("steps", 5)):
        if dist.is_initialized() and spec.get("barrier", True):
            dist.barrier()  # start each timed step together
        t0 = time.perf_counter()
        losses.append(trainer.train_step().loss)
        steps.append(time.perf_counter() - t0)
        if pipelined:  # right after each step, so load drift hits both alike
            work.append(stage_compute(trainer, repeats=2))
    accum = trainer.cfg.training.grad_accum
    fb = [sum(fb_times[i : i + accum]) for i in range(0, len(fb_times), accum)]
    record = {
        "rank": trainer.env.rank,
        "world": trainer.env.world_size,
        "layout": trainer.dims.describe(),
        "embedding_sharding": trainer.cfg.parallel.embedding_sharding,  # as resolved
        "dp_mode": trainer.cfg.parallel.dp_mode,  # what parallel.dp_mode = "auto" chose
        "tokens_per_step": trainer.tokens_per_step(),
        "step_s": steps,
        "fwd_bwd_s": fb,
        "losses": losses,
        "n_params": sum(p.numel() for p in trainer.params),
    }
    if pipelined:
        record["stage_compute_s"] = work
        record["microbatches"] = trainer.cfg.parallel.pp_microbatches
    if spec.get("profile"):
        record["profiled_step_s"] = profiled_steps(trainer, spec["profile"], out)
        record["groups"] = mesh_groups(trainer)
    if spec.get("memory"):
        record.update(memory_record(trainer))
        record.update(rss, rss_training_peak_gib=host_memory.peak_rss_gib())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.env.rank}.json").write_text(json.dumps(record))
    del trainer
    gc.collect()


if __name__ == "__main__":
    guarded_main(cases_main(run_case), sys.argv[1:])
