"""One process: gpt3d's training step vs a nanoGPT-style GPT-2 and loop (benchmarks/peers.py).

The peer is the fastest straightforward PyTorch GPT-2 a user would write instead: fused q/k/v,
Linear with bias, the vocabulary padded to 50304 without a mask, F.cross_entropy on the full
logits, nanoGPT's loop with fused AdamW. gpt3d trains the same shape (vocab 50257 padded to
50304 rows, which its loss never gives probability mass). Both start from the same weights;
the loss of both on the same batch (over the real vocabulary) is reported. Variants are
alternated round by round in one process so the machine's load hits them alike; the ratio
gpt3d / peer (same dtype) of each round is taken and the median reported. MFU is against this
machine's *measured* matmul peak (same dtype, same thread count).

    python benchmarks/bench_step.py                                  # 4 sizes, fp32 + bf16
    python benchmarks/bench_step.py --sizes mini --rounds 2 --compile-sizes mini
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import (
    REPO,
    arg_parser,
    columns,
    gpt2_data,
    machine,
    median,
    save_figure,
    subplots,
    table,
    write_results,
)
from peers import NanoStyleGPT, NanoStyleLoop

from gpt3d.config import load_config
from gpt3d.metrics import flops_per_token, matmul_peak_flops
from gpt3d.trainer import Trainer

SIZES = {  # n_layer, n_head, n_embd, batch (sequences of --seq tokens)
    "tiny": (2, 2, 64, 16),
    "mini": (4, 4, 128, 16),
    "6L/384": (6, 6, 384, 8),
    "gpt2": (12, 12, 768, 4),
}
DATA = gpt2_data(REPO / "recipes/data/shakespeare")  # or synthetic GPT-2-vocab tokens
PEER = "nanoGPT-style"


def gpt3d_for(size: str, seq: int, *extra: str) -> Trainer:
    L, H, C, B = SIZES[size]
    args = [
        "--model.preset=gpt2",
        f"--model.n_layer={L}",
        f"--model.n_head={H}",
        f"--model.n_embd={C}",
        "--model.pad_vocab_multiple=64",
        f"--data.dataset={DATA}",
        f"--training.seq_len={seq}",
        f"--training.global_batch_size={B}",
        "--training.steps=1000000",
        "--training.warmup_steps=0",
        "--training.lr=1e-4",
        "--training.eval_interval=0",
        *extra,
    ]
    return Trainer.from_config(load_config(args))


def peer_for(trainer: Trainer, seq: int, bf16: bool) -> NanoStyleLoop:
    cfg, batch = trainer.model_cfg, trainer.cfg.training.global_batch_size
    model = NanoStyleGPT(cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.padded_vocab_size, cfg.block_size)
    model.load_gpt3d(trainer.parts.chunks[0].state_dict())  # the same initial weights
    tokens = np.memmap(DATA / "train.bin", dtype=np.uint16, mode="r")
    rng = np.random.default_rng(0)

    def batches():  # nanoGPT's get_batch: random windows
        ix = rng.integers(0, len(tokens) - seq - 1, batch)
        xy = torch.from_numpy(np.stack([tokens[i : i + seq + 1] for i in ix]).astype(np.int64))
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()

    return NanoStyleLoop(model, batches, bf16=bf16)


def loss_difference(trainer: Trainer, peer: NanoStyleLoop) -> float:
    """|gpt3d loss - peer loss over the real vocabulary| on one batch at the same weights."""
    x, y, _ = trainer.loader.batch_at(0)
    V = trainer.model_cfg.vocab_size
    with torch.no_grad():
        ours = trainer.loss_fn(trainer.parts.chunks[0](x), y).item() * trainer.loss_fn.global_tokens
        m = peer.model
        h = m.wte(x) + m.wpe(torch.arange(x.size(1)))
        for block in m.h:
            h = block(h)
        logits = m.lm_head(m.ln_f(h))[..., :V]
        theirs = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    return abs(ours / y.numel() - theirs)


def time_steps(step, seconds: float, min_steps: int = 2) -> list[float]:
    times, start = [], time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def build_variants(size: str, args, compile_too: bool) -> tuple[dict, dict, float]:
    """{name: step function}, {name: build + first step seconds}, loss difference."""
    gpt3d = {"gpt3d fp32": (), "gpt3d bf16": ("--training.dtype=bfloat16",)}
    if compile_too:
        gpt3d["gpt3d fp32 compile blocks"] = ("--training.compile=true",)
        gpt3d["gpt3d fp32 compile stage"] = (
            "--training.compile=true",
            "--training.compile_scope=stage",
        )
    steps, first = {}, {}
    torch._dynamo.reset()  # a fresh compile per size (a second shape would turn dynamic)
    for name, extra in gpt3d.items():
        t0 = time.perf_counter()
        steps[name] = gpt3d_for(size, args.seq, *extra).train_step
        steps[name]()  # warm-up (and compile)
        first[name] = time.perf_counter() - t0
    base = gpt3d_for(size, args.seq)
    diff = loss_difference(base, peer_for(base, args.seq, bf16=False))
    for dtype in ("fp32", "bf16"):
        peer = peer_for(base, args.seq, bf16=dtype == "bf16")
        peer.step()
        steps[f"{PEER} {dtype}"] = peer.step
    return steps, first, diff


def bench_size(size: str, args, compile_too: bool, peaks: dict) -> list[dict]:
    steps, first, diff = build_variants(size, args, compile_too)
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names if r % 2 == 0 else reversed(names):
            times[n].append(median(time_steps(steps[n], args.seconds)))
    L, H, C, B = SIZES[size]
    tokens = B * args.seq
    fpt = flops_per_token(gpt3d_cfg(size, args.seq), args.seq)
    rows = []
    for n in names:
        dtype = "bf16" if "bf16" in n else "fp32"
        peer = times[f"{PEER} {dtype}"]
        t = median(times[n])
        rows.append(
            {
                "size": size,
                "shape": f"{L}L/{C}, {B}x{args.seq}",
                "variant": n,
                "tokens_per_s": tokens / t,
                "step_ms": 1e3 * t,
                "vs_peer": median([p / mine for p, mine in zip(peer, times[n], strict=True)]),
                "mfu_measured": fpt * tokens / t / peaks[dtype],
                "first_step_s": first.get(n),
                "loss_diff_vs_peer": diff if n == "gpt3d fp32" else None,
                "round_step_ms": [round(1e3 * x, 1) for x in times[n]],
            }
        )
        print(
            f"  {size:7s} {n:28s} {rows[-1]['tokens_per_s']:9.0f} tok/s  "
            f"x{rows[-1]['vs_peer']:.3f} vs peer  mfu {100 * rows[-1]['mfu_measured']:.1f}%",
            flush=True,
        )
    return rows


def gpt3d_cfg(size: str, seq: int):
    from gpt3d.model import preset_config

    L, H, C, _ = SIZES[size]
    return preset_config("gpt2", n_layer=L, n_head=H, n_embd=C, pad_vocab_multiple=64)


ADAMW_COLS = columns("size:size:s; variant:optimizer:s; step_ms:ms:.1f; vs_foreach:× foreach:.2f")


def bench_adamw(size: str, repeats: int = 5) -> list[dict]:
    """The optimizer step alone on the model's parameters: foreach vs fused AdamW, alternated."""
    L, H, C, _ = SIZES[size]
    params = list(NanoStyleGPT(L, H, C, 50304, 1024).parameters())
    for q in params:
        q.grad = torch.randn_like(q)
    opts = {k: torch.optim.AdamW(params, lr=1e-4, **{k: True}) for k in ("foreach", "fused")}
    best = {k: float("inf") for k in opts}
    for _ in range(repeats):
        for k, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            best[k] = min(best[k], time.perf_counter() - t0)
    return [
        {
            "size": size,
            "variant": f"AdamW step only, {k}",
            "step_ms": 1e3 * t,
            "vs_foreach": best["foreach"] / t,
        }
        for k, t in best.items()
    ]


def plot(rows: list[dict], path: Path) -> None:
    made = subplots(figsize=(9, 4))
    if made is None:
        return
    fig, ax = made
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if not v.startswith(PEER)]
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        got = {r["size"]: r["vs_peer"] for r in rows if r["variant"] == v}
        xs = [j + i * width for j, s in enumerate(sizes) if s in got]
        ax.bar(xs, [got[s] for s in sizes if s in got], width, label=v)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes)
    ax.set_ylabel(f"gpt3d step speed / {PEER} (same dtype)")
    ax.set_title("bench_step: one process, same run, alternated")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--compile-sizes", default="mini,gpt2", help="sizes that also run compile")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0, help="per variant per round (min 2 steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))  # cold
    torch.manual_seed(0)
    peaks = {"fp32": matmul_peak_flops(torch.float32), "bf16": matmul_peak_flops(torch.bfloat16)}
    print(
        f"measured matmul peak ({args.threads} thread): fp32 {peaks['fp32'] / 1e9:.1f}, "
        f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s",
        flush=True,
    )
    rows = []
    compile_sizes = set(args.compile_sizes.split(","))
    for size in args.sizes.split(","):
        rows += bench_size(size, args, size in compile_sizes, peaks)
    adamw = bench_adamw(args.sizes.split(",")[-1])
    cols = columns(
        "size:size:s; shape:shape:s; variant:variant:s; tokens_per_s:tokens/s:,.0f;"
        "step_ms:step ms:.1f; vs_peer:× peer (same dtype):.3f;"
        "mfu_measured:MFU (measured peak):.1%; first_step_s:first step s:.1f"
    )
    notes = [
        f"peer: {PEER} GPT-2 and loop (benchmarks/peers.py); measured matmul peak on "
        f"{args.threads} thread(s): fp32 {peaks['fp32'] / 1e9:.1f}, bf16 "
        f"{peaks['bf16'] / 1e9:.1f} GFLOP/s (1024² matmul); bf16 MFU against the bf16 peak",
        f"× peer: median over {args.rounds} rounds of the ratio measured within the round "
        "(variants alternated); tokens/s and step ms are medians",
        "same math: |loss(gpt3d) - loss(peer over the real vocabulary)| on one batch at init = "
        + ", ".join(
            f"{r['size']} {r['loss_diff_vs_peer']:.1e}"
            for r in rows
            if r["loss_diff_vs_peer"] is not None
        ),
        "first step s includes building the Trainer and, for compile, the cold inductor compile",
        "AdamW rows: the optimizer step alone on that model's parameters (best of 5, "
        "alternated); gpt3d and the peer both use fused AdamW",
    ]
    config = {
        k: getattr(args, k)
        for k in ("sizes", "compile_sizes", "seq", "rounds", "seconds", "threads")
    }
    title = f"bench_step: gpt3d step vs a {PEER} GPT-2 (1 process)"
    md = table(rows, cols) + "\n\n" + table(adamw, ADAMW_COLS)
    out = Path(args.out)
    write_results("bench_step", title, machine(), config, rows + adamw, md, notes, out)
    plot(rows, out / "bench_step.png")


if __name__ == "__main__":
    main()
