"""Builds a Trainer, then trains it for 2 steps, and dumps this rank's resident memory:
<out>/rank<r>.json = {"baseline_gib", "startup_peak_gib", "train_peak_gib", "param_bytes",
"full_param_bytes", "state_bytes"} (state: this rank's parameters, gradients and AdamW).

Usage: torchrun --nproc_per_node=N memory_worker.py <out_dir> --section.key=value ...
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch.distributed.fsdp  # noqa: E402, F401 - imported before the baseline is taken
import torch.distributed.tensor.parallel  # noqa: E402, F401

from gpt3d import host_memory  # noqa: E402
from gpt3d.config import load_config  # noqa: E402
from gpt3d.launch import guarded_main  # noqa: E402
from gpt3d.trainer import Trainer  # noqa: E402


def main(argv: list[str]) -> int:
    out, args = Path(argv[0]), argv[1:]
    gc.collect()
    baseline = host_memory.rss_gib()
    host_memory.reset_peak_rss()
    trainer = Trainer.from_config(load_config(args))
    record = {
        "baseline_gib": baseline,
        "startup_peak_gib": host_memory.peak_rss_gib(),
        "param_bytes": nbytes(trainer.params),
        "full_param_bytes": sum(p.numel() * p.element_size() for p in trainer.params),
    }
    for _ in range(2):
        trainer.train_step()
    moments = [t for s in trainer.optimizer.state.values() for t in s.values() if t.dim()]
    grads = [p.grad for p in trainer.params if p.grad is not None]
    record["train_peak_gib"] = host_memory.peak_rss_gib()
    record["state_bytes"] = nbytes(trainer.params) + nbytes(grads) + nbytes(moments)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.env.rank}.json").write_text(json.dumps(record))
    return 0


def nbytes(tensors) -> int:
    """Bytes this rank holds of each tensor (a DTensor's local shard)."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


if __name__ == "__main__":
    guarded_main(main, sys.argv[1:])
