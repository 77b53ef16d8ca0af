"""Measure this machine as a `cpu` hardware profile: matmul peak per process (1 thread),
how much of it a GPT forward/backward reaches while every process computes at once (the
contention of a real multi-process run), memory bandwidth, and gloo's collectives between
real processes (spawned with torch.multiprocessing, OMP_NUM_THREADS=1).

Each collective is timed at two sizes; the fit t = latency + factor * bytes / busbw (factor
as in hardware.Link.time) gives the link. Inter-node numbers cannot be measured on one
machine: the profile repeats the intra-node link there (the source field says so). The
collectives are timed again with twice as many processes as cores (`crowded`: time-sliced
peers answer late), and gpt3d's framework overheads per step, block and pipeline action are
fitted from a tiny model's real steps (gpt3d/planner/overheads.py).
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import statistics
import tempfile
import time

import torch

from gpt3d.planner.hardware import GB, GiB, HardwareProfile, Link

SIZES = (1 << 16, 1 << 23)  # bytes: latency-dominated and bandwidth-dominated
OPS = ("all_reduce", "all_gather", "reduce_scatter", "p2p")


def matmul_tflops(dtype: torch.dtype, n: int = 1024, seconds: float = 0.6) -> float:
    """Best dense matmul TFLOP/s of one thread over a few windows."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    best = 0.0
    for _ in range(3):
        a @ b
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            k += 1
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0))
    return best / 1e12


def model_flops_per_s(steps: int = 6) -> float:
    """Achieved FLOP/s of a small GPT's forward + backward (fp32, this process's threads)."""
    from gpt3d.metrics import flops_per_token
    from gpt3d.model import GPT, GPTConfig

    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=128, vocab_size=512)
    model, x = GPT(cfg), torch.randint(0, 512, (4, 128))
    best = float("inf")
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        best = min(best, time.perf_counter() - t0)
    return flops_per_token(cfg, 128) * x.numel() / best


def memory_gbps(nbytes: int = 1 << 27) -> float:
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best / GB  # read + write


def _op(dist, name: str):
    """torch 2.13 renamed the flat-tensor collectives (*_single); older ones have *_tensor."""
    new, old = (
        f"{name}_single",
        {"all_gather": "all_gather_into_tensor"}.get(name, f"{name}_tensor"),
    )
    return getattr(dist, new, None) or getattr(dist, old)


def _p2p(dist, tensor: torch.Tensor, rank: int) -> None:
    """Rank 0 sends to rank 1; other ranks only take part in the barriers."""
    if rank < 2:
        (dist.send if rank == 0 else dist.recv)(tensor, 1 - rank)


def _time_op(dist, op: str, nbytes: int, rank: int, world: int, reps: int) -> float:
    numel = nbytes // 4
    full, part = torch.ones(numel), torch.ones(numel // world)
    run = {
        "all_reduce": lambda: dist.all_reduce(full),
        "all_gather": lambda: _op(dist, "all_gather")(full, part),
        "reduce_scatter": lambda: _op(dist, "reduce_scatter")(part, full),
        "p2p": lambda: _p2p(dist, full, rank),
    }[op]
    times = []
    for _ in range(reps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])  # what a training run meets, not the best case


def _worker(rank: int, world: int, init: str, out: str, reps: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    result = {op: [_time_op(dist, op, n, rank, world, reps) for n in SIZES] for op in OPS}
    dist.barrier()  # every process computes at once, as in a training run
    flops = torch.tensor([model_flops_per_s()])
    dist.all_reduce(flops, op=dist.ReduceOp.MIN)
    if rank == 0:
        torch.save({"collectives": result, "model_flops": flops.item()}, out)
    dist.barrier()
    dist.destroy_process_group()


def run_processes(world: int = 2, reps: int = 11) -> dict:
    """In `world` gloo processes: {"collectives": {op: [seconds at SIZES]}, "model_flops":
    the slowest process's GPT-step FLOP/s while all of them run it at once}."""
    import torch.multiprocessing as mp

    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned processes
    with tempfile.TemporaryDirectory() as tmp:
        init, out = f"file://{tmp}/rendezvous", f"{tmp}/result.pt"
        mp.spawn(_worker, args=(world, init, out, reps), nprocs=world, join=True)
        return torch.load(out, weights_only=True)  # plain lists and floats


def fit_link(times: dict[str, list[float]], world: int) -> Link:
    """Latency and busbw per collective from the two sizes (the large one alone when noise
    makes the difference meaningless)."""
    (s0, s1), bws, lats = SIZES, {}, []
    for op, (t0, t1) in times.items():
        factor = {"all_reduce": 2 * (world - 1) / world, "p2p": 1.0}.get(op, (world - 1) / world)
        slope = (t1 - t0) / (s1 - s0) if t1 > 1.5 * t0 else t1 / s1
        bws[op] = factor / slope / GB
        lats.append(max(0.0, t0 - slope * s0))
    return Link(latency_s=statistics.median(lats), **bws)


def measure_cpu_profile(world: int = 2, overheads: bool = True) -> HardwareProfile:
    """The whole calibration (~1 min on a 2-core box; ~10 s without the overheads)."""
    from dataclasses import replace

    profile = _hardware(world)
    if profile.cores and 2 * profile.cores > world:  # more processes than cores
        crowd = 2 * profile.cores
        profile = replace(profile, crowded=fit_link(run_processes(crowd)["collectives"], crowd))
    if overheads:
        from gpt3d.planner.overheads import measure_overheads

        profile = replace(profile, overhead_s=measure_overheads(profile))
    return profile


def _hardware(world: int) -> HardwareProfile:
    torch.set_num_threads(1)
    fp32, bf16 = matmul_tflops(torch.float32), matmul_tflops(torch.bfloat16)
    measured = run_processes(world)
    link = fit_link(measured["collectives"], world)
    efficiency = min(1.0, measured["model_flops"] / (fp32 * 1e12))
    alone = min(1.0, model_flops_per_s() / (fp32 * 1e12))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return HardwareProfile(
        name="cpu",
        peak_tflops={"float32": fp32, "bfloat16": bf16},
        mem_gib=round(ram, 2),
        mem_gbps=memory_gbps(),
        intra=link,
        inter=link,
        compute_efficiency=efficiency,
        efficiency_alone=alone,
        comm_overlap=0.0,
        shared_memory=True,
        cores=cores,
        source=(
            f"measured by recipes/plan.py --calibrate on {socket.gethostname()} "
            f"({platform.processor() or platform.machine()}, {cores} cores), {when}, "
            f"torch {torch.__version__}, {world} gloo processes, 1 thread each; compute "
            f"efficiency {efficiency:.2f} with every process busy ({alone:.2f} alone); inter-node "
            "link = intra-node (not measurable on one machine); crowded = the collectives with "
            "2 processes per core; overhead_s = gpt3d's framework costs on a tiny model"
        ),
    )
