"""The single-process reference the golden test pins down: a fixed tiny config and seed ->
a checksum of the initial logits, 5 losses and 5 grad norms.

Parity tests compare N processes with one process, so a change to the single-process math
(init, loss normalisation, lr schedule, AdamW groups, the padded-vocabulary mask) moves both
sides and still passes. This file does not move unless someone means it to:

    python -m tests.golden.reference     # rewrite tests/golden/tiny.json, on purpose

Regenerate only for a deliberate change of the numbers, and say why in the commit message.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("tiny.json")
ARGS = [
    "--model.preset=tiny",
    "--model.n_layer=2",
    "--model.n_head=2",
    "--model.n_embd=32",
    "--model.block_size=32",
    "--model.vocab_size=500",
    "--model.pad_vocab_multiple=64",  # 512 rows: the padded-vocabulary path is covered
    "--training.seq_len=32",
    "--training.global_batch_size=8",
    "--training.steps=5",
    "--training.warmup_steps=2",
    "--training.lr=1e-3",
    "--training.min_lr=1e-4",
    "--training.eval_interval=0",
    "--job.seed=1234",
]


def compute() -> dict:
    from gpt3d.config import load_config
    from gpt3d.trainer import Trainer
    from tests.helpers import make_dataset

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp) / "data", vocab_size=500, n_train=8_000, n_val=1_000)
        trainer = Trainer.from_config(load_config([*ARGS, f"--data.dataset={data}"]))
        x, _, _ = trainer.loader.batch_at(0)
        with torch.no_grad():
            logits = trainer.parts.chunks[0](x)[..., :500].double()  # (B, T, V) real vocab
        stats = [trainer.train_step() for _ in range(5)]
    return {
        "initial_logits": {
            "sum": logits.sum().item(),
            "abs_sum": logits.abs().sum().item(),
            "square_sum": logits.square().sum().item(),
            "first": logits[0, 0, :4].tolist(),
        },
        "losses": [s.loss for s in stats],
        "grad_norms": [s.grad_norm for s in stats],
        "lrs": [s.lr for s in stats],
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    GOLDEN.write_text(json.dumps(compute(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
