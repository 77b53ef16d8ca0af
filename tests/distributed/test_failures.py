"""Never hang, never lose work: real torchrun launches of recipes/train.py that must end
quickly with one clear message and a non-zero exit code, a dead peer that must take the
whole job down, and a two-agent (multi-node) rendezvous that must match one node."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, SMALL_MODEL, TORCHRUN, env, make_dataset, read_jsonl, run_script

TRAIN = "recipes/train.py"
SMALL = [*SMALL_MODEL, "--training.log_interval=1", "--metrics.plot=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4000, n_val=1000)


def snapshot(directory):
    return {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def bad_ids_dataset(tmp_path, data):
    import numpy as np

    d = tmp_path / "bad_ids"
    d.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (d / name).write_bytes((data / name).read_bytes())
    tokens = np.fromfile(d / "train.bin", dtype=np.uint16)
    tokens[7] = 9999
    tokens.tofile(d / "train.bin")
    return d


# name -> (nproc, extra args, exit code, text the message must contain)
CASES = {
    "world_size": (2, [], 2, "--nproc_per_node=4"),  # default multi-process recipe is tp2 x pp2
    "heads_vs_tp": (2, ["--parallel.tp=2", "--model.n_head=3", "--model.n_embd=48"], 2, "n_head=3"),
    "vocab_vs_tp": (2, ["--parallel.tp=2", "--model.vocab_size=511"], 2, "pad_vocab_multiple"),
    "unknown_key": (2, ["--training.learning_rate=1"], 2, "learning_rate"),
    "missing_plan": (2, ["--parallel.tp=2", "--parallel.plan=nope.toml"], 2, "nope.toml"),
    "missing_data": (2, ["--data.dataset=/nonexistent/data"], 2, "/nonexistent/data"),
    "token_ids": (2, ["BAD_IDS"], 2, "token id 9999 at position 7"),
    "microbatches": (
        2,
        ["--parallel.pp=2", "--parallel.pp_microbatches=1"],
        2,
        "at least 2 microbatches",
    ),
    "nan_loss": (
        2,
        [
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
    config = [] if case == "world_size" else ["--config", "recipes/configs/debug.toml"]
    args = [*config, *SMALL, f"--data.dataset={data}", f"--job.output_dir={out}", *extra]
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
        "--config",
        "recipes/configs/debug.toml",
        *SMALL,
        f"--data.dataset={data}",
        f"--job.output_dir={out}",
        "--training.steps=100000",
        "--parallel.timeout_s=30",
        "--checkpoint.interval=0",
        "--checkpoint.save_final=false",
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
        "--config",
        "recipes/configs/debug.toml",
        *SMALL,
        f"--data.dataset={data}",
        "--training.steps=6",
        "--checkpoint.interval=0",
        "--checkpoint.save_final=false",
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
        "--config",
        "recipes/configs/debug.toml",
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
