"""The worker's "profile" option (benchmarks/worker.py): train steps of a built Trainer under
torch.profiler on every rank, with the marks benchmarks/trace_breakdown.py reads.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist


def profiled_steps(trainer, n: int, out: Path) -> list[float]:
    """n train steps under torch.profiler (CPU activity, shapes for the collectives' sizes),
    each a `bench_step#<i>` range; the Chrome trace goes to <out>/trace_rank<r>.json.

    Two marks make the trace readable per mesh axis: every Work.wait() (the training thread
    blocked on a collective or a p2p transfer; torch records no event for it) becomes a
    `c10d::wait` range, and before the steps a few all-reduces on each axis's group, inside
    `bench_calibrate#<axis>`, show which gloo worker threads serve that axis (gloo runs each
    process group's collectives on threads of its own)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    work = torch._C._distributed_c10d.Work
    plain_wait = work.wait

    def wait(self, *args, **kwargs):
        with record_function("c10d::wait"):
            return plain_wait(self, *args, **kwargs)

    walls = []
    work.wait = wait
    phases = annotate_phases(trainer)
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            calibrate_axes(trainer)
            for i in range(n):
                if dist.is_initialized():
                    dist.barrier()
                t0 = time.perf_counter()
                with record_function(f"bench_step#{i}"):
                    trainer.train_step()
                walls.append(time.perf_counter() - t0)
    finally:
        work.wait = plain_wait
        for name, fn in phases.items():  # the plain methods back (None: the class's)
            if fn is None:
                vars(trainer).pop(name, None)
            else:
                vars(trainer)[name] = fn
    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / f"trace_rank{trainer.env.rank}.json"))
    return walls


def annotate_phases(trainer) -> dict:
    """Name the forward/backward (or schedule) and the tied-embedding exchange of each step
    in the trace (`phase:fwd_bwd`, `phase:tied`); returns the attributes to restore."""
    from torch.profiler import record_function

    def annotated(name, fn):
        def wrapper(*args):
            with record_function(name):
                return fn(*args)

        return wrapper

    saved = {k: vars(trainer).get(k) for k in ("_forward_backward", "_sync_tied_grads")}
    trainer._forward_backward = annotated("phase:fwd_bwd", trainer._forward_backward)
    trainer._sync_tied_grads = annotated("phase:tied", trainer._sync_tied_grads)
    return saved


def calibrate_axes(trainer, rounds: int = 3) -> None:
    """Small concurrent all-reduces on every process group of this rank (size > 1; torch
    may create several for one mesh axis), each inside `bench_calibrate#<axis>#<group>`
    (<axis>: the mesh axis with the same ranks, else "world" or "pg"). Groups go in the
    order of their names, which every rank shares, so no two ranks wait on each other."""
    from torch.distributed.distributed_c10d import _world
    from torch.profiler import record_function

    if trainer.mesh is None:
        return
    axes = {tuple(g["ranks"]): axis for axis, g in mesh_groups(trainer).items()}
    world = tuple(range(dist.get_world_size()))
    groups = sorted(_world.pg_names.items(), key=lambda kv: (len(kv[1]), kv[1]))
    dist.barrier()
    for group, name in groups:
        ranks = tuple(dist.get_process_group_ranks(group))
        if len(ranks) < 2:
            continue
        axis = axes.get(ranks, "world" if ranks == world else "pg")
        with record_function(f"bench_calibrate#{axis}#{name}"):
            for _ in range(rounds):
                bufs = [torch.zeros(1) for _ in range(4)]
                works = [dist.all_reduce(b, group=group, async_op=True) for b in bufs]
                for w in works:
                    w.wait()


def mesh_groups(trainer) -> dict:
    """{axis: {"name": process-group name, "ranks": global ranks}} of this rank's mesh axes
    (size > 1): how a trace's collectives are attributed to axes."""
    if trainer.mesh is None:
        return {}
    groups = {}
    for axis in trainer.mesh.mesh_dim_names:
        if trainer.mesh[axis].size() > 1:
            pg = trainer.mesh[axis].get_group()
            groups[axis] = {"name": pg.group_name, "ranks": dist.get_process_group_ranks(pg)}
    return groups
