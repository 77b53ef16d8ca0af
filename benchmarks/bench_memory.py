"""Per-rank memory of each layout: parameters, gradients, optimizer state (counted from the
tensors each rank holds after a real step of gpt3d's Trainer) against the
1/(tp·pp·dp_shard) theory, and the peak of activations saved for backward.

    python benchmarks/bench_memory.py                     # ~10 min on the 2-core box
    python benchmarks/bench_memory.py --vocab 50257 --name bench_memory_gpt2_vocab

Theory: a rank holds total/(tp·pp·dp_shard) of the 1-process model state. What it does not
shard shows up as overshoot: LayerNorm weights and row-parallel biases are replicated over tp,
and with pp > 1 a tied embedding exists twice (first stage wte, last stage lm_head copy).
Activations are measured with autograd's saved-tensor hooks (storage-deduplicated, parameters
excluded). Resident memory (RSS) is measured too, at start-up and in training, against that
arithmetic: what a rank really costs the machine (docs/memory.md). Each layout runs in fresh
processes, its baseline taken after a step of the same layout on a near-zero-size model
(worker.py's warm_baseline): the fixed cost of a process that has trained is baseline.

The loss over the logits is measured too, in this process: the peak bytes alive (every
storage, LiveBytes) during the lm_head matmul, the loss and their backward, above what existed
before, for gpt3d's loss (gpt3d/loss.py) against the path it replaced (a mask over the padded
vocabulary, then F.cross_entropy on an fp32 copy) and plain F.cross_entropy.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from common import (
    FSDP,
    LAYOUTS,
    REPO,
    SP,
    TP2,
    add_model_flags,
    arg_parser,
    columns,
    machine,
    model_args,
    pp_args,
    run_layouts,
    save_figure,
    subplots,
    synthetic_data,
    table,
    write_results,
)

RESHARD = "--parallel.fsdp_reshard_per_microbatch=true"
MEMORY_LAYOUTS = {
    **{k: LAYOUTS[k] for k in ("1 process", "dp2 FSDP", "dp2 DDP", "tp2", "tp2+SP")},
    "pp2 GPipe": LAYOUTS["pp2 GPipe"],
    "pp2 1F1B": LAYOUTS["pp2 1F1B"],
    "pp2 ZBVZeroBubble": LAYOUTS["pp2 ZBVZeroBubble"],
    "dp4 FSDP": (4, [FSDP]),
    "dp4 FSDP (table in root)": (4, [FSDP, "--parallel.embedding_sharding=fsdp"]),
    "tp4": (4, ["--parallel.tp=4"]),
    "dp2×tp2 FSDP+SP": LAYOUTS["dp2×tp2 FSDP+SP"],
    "dp2×pp2 FSDP": (4, [FSDP, *pp_args(2, "1F1B", 4)]),
    "dp2×pp2 FSDP resharded per microbatch": (4, [FSDP, *pp_args(2, "1F1B", 4), RESHARD]),
    "tp2×pp2 1F1B": LAYOUTS["tp2×pp2 1F1B"],
    "dp2×pp2×tp2 FSDP+SP": (8, [FSDP, TP2, SP, *pp_args(2, "1F1B", 4)]),
    "dp2×pp2×tp2 FSDP+SP resharded per microbatch": (
        8,
        [FSDP, TP2, SP, *pp_args(2, "1F1B", 4), RESHARD],
    ),
}
MiB = 2**20
TABLE = {"vocab": "rows", "fsdp": "root"}  # where FSDP keeps the embedding table
LEAN = "--job.malloc_mmap_threshold_kb=64"  # glibc's mmap threshold pinned low on every rank


def degrees(layout: str) -> dict[str, int]:
    """'pp=2 x dp_replicate=1 x dp_shard=2 x tp=2' -> {'pp': 2, ...}"""
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", layout)}


def row_for(name: str, ranks: list[dict], ref: dict | None, fsdp_unsharded=()) -> dict:
    d = degrees(ranks[0]["layout"])
    state = [r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] for r in ranks]
    worst = ranks[state.index(max(state))]
    row = {
        "layout": name,
        "world": ranks[0]["world"],
        "shards": d["tp"] * d["pp"] * d["dp_shard"],
        "table": TABLE.get(ranks[0].get("embedding_sharding"), "-") if d["dp_shard"] > 1 else "-",
        "param_MiB": worst["param_bytes"] / MiB,
        "grad_MiB": worst["grad_bytes"] / MiB,
        "optim_MiB": worst["optim_bytes"] / MiB,
        "state_MiB": max(state) / MiB,
        "state_min_MiB": min(state) / MiB,
        "act_MiB": max(r["activation_peak_bytes"] for r in ranks) / MiB,
        **rss_columns(ranks, fsdp_unsharded),
    }
    if ref is not None:
        row["theory_MiB"] = ref["state_MiB"] / row["shards"]
        row["vs_theory"] = row["state_MiB"] / row["theory_MiB"]
        row["act_rel"] = row["act_MiB"] / ref["act_MiB"]
    return row


def planner_by_rank(args: list[str], world: int) -> list:
    """The analytic planner's breakdown of each pipeline rank (gpt3d/planner/memory.py):
    the arithmetic plus what it knows a layout keeps besides (FSDP's unsharded blocks and
    root, the logits path)."""
    from gpt3d.config import load_config
    from gpt3d.planner.check import workload_and_layout
    from gpt3d.planner.memory import memory_by_rank
    from gpt3d.preflight import preflight

    w, lay = workload_and_layout(preflight(load_config(args), world), "cpu")
    return memory_by_rank(w, lay)


def rss_columns(ranks: list[dict], fsdp_unsharded: list[float] = ()) -> dict:
    """Resident memory (MiB) of the rank that used the most, at start-up and in training,
    above its own baseline, against the arithmetic: parameters at start-up; parameters +
    gradients + AdamW + saved activations in training, and that plus what FSDP holds
    unsharded by construction (fsdp_unsharded: bytes per pipeline rank, planner's
    fsdp_unsharded: one block or the root and its gradient, or under pp the whole stage
    unless resharded per microbatch). The target: excess <= 1.25."""

    def worst(peak: str, arithmetic) -> tuple[float, float]:
        above = [(r[peak] - r["rss_baseline_gib"]) * 1024 for r in ranks]
        i = above.index(max(above))
        return above[i], above[i] / (arithmetic(ranks[i]) / MiB)

    def unit(r: dict) -> float:  # this rank's pipeline rank's FSDP unit (pp outermost)
        pp = len(fsdp_unsharded)
        return fsdp_unsharded[r["rank"] // (r["world"] // pp)] if pp else 0.0

    start, start_x = worst("rss_startup_peak_gib", lambda r: r["param_bytes"])
    state = ("param_bytes", "grad_bytes", "optim_bytes", "activation_peak_bytes")
    train, train_x = worst("rss_training_peak_gib", lambda r: sum(r[k] for k in state))
    _, train_fsdp_x = worst("rss_training_peak_gib", lambda r: sum(r[k] for k in state) + unit(r))
    return {
        "fsdp_unsharded_MiB": max(fsdp_unsharded, default=0.0) / MiB,
        "rss_train_x_fsdp": train_fsdp_x,
        "rss_base_MiB": max(r["rss_baseline_gib"] for r in ranks) * 1024,
        "rss_fixed_MiB": max(r["rss_baseline_gib"] - r["rss_cold_gib"] for r in ranks) * 1024,
        "rss_start_MiB": start,
        "rss_start_x": start_x,
        "rss_train_MiB": train,
        "rss_train_x": train_x,
    }


def plot(rows: list[dict], path: Path) -> None:
    made = subplots(figsize=(9, 4.8))
    if made is None:
        return
    fig, ax = made
    names = [r["layout"] for r in rows]
    ys = range(len(rows))
    left = [0.0] * len(rows)
    for key, label in (
        ("param_MiB", "parameters"),
        ("grad_MiB", "gradients"),
        ("optim_MiB", "AdamW state"),
        ("act_MiB", "saved activations (peak)"),
    ):
        vals = [r[key] for r in rows]
        ax.barh(ys, vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    ax.scatter(
        [r.get("theory_MiB", 0) for r in rows],
        ys,
        color="k",
        marker="|",
        s=300,
        zorder=3,
        label="1/(tp·pp·dp_shard) theory (model state)",
    )
    ax.set_yticks(list(ys), names)
    ax.invert_yaxis()
    ax.set_xlabel("MiB on the fullest rank")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("bench_memory: per-rank bytes by layout")
    save_figure(fig, path)


LOSS_PATHS = ("gpt3d (gpt3d/loss.py)", "before: masked_fill + F.cross_entropy(fp32 copy)",
              "F.cross_entropy (no mask)")  # fmt: skip


LOSS_VOCAB = 50257  # GPT-2's: where the logits dominate (small vocabularies fit one chunk)


def loss_peak(path: str, tokens: int, n_embd: int, vocab: int, dtype) -> float:
    """Peak bytes alive above the start during logits = h @ W.T, the loss and backward."""
    import torch
    import torch.nn.functional as F

    from gpt3d.loss import token_loss_sum
    from gpt3d.planner.livebytes import LiveBytes

    padded = -(-vocab // 64) * 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, n_embd, generator=g).to(dtype).requires_grad_()
    w = (0.02 * torch.randn(padded, n_embd, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g)
    meter = LiveBytes(None)
    with meter.tracking():
        start = meter.now
        logits = h @ w.t()  # (N, V_padded)
        if path == LOSS_PATHS[0]:
            loss = token_loss_sum(logits, targets, vocab)
        elif path == LOSS_PATHS[1]:
            pad = torch.arange(padded) >= vocab
            masked = logits.masked_fill(pad, float("-inf"))
            loss = F.cross_entropy(masked.float(), targets, reduction="sum")
        else:
            loss = F.cross_entropy(logits, targets, reduction="sum")
        del logits
        loss.backward()
    return meter.peak - start


def loss_rows(a) -> list[dict]:
    import torch

    rows = []
    tokens, vocab = a.batch * a.seq, LOSS_VOCAB
    for dtype in (torch.float32, torch.bfloat16):
        logits_bytes = tokens * (-(-vocab // 64) * 64) * dtype.itemsize
        peaks = {p: loss_peak(p, tokens, a.n_embd, vocab, dtype) for p in LOSS_PATHS}
        for path, peak in peaks.items():
            rows.append({
                "loss": path,
                "dtype": str(dtype).removeprefix("torch."),
                "logits_MiB": logits_bytes / MiB,
                "peak_MiB": peak / MiB,
                "peak_x_logits": peak / logits_bytes,
                "vs_gpt3d": peak / peaks[LOSS_PATHS[0]],
            })  # fmt: skip
    return rows


def main() -> None:
    p = arg_parser(__doc__)
    add_model_flags(p, n_layer=8)
    p.add_argument("--layouts", default=",".join(MEMORY_LAYOUTS))
    p.add_argument("--name", default="bench_memory", help="results file name")
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    a = p.parse_args()
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    base = model_args(synthetic_data(work, a.vocab), a)
    names = [n.strip() for n in a.layouts.split(",")]
    spec = {"warmup": 1, "steps": 1, "memory": True, "warm_baseline": True}
    results = run_layouts(names, base, spec, work, MEMORY_LAYOUTS, fresh=True)
    plans = {
        n: planner_by_rank([*base, *MEMORY_LAYOUTS[n][1]], MEMORY_LAYOUTS[n][0]) for n in names
    }
    units = {n: [mb.detail["fsdp_unsharded"] for mb in plans[n]] for n in names}
    ref = row_for("1 process", results["1 process"], None) if "1 process" in results else None
    rows = [row_for(n, results[n], ref, units[n]) for n in names]
    # the same layouts with the lean allocator everywhere: what the auto (fast) setting of
    # the unsharded layouts keeps resident for speed (docs/memory.md, item 1)
    lean = run_layouts(names, [*base, LEAN], spec, work / "lean", MEMORY_LAYOUTS, fresh=True)
    for row in rows:
        lean_rss = rss_columns(lean[row["layout"]], units[row["layout"]])
        row.update({f"{k}_lean": v for k, v in lean_rss.items()})
    for row in rows:  # RSS against what the planner predicts, FSDP's working set included
        row["planner_MiB"] = max(mb.total for mb in plans[row["layout"]]) / MiB
        row["rss_train_x_planner"] = row["rss_train_MiB"] / row["planner_MiB"]
    cols = columns(
        "layout:layout:s; world:procs:d; shards:tp·pp·dp_shard:d; table:table:s;"
        "param_MiB:params:.2f; grad_MiB:grads:.2f; optim_MiB:AdamW:.2f;"
        "state_MiB:state max:.2f; state_min_MiB:state min:.2f;"
        "theory_MiB:theory:.2f; vs_theory:max / theory:.3f;"
        "act_MiB:activations peak:.2f; act_rel:act × 1 proc:.2f;"
        "rss_base_MiB:RSS baseline:.0f; rss_fixed_MiB:of which fixed cost of training:.0f;"
        "rss_start_MiB:start-up RSS above base:.0f;"
        "rss_start_x:÷ params:.2f; rss_train_MiB:training RSS above base:.0f;"
        "rss_train_x:÷ (state + act):.2f; fsdp_unsharded_MiB:FSDP unsharded:.1f;"
        "rss_train_x_fsdp:÷ (state + act + FSDP unsharded):.2f;"
        "planner_MiB:planner total:.0f; rss_train_x_planner:÷ planner:.2f;"
        "rss_train_MiB_lean:lean allocator, training RSS above base:.0f;"
        "rss_train_x_lean:lean ÷ (state + act):.2f;"
        "rss_train_x_fsdp_lean:lean ÷ (state + act + FSDP unsharded):.2f"
    )
    lrows = loss_rows(a)
    lcols = columns(
        "loss:loss path:s; dtype:dtype:s; logits_MiB:one logits tensor MiB:.1f;"
        "peak_MiB:peak MiB:.1f; peak_x_logits:÷ logits:.2f; vs_gpt3d:× gpt3d:.2f"
    )
    worst = max((r for r in rows if "vs_theory" in r), key=lambda r: r["vs_theory"])
    notes = [
        f"model {a.n_layer}L/{a.n_head}h/{a.n_embd}d, vocab {a.vocab} (padded to 64), seq {a.seq}, "
        f"global batch {a.batch} sequences; fp32 AdamW (exp_avg + exp_avg_sq); pipeline "
        "layouts use 4 microbatches",
        "MiB on the rank with the most model state (params + grads + AdamW); state min: the "
        "rank with the least; theory = 1-process state / (tp·pp·dp_shard)",
        "activations: peak bytes of tensors saved for backward during one train_step (saved-"
        "tensor hooks, storage-deduplicated, parameters excluded); act × 1 proc is relative to "
        "the 1-process peak",
        f"largest overshoot: {worst['layout']} at {worst['vs_theory']:.3f} x theory",
        "RSS (resident set size, /proc/self/status) of the rank that used the most, above its "
        "own baseline: the process right before building the Trainer, after one step of the "
        "same layout on a near-zero-size model (width 8 per head, 16 tokens) and with freed "
        "memory returned, so the baseline holds what a process costs whatever the model "
        "(process groups, threads, first-use caches); 'of which fixed cost' is what that "
        "warm-up step left behind (every layout runs in fresh processes, so every row pays "
        "it). Start-up peak while building and initialising the model, ÷ its parameter bytes; "
        "training peak over the warm-up and timed steps, ÷ (params + grads + AdamW + saved "
        "activations), and ÷ that plus what FSDP holds unsharded by construction (FSDP "
        "unsharded, the planner's fsdp_unsharded of the rank's pipeline stage: the larger of "
        "a block and the root with its fp32 gradient; under pp the whole stage, which FSDP "
        "keeps unsharded all step unless resharded per microbatch). Target: start-up and "
        "training (with FSDP unsharded) ÷ <= 1.25",
        "RSS columns run with the default host allocator setting (job.malloc_mmap_threshold_kb "
        "= -1: 64 KiB while the model is built; then 64 KiB on FSDP ranks, 256 MiB on the "
        "others, whose model state fits comfortably: a step's temporaries are reused instead "
        "of re-faulted); 'lean' columns: the same layouts with 64 KiB throughout",
        "table: where FSDP keeps the embedding table (parallel.embedding_sharding as "
        "resolved, auto unless the layout says): rows = sharded by vocabulary rows over "
        "dp_shard all step, ids and hidden states gathered instead; root = in FSDP's root "
        "group, gathered whole for the step with its whole gradient",
        "planner total: the analytic planner's prediction for the fullest rank (state + "
        "activations + the temporaries it models: FSDP's unsharded blocks and root with the "
        "tied embedding, the logits path); ÷ planner = training RSS above base ÷ it",
        f"loss table: {a.batch * a.seq} tokens x GPT-2's vocabulary padded to 50304 (whatever "
        f"--vocab is), hidden {a.n_embd}; peak "
        "of every storage alive (LiveBytes) from the lm_head matmul through the loss's backward, "
        "above what existed before (h, W, targets); the gradients of h and W are included",
    ]
    config = {"args": {k: v for k, v in vars(a).items() if k != "out"}, "loss_rows": lrows}
    write_results(
        a.name,
        "bench_memory: per-rank bytes vs the 1/(tp·pp·dp_shard) theory",
        info,
        config,
        rows,
        table(rows, cols) + "\n\nLoss over the logits (one process):\n\n" + table(lrows, lcols),
        notes,
        Path(a.out),
    )
    plot(rows, Path(a.out) / f"{a.name}.png")


if __name__ == "__main__":
    main()
