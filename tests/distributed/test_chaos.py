"""Chaos: real SIGKILLs of random ranks at random moments under torchrun --max-restarts, and a
rank that stalls (SIGSTOP) instead of dying.

- the short soak (tests/distributed/chaos.py; the long one is benchmarks/soak.py): 8
  processes, dp2 x pp2 x tp2, async checkpoints every 2 steps, one kill during a step, one
  while a rank writes its share of an async checkpoint, one during the start-up of a
  restarted attempt (ranks, order and moments from a seed: GPT3D_CHAOS_SEED, default 0).
  The losses equal the uninterrupted run's bitwise, every sample counts exactly once, and
  each kill costs at most the steps since the last complete checkpoint;
- SIGSTOP of one of 4 ranks: the others time out after parallel.timeout_s and name the rank
  that stopped answering (gpt3d/heartbeat.py); the last checkpoint is byte-identical after.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time

import pytest

from gpt3d.checkpoint_dir import latest_complete, verify
from tests.distributed.chaos import make_plan, random_kinds, run_soak
from tests.helpers import REPO, SMALL_MODEL, TORCHRUN, env, make_dataset, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
SEED = int(os.environ.get("GPT3D_CHAOS_SEED", 0))
STEPS, INTERVAL = 8, 2


@pytest.mark.timeout(900)
def test_short_chaos_soak(tmp_path):
    data = make_dataset(tmp_path / "data")
    plan = make_plan(SEED, random_kinds(SEED, 3), INTERVAL)
    result = run_soak(tmp_path, data, plan, STEPS, INTERVAL, timeout=400)
    print(json.dumps({k: v for k, v in result.items() if k != "output_tail"}, indent=1))
    assert result["ref_returncode"] == 0, result["output_tail"]
    assert result["chaos_returncode"] == 0, result["output_tail"]
    kills = result["kills"]
    assert [(k["attempt"], k["rank"], k["when"]) for k in kills] == [
        (p["attempt"], p["rank"], p["when"]) for p in plan
    ], "every planned kill happened, in order"
    assert result["steps_logged"] and not result["loss_mismatches"], result["loss_mismatches"]
    assert result["retried_draws_identical"] and result["samples_exactly_once"]
    for k in kills:  # resumed from the latest complete checkpoint at the kill, or newer
        assert k["latest"] <= k["resumed_from"] and 0 <= k["recomputed"] <= k["since_checkpoint"]


def worker_ranks(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers of an agent we started (from their environment)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(agent_pid)], capture_output=True, text=True
    ).stdout
    ranks = {}
    for pid in map(int, out.split()):
        environ = (open(f"/proc/{pid}/environ", "rb").read()).split(b"\0")  # noqa: SIM115
        rank = next(int(v[5:]) for v in environ if v.startswith(b"RANK="))
        ranks[rank] = pid
    return ranks


def snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.mark.timeout(300)
def test_stopped_rank_is_named_and_the_last_checkpoint_survives(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4000, n_val=1000)
    out, timeout_s, victim = tmp_path / "run", 10, 3
    args = [
        *SMALL_MODEL,
        f"--data.dataset={data}",
        f"--job.output_dir={out}",
        "--training.steps=100000",
        "--training.log_interval=1",
        "--metrics.plot=false",
        "--parallel.tp=2",
        "--parallel.pp=2",
        "--checkpoint.interval=3",
        f"--parallel.timeout_s={timeout_s}",
    ]
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=4", str(REPO / "recipes/train.py"), *args]
    agent = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(
        target=lambda: lines.extend((time.monotonic(), x) for x in agent.stdout), daemon=True
    )
    reader.start()
    pids = {}
    try:
        deadline = time.monotonic() + 120
        while latest_complete(out / "checkpoints") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        steps = len(read_jsonl(out / "metrics.jsonl"))
        pids = worker_ranks(agent.pid)
        os.kill(pids[victim], signal.SIGSTOP)
        stopped = time.monotonic()
        last = latest_complete(out / "checkpoints")
        before = snapshot(last)
        agent.wait(timeout=timeout_s + 90)
        ended = time.monotonic() - stopped
        reader.join(timeout=10)
    finally:
        for pid in pids.values():  # the stopped worker (and any other) must not outlive us
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if agent.poll() is None:
            agent.kill()
    text = "".join(x for _, x in lines)
    named = [(t - stopped, x) for t, x in lines if "stopped answering" in x]
    assert steps >= 3 and agent.returncode != 0, text[-3000:]
    assert named, text[-3000:]
    assert all(f"rank(s) {victim} stopped answering" in x for _, x in named), named
    first = min(t for t, _ in named)
    print(f"stall named after {first:.1f}s, job ended after {ended:.1f}s (timeout {timeout_s}s)")
    assert first < timeout_s + 20, named  # the collective timeout + the heartbeat probe
    # torchrun then waits its fixed 30 s for the stopped worker to honour SIGTERM (it cannot)
    assert ended < timeout_s + 60
    assert latest_complete(out / "checkpoints") == last and snapshot(last) == before
    verify(last)  # sizes, crc32 of every file, index
