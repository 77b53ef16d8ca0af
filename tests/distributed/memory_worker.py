"""Builds a Trainer (no step) and dumps this rank's resident memory around it:
<out>/rank<r>.json = {"baseline_gib", "startup_peak_gib", "param_bytes"}.

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
    local = [p.to_local() if hasattr(p, "to_local") else p for p in trainer.params]
    record = {
        "baseline_gib": baseline,
        "startup_peak_gib": host_memory.peak_rss_gib(),
        "param_bytes": sum(t.numel() * t.element_size() for t in local),
        "full_param_bytes": sum(p.numel() * p.element_size() for p in trainer.params),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.env.rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    guarded_main(main, sys.argv[1:])
