"""The host allocator setting (job.malloc_mmap_threshold_kb): which threshold `auto` pins for
which layout, and that a pinned threshold really changes what glibc does with a freed block,
measured in a fresh process (mallopt is process-wide, so never in the test process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from gpt3d import host_memory
from gpt3d.config import load_config
from gpt3d.preflight import preflight
from gpt3d.trainer import host_allocator, host_mmap_threshold

MiB = 2**20
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def run_plan(kb: int, dp_mode: str = "ddp") -> SimpleNamespace:
    job, parallel = SimpleNamespace(malloc_mmap_threshold_kb=kb), SimpleNamespace(dp_mode=dp_mode)
    return SimpleNamespace(config=SimpleNamespace(job=job, parallel=parallel))


def test_auto_on_cpu_trains_fast_only_where_the_state_fits_and_is_not_sharded():
    assert host_mmap_threshold(sharded=True, comfortable=True) == 64 * 1024
    assert host_mmap_threshold(sharded=True, comfortable=False) == 64 * 1024
    assert host_mmap_threshold(sharded=False, comfortable=True) == 256 * MiB
    assert host_mmap_threshold(sharded=False, comfortable=False) == 64 * 1024


def test_auto_on_cpu_builds_the_model_lean_then_pins_the_training_setting():
    # a tiny model on one process fits comfortably: lean start-up, fast training
    run = preflight(load_config(["--model.preset=tiny", "--training.seq_len=32"]), 1)
    startup, training, why = host_allocator(run, CPU)
    assert (startup, training) == (64 * 1024, 256 * MiB)
    assert why.startswith("auto, fast: the unsharded model state")


def test_explicit_setting_holds_from_start_up_and_gpu_hosts_are_left_alone():
    assert host_allocator(run_plan(-1), CUDA) == (0, 0, "auto: GPU host")
    assert host_allocator(run_plan(0, "fsdp"), CPU) == (0, 0, "job.malloc_mmap_threshold_kb")
    assert host_allocator(run_plan(64, "fsdp"), CPU)[:2] == (64 * 1024, 64 * 1024)


RETAINED = textwrap.dedent(
    """
    import json, sys
    import torch
    from gpt3d import host_memory

    pinned = host_memory.pin_mmap_threshold(int(sys.argv[1]))
    before = host_memory.rss_gib()
    for _ in range(3):  # a step's temporary: 64 MiB, written, freed
        t = torch.empty(16 * 2**20).fill_(1.0)
        del t
    print(json.dumps({"pinned": pinned, "retained_mib": (host_memory.rss_gib() - before) * 1024}))
    """
)


def retained_mib(threshold: int) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", RETAINED, str(threshold)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["pinned"]
    return out["retained_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_fast_threshold_keeps_a_freed_temporary_for_reuse_and_lean_returns_it():
    fast = retained_mib(host_memory.FAST_MMAP_THRESHOLD)
    lean = retained_mib(host_memory.LEAN_MMAP_THRESHOLD)
    print(f"64 MiB temporary after free: fast keeps {fast:.0f} MiB, lean keeps {lean:.0f} MiB")
    assert fast > 56  # reused from the heap next time: no new page faults
    assert lean < 8  # mmap'ed, unmapped on free: gone from the resident set
