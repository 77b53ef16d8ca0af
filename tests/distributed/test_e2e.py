"""End to end: the shipped 8-process recipe logs the same losses as one process."""

from __future__ import annotations

import pytest

from tests.helpers import read_jsonl, run_script

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

CONFIG = "recipes/configs/dp2_pp2_tp2.toml"
SHORT = [
    "--training.steps=20",
    "--training.log_interval=1",
    "--training.eval_interval=0",
    "--checkpoint.interval=0",
    "--checkpoint.save_final=false",
    "--metrics.plot=false",
]
ONE_PROCESS = ["--parallel.pp=1", "--parallel.tp=1", "--parallel.dp_shard=1"]


def losses(out_dir) -> list[float]:
    return [r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl") if "loss" in r]


@pytest.mark.timeout(600)
def test_dp2_pp2_tp2_recipe_matches_one_process(tmp_path):
    multi = run_script(
        "recipes/train.py",
        ["--config", CONFIG, *SHORT, f"--job.output_dir={tmp_path / 'multi'}"],
        nproc=8,
        timeout=540,
    )
    assert multi.returncode == 0, multi.stdout[-2000:] + multi.stderr[-4000:]
    assert "layout pp=2 x dp_replicate=1 x dp_shard=2 x tp=2" in multi.stdout
    single = run_script(
        "recipes/train.py",
        ["--config", CONFIG, *SHORT, *ONE_PROCESS, f"--job.output_dir={tmp_path / 'single'}"],
        nproc=0,
    )
    assert single.returncode == 0, single.stderr[-4000:]
    got, ref = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert len(got) == len(ref) == 20
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) < 1e-4, (got, ref)
    assert ref[-1] < ref[0] - 0.5  # it trained
