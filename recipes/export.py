"""Export a gpt3d DCP checkpoint (saved on any layout) to a Hugging Face GPT-2 directory:
model.safetensors + config.json, loadable by transformers.GPT2LMHeadModel.from_pretrained.
A Mixture-of-Experts model is written with Mixtral-style names instead (gpt3d/moe_hf.py).

    python recipes/export.py --checkpoint out/shakespeare/checkpoints/step-120 --out out/hf
    python recipes/export.py --checkpoint auto --output_dir out/shakespeare --out out/hf

One process, offline, no process group: only the model tensors are read (never the optimizer
state), straight into full unsharded tensors.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from gpt3d.launch import guarded_main  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="step-N checkpoint directory, or auto")
    p.add_argument(
        "--output_dir", "--output-dir", default="out/shakespeare", help="the run's dir, for auto"
    )
    p.add_argument("--out", required=True, type=Path, help="directory to write")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype on disk")
    p.add_argument(
        "--skip-checksums",
        action="store_true",
        help="do not check the checkpoint files' crc32 first (huge checkpoints; not safer)",
    )
    return p.parse_args(argv)


def export(argv: list[str]) -> int:
    import torch

    from gpt3d.checkpoint_dir import find_checkpoint, load_model_state_dict
    from gpt3d.hf import save_hf
    from gpt3d.model import describe
    from gpt3d.moe_hf import save_moe_hf

    args = parse_args(argv)
    t0 = time.perf_counter()
    path = find_checkpoint(args.checkpoint, args.output_dir)
    cfg, sd = load_model_state_dict(path, checksums=not args.skip_checksums)
    dtype = getattr(torch, args.dtype)
    if cfg.n_experts:  # no GPT-2 layout: Mixtral-style names (gpt3d/moe_hf.py)
        save_moe_hf(args.out, sd, cfg, dtype)
    else:
        save_hf(args.out, {k: v.to(dtype) for k, v in sd.items()}, cfg)
    took = time.perf_counter() - t0
    print(f"exported {path} -> {args.out} ({args.dtype}; {describe(cfg)}) in {took:.1f}s")
    return 0


if __name__ == "__main__":
    guarded_main(export, sys.argv[1:])
