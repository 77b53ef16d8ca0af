"""One CUDA GPU: GPT-2 (124M) at sequence 1024 through gpt3d's real Trainer, every setting
that could lift MFU measured in one go: tokens/s, MFU (datasheet and measured bf16 matmul
peak), peak memory, and the first losses of each variant against today's settings on the
same global batch (bf16 tolerance).

    python benchmarks/bench_gpu.py --out $OUT             # on a GPU machine (~8-10 min)
    python benchmarks/bench_gpu.py                        # on a CPU box: says "no CUDA", exit 0
    python benchmarks/bench_gpu.py --allow-cpu --n-layer 2 --seq 64 --micro 2 --steps 2 \\
        --warmup 1 --variants today,stage                 # CPU smoke test of the script

Variants (each: config overrides, micro-batch sequences):
    today           bf16, per-block compile, micro-batch 16 (the wave-1 H200 run: 23 % MFU)
    eager           bf16 eager, micro-batch 16
    micro32/micro64 per-block compile, micro-batch 32 / 64
    stage           the whole model and the loss compiled as one graph (compile_scope=stage)
    stage64         stage + micro-batch 64
    autotune64      stage + micro-batch 64 + max-autotune-no-cudagraphs
    graphs64        stage + micro-batch 64 + reduce-overhead (CUDA graphs)
The loss never copies the logits (gpt3d/loss.py) in every variant. recipes/configs/
gpt2_gpu.toml holds the configuration the run found best (update it from the results).
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch
from common import REPO, arg_parser, columns, gpt2_data, machine, median, table, write_results

from gpt3d.config import load_config
from gpt3d.metrics import device_peak, flops_per_token, matmul_peak_flops
from gpt3d.trainer import Trainer

STAGE = ["--training.compile=true", "--training.compile_scope=stage"]
VARIANTS = {  # name -> (overrides, micro-batch sequences)
    "today": (["--training.compile=true"], 16),
    "eager": ([], 16),
    "micro32": (["--training.compile=true"], 32),
    "micro64": (["--training.compile=true"], 64),
    "stage": (STAGE, 16),
    "stage64": (STAGE, 64),
    "autotune64": ([*STAGE, "--training.compile_mode=max-autotune-no-cudagraphs"], 64),
    "graphs64": ([*STAGE, "--training.compile_mode=reduce-overhead"], 64),
}


def build(a, overrides: list[str], micro: int, global_batch: int) -> Trainer:
    args = [
        "--model.preset=gpt2",
        f"--model.n_layer={a.n_layer}",
        "--model.pad_vocab_multiple=64",
        f"--data.dataset={a.data}",
        f"--training.seq_len={a.seq}",
        f"--training.global_batch_size={global_batch}",
        f"--training.grad_accum={global_batch // micro}",
        "--training.dtype=bfloat16",
        "--training.steps=1000000",
        "--training.warmup_steps=0",
        "--training.lr=6e-4",
        "--training.eval_interval=0",
        *overrides,
    ]
    return Trainer.from_config(load_config(args))


def measure(a, name: str, dev: torch.device) -> dict:
    """Build, warm up (compile), time a.steps steps; free everything afterwards."""
    overrides, micro = VARIANTS[name]
    micro = micro if dev.type == "cuda" else a.micro * micro // 16
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    trainer = build(a, overrides, micro, micro)
    losses = [trainer.train_step().loss for _ in range(a.warmup)]
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        losses.append(trainer.train_step().loss)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    tokens = trainer.tokens_per_step()
    row = {
        "variant": name,
        "micro": micro,
        "step_s": median(times),
        "tokens": tokens,
        "first_s": first,
        "losses": losses,
        "mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
    }
    del trainer
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    print(
        f"  {name}: micro {micro}, {1e3 * row['step_s']:.1f} ms/step, "
        f"{tokens / row['step_s']:,.0f} tok/s, first {first:.0f}s",
        flush=True,
    )
    return row


def same_curve(a, name: str, dev: torch.device) -> float:
    """Max |loss difference| over the first steps between `name` and today's settings at the
    same global batch (today's micro-batch, accumulated)."""
    overrides, micro = VARIANTS[name]
    micro = micro if dev.type == "cuda" else a.micro * micro // 16
    today = VARIANTS["today"][1] if dev.type == "cuda" else a.micro
    curves = []
    for ov, mb in ((VARIANTS["today"][0], today), (overrides, micro)):
        torch._dynamo.reset()
        trainer = build(a, ov, mb, micro)
        curves.append([trainer.train_step().loss for _ in range(a.curve_steps)])
        del trainer
        gc.collect()
    return max(abs(x - y) for x, y in zip(*curves, strict=True))


def main() -> int:
    p = arg_parser(__doc__)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/gpu"))
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--micro", type=int, default=2, help="CPU smoke test: micro-batch of today")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--curve-steps", type=int, default=8, help="steps of the loss comparison")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--data", default=str(REPO / "recipes/data/shakespeare"))
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU anyway (smoke test)")
    a = p.parse_args()
    if not torch.cuda.is_available() and not a.allow_cpu:
        print("no CUDA: bench_gpu.py measures a CUDA GPU; nothing to do here (exit 0)")
        return 0
    torch.set_float32_matmul_precision("high")  # TF32 for the few fp32 matmuls left
    a.data = str(gpt2_data(Path(a.data)))
    info, dev = machine(), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n = 8192 if dev.type == "cuda" else 1024
    measured = matmul_peak_flops(torch.bfloat16, n=n, seconds=2.0, device=dev)
    datasheet = device_peak(dev, torch.bfloat16).flops if dev.type == "cuda" else float("nan")
    print(
        f"{info['gpu'] or info['cpu']}: bf16 matmul {measured / 1e12:.1f} TFLOP/s measured, "
        f"{datasheet / 1e12:.0f} datasheet",
        flush=True,
    )
    names = [v.strip() for v in a.variants.split(",")]
    rows = [measure(a, name, dev) for name in names]
    fpt = flops_per_token(_cfg(a), a.seq)
    for r in rows:
        r["tokens_per_s"], r["step_ms"] = r["tokens"] / r["step_s"], 1e3 * r["step_s"]
        r["mfu_datasheet"] = fpt * r["tokens_per_s"] / datasheet
        r["mfu_measured"] = fpt * r["tokens_per_s"] / measured
    base = next((r for r in rows if r["variant"] == "today"), rows[0])
    for r in rows:
        r["vs_today"] = r["tokens_per_s"] / base["tokens_per_s"]
    best = max(rows, key=lambda r: r["tokens_per_s"])
    best["loss_diff_vs_today"] = same_curve(a, best["variant"], dev)
    cols = columns(
        "variant:variant:s; micro:micro-batch:d; tokens_per_s:tokens/s:,.0f; step_ms:step ms:.1f;"
        "vs_today:× today:.2f; mfu_datasheet:MFU (datasheet):.1%;"
        "mfu_measured:MFU (measured bf16 matmul):.1%; mem_gib:peak GiB:.1f;"
        "first_s:build+warm-up s:.0f"
    )
    notes = [
        f"GPT-2 124M ({a.n_layer} layers, vocab 50304), seq {a.seq}; bf16 (FSDP-free autocast), "
        "fp32 master weights, fused AdamW; the loss never copies the logits (gpt3d/loss.py)",
        f"peaks: datasheet {datasheet / 1e12:.0f} TFLOP/s (gpt3d.metrics.PEAK_TFLOPS), measured "
        f"{measured / 1e12:.1f} TFLOP/s ({n}² bf16 matmul)",
        f"{a.steps} timed steps per variant after {a.warmup} warm-up steps; medians",
        f"best: {best['variant']}; its losses over the first {a.curve_steps} steps vs today's "
        f"settings on the same global batch: max |diff| {best['loss_diff_vs_today']:.2e}",
    ]
    config = {k: v for k, v in vars(a).items() if k != "out"}
    write_results(
        "bench_gpu",
        "bench_gpu: GPT-2 124M on one GPU, every MFU setting",
        info,
        config,
        rows,
        table(rows, cols),
        notes,
        Path(a.out),
    )
    return 0


def _cfg(a):
    from gpt3d.model import preset_config

    return preset_config("gpt2", n_layer=a.n_layer, pad_vocab_multiple=64)


if __name__ == "__main__":
    sys.exit(main())
