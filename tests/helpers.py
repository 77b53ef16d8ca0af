"""Shared test helpers: synthetic token datasets and real torchrun launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# A 2-layer, 32-wide model on a 512-token synthetic vocabulary: fast enough to launch often.
SMALL_MODEL = [
    "--model.preset=tiny",
    "--model.n_layer=2",
    "--model.n_head=2",
    "--model.n_embd=32",
    "--model.block_size=32",
    "--model.vocab_size=512",
    "--training.seq_len=16",
    "--training.global_batch_size=8",
    "--training.eval_interval=0",
]


def make_dataset(path: Path, vocab_size: int = 512, n_train: int = 20_000, n_val: int = 4_000):
    """A learnable synthetic corpus (noisy arithmetic sequence) in prepare.py's format."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        base = np.arange(n) % 97
        tokens = (base * 5 + rng.integers(0, 3, n)) % vocab_size
        tokens.astype(np.uint16).tofile(path / f"{split}.bin")
    meta = {
        "tokenizer": "synthetic",
        "vocab_size": vocab_size,
        "eot_id": 0,
        "dtype": "uint16",
        "train_tokens": n_train,
        "val_tokens": n_val,
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    e.update(extra)
    return e


def run_script(script, args, nproc: int = 1, timeout: float = 240, extra_launcher=(), **kw):
    """Run a gpt3d script: plain python for nproc=0, torchrun --standalone otherwise."""
    script = str(REPO / script)
    if nproc == 0:
        cmd = [sys.executable, script, *map(str, args)]
    else:
        launcher = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *extra_launcher]
        cmd = [*launcher, script, *map(str, args)]
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=env(**kw.pop("env", {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
