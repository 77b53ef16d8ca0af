"""One process: gpt3d's training step vs a minimal plain-PyTorch loop of the same model.

Both train the same GPT-2 shape (same init, same batch shapes, same math: separate q/k/v,
SDPA, tied embeddings, fused AdamW with nanoGPT's decay groups, clip at 1.0). Variants are
alternated round by round in one process, so the machine's load hits them alike; the ratio
of each round is taken and the median reported. MFU is against this machine's *measured*
matmul peak (same dtype, same thread count), plus the datasheet peak on a GPU.

    python benchmarks/bench_step.py                       # tiny, mini, small, gpt2 (~6 min)
    python benchmarks/bench_step.py --sizes tiny,mini --rounds 2 --extras-sizes mini
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from common import (
    REPO,
    arg_parser,
    columns,
    gpt2_data,
    machine,
    matmul_peak_flops,
    median,
    pyplot,
    save_figure,
    table,
    write_results,
)

from gpt3d.config import load_config
from gpt3d.metrics import device_peak_flops, flops_per_token
from gpt3d.model import GPTConfig
from gpt3d.trainer import Trainer

SIZES = {  # n_layer, n_head, n_embd
    "tiny": (2, 2, 64),
    "mini": (4, 4, 128),
    "small": (6, 6, 384),
    "gpt2": (12, 12, 768),
}
DATA = gpt2_data(REPO / "recipes/data/shakespeare")  # or synthetic GPT-2-vocab tokens


# ---- the plain-PyTorch reference: a minimal GPT-2 with gpt3d's parameter names ----------
class PlainBlock(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        C = c.n_embd
        self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
            setattr(self.attn, name, nn.Linear(C, C))
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.hd = c.head_dim

    def forward(self, x):
        B, T, C = x.shape
        h, a = self.ln_1(x), self.attn
        q, k, v = (
            p(h).view(B, T, -1, self.hd).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj)
        )
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.wte, self.wpe = (
            nn.Embedding(c.vocab_size, c.n_embd),
            nn.Embedding(c.block_size, c.n_embd),
        )
        self.h = nn.ModuleList(PlainBlock(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class PlainLoop:
    """nanoGPT's train loop, minus everything optional."""

    def __init__(self, model: PlainGPT, batch: int, seq: int):
        self.model, self.batch, self.seq = model, batch, seq
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), fused=True)
        self.data = np.memmap(DATA / "train.bin", dtype=np.uint16, mode="r")
        self.rng = np.random.default_rng(0)

    def get_batch(self):
        ix = self.rng.integers(0, len(self.data) - self.seq - 1, self.batch)
        xy = torch.from_numpy(
            np.stack([self.data[i : i + self.seq + 1] for i in ix]).astype(np.int64)
        )
        return xy[:, :-1], xy[:, 1:]

    def step(self) -> float:
        x, y = self.get_batch()
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


# ---- building and timing --------------------------------------------------------------
def trainer_for(size: str, batch: int, seq: int, *extra: str) -> Trainer:
    L, H, C = SIZES[size]
    args = [
        "--model.preset=gpt2",
        f"--model.n_layer={L}",
        f"--model.n_head={H}",
        f"--model.n_embd={C}",
        "--model.pad_vocab_multiple=1",
        f"--data.dataset={DATA}",
        f"--training.seq_len={seq}",
        f"--training.global_batch_size={batch}",
        "--training.steps=1000000",
        "--training.warmup_steps=0",
        "--training.lr=1e-4",
        "--training.eval_interval=0",
        *extra,
    ]
    return Trainer.from_config(load_config(args))


def plain_for(trainer: Trainer, batch: int, seq: int) -> PlainLoop:
    model = PlainGPT(trainer.model_cfg)
    model.load_state_dict(trainer.parts.chunks[0].state_dict())  # same initial weights
    return PlainLoop(model, batch, seq)


def same_math_check(trainer: Trainer, plain: PlainLoop) -> float:
    """|loss difference| of the two models on one batch at the same weights (before training)."""
    x, y = plain.get_batch()
    with torch.no_grad():
        ours = (
            trainer.loss_fn(trainer.parts.chunks[0](x), y).item()
            * trainer.loss_fn.global_tokens
            / y.numel()
        )
        theirs = F.cross_entropy(plain.model(x).flatten(0, 1), y.flatten()).item()
    return abs(ours - theirs)


def time_steps(step, seconds: float, min_steps: int = 2) -> list[float]:
    times, start = [], time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def bench_size(size: str, args, extras: bool, peaks: dict) -> list[dict]:
    variants = {"plain": None, "gpt3d": ()}
    if extras:
        variants.update(
            {
                "gpt3d+compile": ("--training.compile=true",),
                "gpt3d+bf16": ("--training.dtype=bfloat16",),
                "gpt3d+bf16+compile": ("--training.dtype=bfloat16", "--training.compile=true"),
            }
        )
    steps, first = {}, {}
    torch._dynamo.reset()  # a fresh compile per size (a second shape would turn dynamic)
    for name, extra in variants.items():
        if extra is None:
            continue
        t0 = time.perf_counter()
        steps[name] = trainer_for(size, args.batch, args.seq, *extra)
        steps[name].train_step()  # warm-up (and compile)
        first[name] = time.perf_counter() - t0
    base = steps["gpt3d"]
    plain = plain_for(base, args.batch, args.seq)
    diff = same_math_check(base, plain)
    plain.step()
    fns = {n: (plain.step if n == "plain" else steps[n].train_step) for n in variants}
    times: dict[str, list[float]] = {n: [] for n in variants}
    ratios: dict[str, list[float]] = {n: [] for n in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        this = {n: median(time_steps(fns[n], args.seconds)) for n in order}
        for n in variants:
            times[n].append(this[n])
            ratios[n].append(this["plain"] / this[n])  # throughput relative to plain
    cfg = base.model_cfg
    tokens = args.batch * args.seq
    fpt = flops_per_token(cfg, args.seq)
    cfg_params = base.parts.chunks[0].num_params()
    rows = []
    for n in variants:
        t = median(times[n])
        dtype = "bf16" if "bf16" in n else "fp32"
        vs_gpt3d = [a / b for a, b in zip(ratios[n], ratios["gpt3d"], strict=True)]
        row = {
            "size": size,
            "variant": n,
            "params_M": round(cfg_params / 1e6, 1),
            "tokens_per_s": tokens / t,
            "step_ms": 1e3 * t,
            "vs_plain": median(ratios[n]),
            "vs_gpt3d": median(vs_gpt3d),
            "mfu_measured": fpt * tokens / t / peaks[dtype],
            "first_step_s": first.get(n),
            "loss_diff_vs_plain": diff if n == "gpt3d" else None,
            "round_step_ms": [round(1e3 * x, 2) for x in times[n]],
        }
        if torch.cuda.is_available():
            row["mfu_datasheet"] = fpt * tokens / t / device_peak_flops(base.env.device, 0, 0)
        rows.append(row)
        print(
            f"  {size:6s} {n:20s} {row['tokens_per_s']:9.0f} tok/s  x{row['vs_plain']:.3f} "
            f"vs plain  mfu {100 * row['mfu_measured']:.1f}%",
            flush=True,
        )
    return rows


ADAMW_COLS = columns("size:size:s; variant:optimizer:s; step_ms:ms:.1f; vs_foreach:× foreach:.2f")


def bench_adamw(size: str, repeats: int = 5) -> list[dict]:
    """The optimizer step alone on the model's parameters: foreach vs fused AdamW, alternated."""
    L, H, C = SIZES[size]
    params = list(PlainGPT(GPTConfig(n_layer=L, n_head=H, n_embd=C)).parameters())
    for q in params:
        q.grad = torch.randn_like(q)
    opts = {k: torch.optim.AdamW(params, lr=1e-4, **{k: True}) for k in ("foreach", "fused")}
    best = {k: float("inf") for k in opts}
    for _ in range(repeats):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            best[k] = min(best[k], time.perf_counter() - t0)
    rows = [
        {
            "size": size,
            "variant": f"AdamW step only, {k}",
            "step_ms": 1e3 * t,
            "vs_foreach": best["foreach"] / t,
        }
        for k, t in best.items()
    ]
    print(
        f"  AdamW on {size}: foreach {1e3 * best['foreach']:.0f} ms, fused "
        f"{1e3 * best['fused']:.0f} ms",
        flush=True,
    )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        xs = [j + i * width for j, s in enumerate(sizes)]
        ys = [
            next((r["vs_plain"] for r in rows if r["size"] == s and r["variant"] == v), math.nan)
            for s in sizes
        ]
        ax.bar(xs, ys, width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes)
    ax.set_ylabel("throughput / plain PyTorch loop")
    ax.set_title("bench_step: one process, same run, alternated")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--sizes", default="tiny,mini,small,gpt2")
    p.add_argument("--extras-sizes", default="mini,gpt2", help="sizes that also run compile/bf16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per variant per round (min 2 steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))  # cold
    torch.manual_seed(0)
    peaks = {"fp32": matmul_peak_flops(torch.float32), "bf16": matmul_peak_flops(torch.bfloat16)}
    print(
        f"measured matmul peak ({args.threads} thread): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    rows = []
    extras = set(args.extras_sizes.split(","))
    for size in args.sizes.split(","):
        rows += bench_size(size, args, size in extras, peaks)
    adamw = bench_adamw(args.sizes.split(",")[-1])
    cols = columns(
        "size:size:s; variant:variant:s; tokens_per_s:tokens/s:,.0f;"
        "step_ms:step ms:.1f; vs_plain:× plain:.3f; vs_gpt3d:× gpt3d eager:.3f;"
        "mfu_measured:MFU (measured peak):.1%; first_step_s:first step s:.1f"
    )
    if torch.cuda.is_available():
        cols.append(("mfu_datasheet", "MFU (datasheet)", ".1%"))
    out = Path(args.out)
    gpt3d_rows = [r for r in rows if r["variant"] == "gpt3d"]
    notes = [
        f"measured matmul peak on {args.threads} thread(s): fp32 {peaks['fp32'] / 1e9:.1f}, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s (1024² matmul); MFU of bf16 variants is against "
        "the bf16 peak, fp32 against the fp32 peak",
        "× plain / × gpt3d eager: median over rounds of the ratio measured within the round "
        "(variants alternated); tokens/s and step ms are medians",
        "same math: |loss(gpt3d) - loss(plain)| on one batch at init = "
        + ", ".join(f"{r['size']} {r['loss_diff_vs_plain']:.1e}" for r in gpt3d_rows),
        "first step s includes building the Trainer and, for compile, the cold inductor compile",
        "datasheet peaks (GPU only) come from gpt3d.metrics.PEAK_TFLOPS",
        "AdamW rows: the optimizer step alone on that model's parameters (best of 5, "
        "alternated); gpt3d uses fused AdamW wherever the device has it (gpt3d/optim.py)",
    ]
    config = {
        k: getattr(args, k)
        for k in ("sizes", "extras_sizes", "batch", "seq", "rounds", "seconds", "threads")
    }
    title = "bench_step: gpt3d step vs a plain PyTorch loop (1 process)"
    md = table(rows, cols) + "\n\n" + table(adamw, ADAMW_COLS)
    write_results("bench_step", title, machine(), config, rows + adamw, md, notes, out)
    plot(rows, out / "bench_step.png")


if __name__ == "__main__":
    main()
