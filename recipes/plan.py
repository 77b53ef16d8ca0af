"""Rank every valid layout of a model on a cluster by predicted memory and step time.

    python recipes/plan.py --model gpt2-xl --gpus 32 --gpus-per-node 8 --gpu h100 \
        --global-batch 512 --seq 1024 --dtype bfloat16
    python recipes/plan.py --model gpt2 --gpus 2 --gpu cpu --calibrate --profile cpu.json
    python recipes/plan.py --model gpt2 --gpus 2 --gpu cpu --profile cpu.json --dtype float32

Prints the ranked layouts (memory per rank, step-time breakdown, tokens/s, MFU) and the
torchrun command of the best ones; when nothing fits, the smallest cluster or batch that
would. The model is in gpt3d/planner (hardware, memory, cost, search).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout


def parse_args(argv: list[str]) -> argparse.Namespace:
    from gpt3d.model import PRESETS
    from gpt3d.planner.hardware import PROFILES
    from gpt3d.planner.layout import AC_MODES, SCHEDULES

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--model", default="gpt2", choices=sorted(PRESETS), help="model preset")
    for dim in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        a(f"--{dim.replace('_', '-')}", type=int, help=f"override the preset's {dim}")
    a("--pad-vocab-multiple", type=int, default=64, help="vocab padding (tp needs it divisible)")
    a("--gpus", type=int, required=True, help="devices (processes) in the cluster")
    a("--gpus-per-node", type=int, help="devices per node (default: all in one node)")
    a("--gpu", default="h100", help=f"hardware: {', '.join(sorted(PROFILES))} or cpu")
    a(
        "--profile",
        help="a JSON hardware profile (written by --calibrate); with --calibrate: where to save it",
    )
    a("--calibrate", action="store_true", help="measure this machine as the cpu profile")
    a("--global-batch", type=int, required=True, help="sequences per optimizer step")
    a("--seq", type=int, default=1024, help="sequence length")
    a("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    a("--mem-gib", type=float, help="device memory, GiB (override the profile)")
    a("--usable-fraction", type=float, default=0.9, help="share of memory a run may use")
    a("--intra-gbps", type=float, help="inside-node bus bandwidth, GB/s (override)")
    a("--inter-gbps", type=float, help="between-node bus bandwidth per device, GB/s (override)")
    a("--compute-eff", type=float, help="achieved / peak FLOP/s in the model (override)")
    a("--dp-exposed", type=float, help="minimum exposed share of FSDP/DDP traffic")
    a("--schedules", default=",".join(SCHEDULES), help="pipeline schedules to consider")
    a("--ac", default=",".join(AC_MODES), help="activation checkpointing modes to consider")
    a("--top", type=int, default=15, help="rows to print")
    a("--commands", type=int, default=3, help="torchrun commands to print")
    return p.parse_args(argv)


def hardware(args):
    from gpt3d.planner import hardware as hw

    if args.calibrate:
        from gpt3d.planner.calibrate import measure_cpu_profile

        print("calibrating this machine (matmul, GPT step, memory, gloo collectives)...")
        profile = measure_cpu_profile(world=2)
        path = hw.save_profile(profile, args.profile or "out/planner/cpu_profile.json")
        print(f"saved {path}\n{profile.to_json()}\n")
    elif args.profile:
        profile = hw.load_profile(args.profile)
    else:
        profile = hw.get_profile(args.gpu)
    return hw.override(
        profile,
        mem_gib=args.mem_gib,
        intra_gbps=args.intra_gbps,
        inter_gbps=args.inter_gbps,
        compute_efficiency=args.compute_eff,
    )


def main(argv: list[str]) -> int:
    from gpt3d.planner import Cluster, SearchSpace, Workload, format_report, plan

    args = parse_args(argv)
    try:
        profile = hardware(args)
        w = Workload.from_preset(
            args.model,
            args.seq,
            args.global_batch,
            args.dtype,
            args.pad_vocab_multiple,
            **{
                k: getattr(args, k)
                for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
            },
        )
        cluster = Cluster(args.gpus, args.gpus_per_node or args.gpus, profile, args.usable_fraction)
        space = SearchSpace(
            schedules=tuple(args.schedules.split(",")), ac_modes=tuple(args.ac.split(","))
        )
        result = plan(w, cluster, space, args.dp_exposed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(result, args.top, args.commands))
    return 0 if result.feasible else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
