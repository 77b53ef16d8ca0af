"""One CUDA GPU: GPT-2 (124M) at sequence 1024, bf16 + torch.compile, through gpt3d's real
Trainer: tokens/s and MFU against the device's datasheet peak (and a measured bf16 matmul
peak), with eager bf16 alternated in the same run for the compile speed-up. ~2-4 minutes
including the cold compile.

    python benchmarks/bench_gpu.py --out $OUT             # on a GPU machine
    python benchmarks/bench_gpu.py                        # on a CPU box: says "no CUDA", exit 0
    python benchmarks/bench_gpu.py --allow-cpu --n-layer 2 --seq 64 --batch 2   # smoke test
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from common import (
    REPO,
    arg_parser,
    columns,
    gpt2_data,
    machine,
    matmul_peak_flops,
    median,
    table,
    write_results,
)

from gpt3d.config import load_config
from gpt3d.metrics import device_peak_flops, flops_per_token, peak_memory_gib
from gpt3d.trainer import Trainer


def build(a, compile_: bool) -> Trainer:
    args = [
        "--model.preset=gpt2",
        f"--model.n_layer={a.n_layer}",
        "--model.pad_vocab_multiple=64",
        f"--data.dataset={a.data}",
        f"--training.seq_len={a.seq}",
        f"--training.global_batch_size={a.batch}",
        f"--training.grad_accum={a.grad_accum}",
        "--training.dtype=bfloat16",
        f"--training.compile={str(compile_).lower()}",
        "--training.steps=1000000",
        "--training.warmup_steps=0",
        "--training.lr=6e-4",
        "--training.eval_interval=0",
    ]
    return Trainer.from_config(load_config(args))


def main() -> int:
    p = arg_parser(__doc__)
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--data", default=str(REPO / "recipes/data/shakespeare"))
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU anyway (smoke test)")
    a = p.parse_args()
    if not torch.cuda.is_available() and not a.allow_cpu:
        print("no CUDA: bench_gpu.py measures a CUDA GPU; nothing to do here (exit 0)")
        return 0
    torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls left
    a.data = str(gpt2_data(Path(a.data)))
    info = machine()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = 8192 if dev.type == "cuda" else 1024
    measured = matmul_peak_flops(torch.bfloat16, n=n, seconds=2.0, device=dev)
    datasheet = device_peak_flops(dev, 0.0, 0.0) if dev.type == "cuda" else float("nan")
    print(
        f"{info['gpu'] or info['cpu']}: bf16 matmul {measured / 1e12:.1f} TFLOP/s measured, "
        f"{datasheet / 1e12:.0f} datasheet",
        flush=True,
    )
    trainers, first = {}, {}
    for name, comp in (("bf16+compile", True), ("bf16 eager", False)):
        t0 = time.perf_counter()
        trainers[name] = build(a, comp)
        for _ in range(a.warmup):
            trainers[name].train_step()
        first[name] = time.perf_counter() - t0
        print(f"{name}: built + {a.warmup} warm-up steps in {first[name]:.0f}s", flush=True)
    times: dict[str, list[float]] = {k: [] for k in trainers}
    for r in range(a.rounds):
        for name in trainers if r % 2 == 0 else reversed(trainers):
            t0 = time.perf_counter()
            for _ in range(a.steps):
                loss = trainers[name].train_step().loss
            times[name].append((time.perf_counter() - t0) / a.steps)
            print(
                f"  round {r} {name}: {times[name][-1] * 1e3:.1f} ms/step, loss {loss:.3f}",
                flush=True,
            )
    tr = trainers["bf16+compile"]
    tokens = tr.tokens_per_step()
    fpt = flops_per_token(tr.model_cfg, a.seq)
    rows = []
    for name, ts in times.items():
        t = median(ts)
        flops = fpt * tokens / t
        rows.append(
            {
                "variant": name,
                "tokens_per_s": tokens / t,
                "step_ms": 1e3 * t,
                "mfu_datasheet": flops / datasheet,
                "mfu_measured": flops / measured,
                "first_s": first[name],
                "speedup": median(times["bf16 eager"]) / t,
            }
        )
    cols = columns(
        "variant:variant:s; tokens_per_s:tokens/s:,.0f; step_ms:step ms:.1f;"
        "speedup:× eager:.2f; mfu_datasheet:MFU (datasheet):.1%;"
        "mfu_measured:MFU (measured bf16 matmul):.1%; first_s:build+warm-up s:.0f"
    )
    notes = [
        f"GPT-2 124M ({a.n_layer} layers, vocab 50304), seq {a.seq}, batch {a.batch} x grad_accum "
        f"{a.grad_accum} = {tokens:,} tokens/step; bf16 autocast, fp32 master weights, fused AdamW",
        f"peaks: datasheet {datasheet / 1e12:.0f} TFLOP/s (gpt3d.metrics.PEAK_TFLOPS), measured "
        f"{measured / 1e12:.1f} TFLOP/s ({n}² bf16 matmul)",
        f"{a.rounds} rounds x {a.steps} steps per variant, alternated; medians",
        f"peak memory {peak_memory_gib(dev):.1f} GiB (both models in one process)",
    ]
    config = {k: v for k, v in vars(a).items() if k != "out"}
    write_results(
        "bench_gpu",
        "bench_gpu: GPT-2 124M, bf16 + compile, one GPU",
        info,
        config,
        rows,
        table(rows, cols),
        notes,
        Path(a.out),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
