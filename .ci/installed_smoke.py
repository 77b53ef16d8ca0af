"""A user's own training script against an installed gpt3d wheel (not the source checkout):
2 processes, tensor parallel 2 with the plan shipped inside the package, on a synthetic
dataset written here. .ci/run runs it from a temporary directory:

    torchrun --standalone --nproc_per_node=2 installed_smoke.py
"""

import json
import os
import tempfile
from pathlib import Path

import numpy as np

import gpt3d
from gpt3d.config import load_config
from gpt3d.launch import guarded_main
from gpt3d.trainer import Trainer


def main(argv):
    assert "site-packages" in gpt3d.__file__, f"not the installed package: {gpt3d.__file__}"
    data = Path(tempfile.gettempdir()) / f"gpt3d_smoke_{os.environ.get('TORCHELASTIC_RUN_ID')}"
    if os.environ.get("RANK") == "0":  # every rank reads it; rank 0 writes it first
        data.mkdir(exist_ok=True)
        tokens = (np.arange(20_000) * 5 % 97).astype(np.uint16)
        tokens.tofile(data / "train.bin")
        tokens[:4000].tofile(data / "val.bin")
        meta = {"vocab_size": 512, "dtype": "uint16", "train_tokens": 20_000}
        (data / "meta.json").write_text(json.dumps(meta | {"val_tokens": 4000}))
    else:
        import time

        while not (data / "meta.json").exists():
            time.sleep(0.1)
    cfg = load_config(
        [
            "--model.preset=tiny",
            "--model.vocab_size=512",
            "--model.block_size=32",
            "--training.seq_len=32",
            "--training.global_batch_size=4",
            "--parallel.tp=2",
            f"--data.dataset={data}",
        ]
    )
    trainer = Trainer.from_config(cfg)
    losses = [trainer.train_step().loss for _ in range(2)]
    if trainer.env.rank == 0:
        print(f"installed gpt3d {gpt3d.__file__}: tp=2 losses {losses}", flush=True)
    return 0


if __name__ == "__main__":
    guarded_main(main, [])
