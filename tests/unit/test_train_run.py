"""A short real training run on the bundled Shakespeare corpus: the loss must fall."""

from __future__ import annotations

import pytest

from tests.helpers import DEBUG_CONFIG, NO_CHECKPOINTS, REPO, read_jsonl, run_script


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare")
    texts = REPO / "recipes/data/shakespeare/texts"
    proc = run_script("recipes/prepare.py", ["--out", out, texts], nproc=0, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_debug_run_on_bundled_corpus_learns(shakespeare, tmp_path):
    out = tmp_path / "run"
    args = [
        *DEBUG_CONFIG,
        f"--data.dataset={shakespeare}",
        f"--job.output_dir={out}",
        "--training.steps=30",
        "--training.lr=2e-3",
        "--training.log_interval=1",
        "--training.eval_interval=30",
        *NO_CHECKPOINTS,
        "--metrics.plot=false",
    ]
    proc = run_script("recipes/train.py", args, nproc=0, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = read_jsonl(out / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    assert len(train) == 30
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"):
        assert key in train[0]
    assert train[0]["loss"] > 10.5  # ln(50257) = 10.8 at init
    assert train[-1]["loss"] < 9.6, [r["loss"] for r in train]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val and val[-1] < 9.8
    assert "done: 30 steps" in proc.stdout
