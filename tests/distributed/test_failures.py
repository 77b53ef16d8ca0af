"""Never hang, never lose work: what only real torchrun launches of recipes/train.py show.
The whole bad-input catalogue is checked in process (tests/unit/test_errors.py); here a few
of its cases run for real to prove the exit code and that exactly one message is printed
across all ranks, plus a dead peer that must take the whole job down, a two-agent
(multi-node) rendezvous that must match one node, and a NaN that must keep the last good
checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.error_cases import FIELD_ERRORS
from tests.helpers import (
    DEBUG_CONFIG,
    NO_CHECKPOINTS,
    REPO,
    SMALL_MODEL,
    TORCHRUN,
    copy_dataset,
    env,
    make_dataset,
    read_jsonl,
    run_script,
)

pytestmark = [pytest.mark.slow, pytest.mark.distributed]
TRAIN = "recipes/train.py"
SMALL = [*SMALL_MODEL, "--training.log_interval=1", "--metrics.plot=false"]
DEBUG = DEBUG_CONFIG


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4000, n_val=1000)


def snapshot(directory):
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def bad_ids_dataset(tmp_path, data):
    d = copy_dataset(data, tmp_path / "bad_ids")
    tokens = np.fromfile(d / "train.bin", dtype=np.uint16)
    tokens[7] = 9999
    tokens.tofile(d / "train.bin")
    return d


# name -> (nproc, args, exit code, text the one message contains). Each shows something an
# in-process check cannot: rank 0 alone prints (a field error; a layout error with the
# multi-process default config), a scan only rank 0 does (the others wait in the process
# group until torchrun ends them), and a NaN found after the process group exists.
CASES = {
    "field error": (2, [*DEBUG, *FIELD_ERRORS["unknown key"][0]], 2, "stepz"),
    "world size": (2, [], 2, "--nproc_per_node=4"),  # no --config: the 4-process default
    "token ids": (2, [*DEBUG, "BAD_IDS"], 2, "token id 9999 at position 7"),
    "nan loss": (
        2,
        [
            *DEBUG,
            "--training.lr=1e6",
            "--training.grad_clip=0",
            "--training.warmup_steps=0",
            "--training.steps=50",
        ],
        3,
        "at step",
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_fast_with_one_message(tmp_path, data, case):
    nproc, extra, code, text = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("earlier work")
    before = snapshot(out)
    extra = [
        f"--data.dataset={bad_ids_dataset(tmp_path, data)}" if a == "BAD_IDS" else a for a in extra
    ]
    args = [*SMALL, f"--data.dataset={data}", f"--job.output_dir={out}", *extra]
    start = time.monotonic()
    proc = run_script(TRAIN, args, nproc=nproc, timeout=90)
    assert time.monotonic() - start < 60
    assert proc.returncode != 0
    assert f"exitcode  : {code}" in proc.stderr, proc.stderr[-3000:]
    messages = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(messages) == 1 and text in messages[0], proc.stderr[-3000:]
    # no worker traceback (torchrun's own ChildFailedError traceback is the launcher's)
    assert not [line for line in proc.stderr.splitlines() if "File" in line and "gpt3d" in line]
    after = snapshot(out)
    assert all(after.get(p) == b for p, b in before.items())  # nothing overwritten/deleted


def worker_pids(agent_pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(agent_pid)], capture_output=True, text=True
    ).stdout
    return [int(p) for p in out.split()]


@pytest.mark.timeout(180)
def test_dead_peer_ends_the_whole_job(tmp_path, data):
    """kill -9 one of 4 ranks mid-training: every other rank must exit, fast."""
    out = tmp_path / "out"
    args = [
        *DEBUG,
        *SMALL,
        f"--data.dataset={data}",
        f"--job.output_dir={out}",
        "--training.steps=100000",
        "--parallel.timeout_s=30",
        *NO_CHECKPOINTS,
    ]
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=4", str(REPO / TRAIN), *args]
    agent = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # wait until training is under way
            if (out / "metrics.jsonl").exists() and len(read_jsonl(out / "metrics.jsonl")) >= 3:
                break
            time.sleep(0.5)
        else:
            pytest.fail("training never started")
        victim = worker_pids(agent.pid)[2]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = agent.communicate(timeout=90)
        ended_after = time.monotonic() - killed_at
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode != 0
    assert ended_after < 60, f"job took {ended_after:.0f}s to end after a rank died"
    assert "SIGKILL" in output or "Signal 9" in output, output[-2000:]


@pytest.mark.timeout(300)
def test_two_agents_multi_node_rendezvous_matches_one_node(tmp_path, data):
    """Two torchrun agents (one per "node") on this machine, c10d rendezvous, layout
    (dp, pp, tp) = (2, 1, 2), against the same layout launched as one node."""
    layout = ["--parallel.tp=2", "--parallel.dp_shard=2"]
    common = [
        *DEBUG,
        *SMALL,
        f"--data.dataset={data}",
        "--training.steps=6",
        *NO_CHECKPOINTS,
        *layout,
    ]
    one = run_script(TRAIN, [*common, f"--job.output_dir={tmp_path / 'one'}"], nproc=4)
    assert one.returncode == 0, one.stderr[-3000:]
    port = 29_400 + os.getpid() % 500
    agents = []
    for node in range(2):
        cmd = [
            *TORCHRUN,
            "--nnodes=2",
            "--nproc_per_node=2",
            f"--node-rank={node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--rdzv-id=gpt3d",
            str(REPO / TRAIN),
            *common,
            f"--job.output_dir={tmp_path / 'two'}",
        ]
        agents.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        outputs = [a.communicate(timeout=240)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
    assert all(a.returncode == 0 for a in agents), outputs[0][-2000:] + outputs[1][-2000:]
    got = [r["loss"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "loss" in r]
    ref = [r["loss"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "loss" in r]
    assert len(got) == len(ref) == 6
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < 1e-6


def test_python_entry_point_exit_codes(tmp_path, data):
    """Plain `python recipes/train.py` (no torchrun): same message, exit code 2."""
    proc = subprocess.run(
        [sys.executable, str(REPO / TRAIN), "--training.stepz=1"],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr


@pytest.mark.timeout(240)
def test_nan_keeps_the_last_good_checkpoint(tmp_path, data):
    """A resumed run blown up by an absurd lr stops with exit code 3; the checkpoints
    written before are byte-identical afterwards and still resume."""
    out = tmp_path / "out"
    common = [
        *DEBUG,
        *SMALL,
        f"--data.dataset={data}",
        f"--job.output_dir={out}",
        "--checkpoint.keep_last=10",
    ]
    good = run_script(TRAIN, [*common, "--training.steps=4", "--checkpoint.interval=2"], nproc=2)
    assert good.returncode == 0, good.stderr[-3000:]
    before = snapshot(out / "checkpoints")
    assert {p.parent.name for p in before} == {"step-2", "step-4"}
    blown = run_script(
        TRAIN,
        [
            *common,
            "--training.steps=30",
            "--checkpoint.interval=1",
            "--checkpoint.resume=auto",
            "--training.lr=1e6",
            "--training.warmup_steps=0",
            "--training.grad_clip=0",
        ],
        nproc=2,
    )
    assert blown.returncode != 0 and "exitcode  : 3" in blown.stderr, blown.stderr[-3000:]
    assert "resumed from" in blown.stdout and "step" in blown.stderr
    after = snapshot(out / "checkpoints")
    assert all(after.get(p) == b for p, b in before.items())
    again = run_script(
        TRAIN,
        [
            *common,
            "--training.steps=6",
            f"--checkpoint.resume={out / 'checkpoints' / 'step-4'}",
            f"--job.output_dir={tmp_path / 'again'}",
        ],
        nproc=2,
    )
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-3000:]
