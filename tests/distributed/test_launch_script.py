"""recipes/run_3d_training.sh CONFIG NPROC [overrides]: the original 3D nanoGPT's launch shape.
One real 2-process launch (tp=2) on a directory of llm.c shards without meta.json, with a
profiler trace on rank 1 only: the losses equal a 1-process run of the same config."""

import subprocess

import numpy as np
import pytest

from gpt3d.shards import write_shard
from tests.helpers import REPO, env, model_args, read_jsonl, recipe

SCRIPT = REPO / "recipes" / "run_3d_training.sh"
CONFIG = REPO / "recipes" / "configs" / "debug.toml"


def llmc_corpus(root):
    """llm.c-style shards (GPT-2 ids, 1024-byte headers, no meta.json): 3 train, 1 val."""
    root.mkdir()
    rng = np.random.default_rng(0)
    base = (np.arange(30_000) * 7) % 50257  # a learnable pattern with some noise
    for k, name in enumerate(["fineweb_train_000001", "fineweb_train_000002", "x_train_3"]):
        noise = rng.integers(0, 3, 4000 + 1000 * k)
        write_shard(root / f"{name}.bin", (base[: noise.size] + noise) % 50257, "llmc")
    write_shard(root / "fineweb_val_000000.bin", base[:3000], "llmc")
    return root


def args_for(data, out, *extra):
    return [
        *model_args(2, 2, 32, vocab=50257),
        "--model.pad_vocab_multiple=64",
        f"--data.dataset={data}",
        f"--job.output_dir={out}",
        "--training.seq_len=16",
        "--training.global_batch_size=8",
        "--training.steps=4",
        "--training.warmup_steps=1",
        "--training.log_interval=1",
        "--training.eval_interval=0",
        "--checkpoint.save_final=false",
        "--metrics.plot=false",
        *extra,
    ]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_script_launches_torchrun_with_the_config_and_overrides(tmp_path):
    data = llmc_corpus(tmp_path / "shards")
    profile = ["--profiling.trace=true", "--profiling.start_step=2", "--profiling.ranks=1"]
    tp2 = args_for(data, tmp_path / "tp2", "--parallel.tp=2", *profile)
    launch = [str(SCRIPT), str(CONFIG), "2", *tp2]
    proc = subprocess.run(launch, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torchrun --standalone --nproc_per_node=2" in proc.stderr  # the command, echoed
    assert "layout pp=1 x dp_replicate=1 x dp_shard=1 x tp=2" in proc.stdout
    profiled = [p.name for p in (tmp_path / "tp2" / "profile").iterdir()]
    assert profiled == ["trace_rank1_steps2-3.json"]
    ref = tmp_path / "one"
    assert recipe("train")(["--config", str(CONFIG), *args_for(data, ref)]) == 0
    got, want = (read_jsonl(d / "metrics.jsonl") for d in (tmp_path / "tp2", ref))
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got, want, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "usage: "),
        ([str(CONFIG)], "usage: "),
        (["missing.toml", "2"], "config file 'missing.toml' not found"),
        ([str(CONFIG), "two"], "NPROC must be a positive integer, got 'two'"),
        ([str(CONFIG), "0"], "NPROC must be a positive integer"),
    ],
)
def test_script_argument_errors(argv, message):
    proc = subprocess.run(
        [str(SCRIPT), *argv], cwd=REPO, env=env(), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
