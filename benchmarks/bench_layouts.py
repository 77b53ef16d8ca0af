"""Every layout of gpt3d's real Trainer (real torchrun launches), same model and global
batch: tokens/s, step time and per-rank memory, relative to the 1-process run.

    python benchmarks/bench_layouts.py                   # ~4 min on the 2-core box
    python benchmarks/bench_layouts.py --layouts "1 process,tp2,dp2 FSDP" --steps 3

On a 2-core CPU box, 2 processes can at best double the 1-process throughput and 4 or 8
processes share the same 2 cores (oversubscribed): those rows measure overheads
(communication, scheduling), not scaling. The 1-process run with 2 threads is the fair
"same hardware" baseline for the 2-process layouts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import (
    LAYOUTS,
    REPO,
    add_model_flags,
    arg_parser,
    columns,
    launch,
    machine,
    model_args,
    run_layouts,
    save_figure,
    subplots,
    synthetic_data,
    table,
    write_results,
)


def summarize(name: str, ranks: list[dict], base: dict | None) -> dict:
    # Best of the timed steps (other jobs only ever add time); a step ends when the slowest
    # rank finishes it.
    step = min(max(ts) for ts in zip(*(r["step_s"] for r in ranks), strict=True))
    mem = [
        r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] + r["activation_peak_bytes"]
        for r in ranks
    ]
    row = {
        "layout": name,
        "world": ranks[0]["world"],
        "step_ms": 1e3 * step,
        "tokens_per_s": ranks[0]["tokens_per_step"] / step,
        "mem_max_MiB": max(mem) / 2**20,
        "mem_min_MiB": min(mem) / 2**20,
        "final_loss": next(r["losses"][-1] for r in reversed(ranks)),
    }
    if base is not None:
        row["speedup"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["mem_rel"] = row["mem_max_MiB"] / base["mem_max_MiB"]
    return row


def plot(rows: list[dict], path: Path) -> None:
    made = subplots(1, 2, figsize=(11, 4.5), sharey=True)
    if made is None:
        return
    fig, (a1, a2) = made
    names = [r["layout"] for r in rows]
    a1.barh(names, [r.get("speedup", 1.0) for r in rows], color="tab:blue")
    a1.axvline(1.0, color="k", lw=0.8)
    a1.set_xlabel("tokens/s relative to 1 process (1 thread)")
    a2.barh(names, [r.get("mem_rel", 1.0) for r in rows], color="tab:orange")
    a2.axvline(1.0, color="k", lw=0.8)
    a2.set_xlabel("max per-rank memory relative to 1 process")
    a1.invert_yaxis()
    fig.suptitle("bench_layouts (2-core CPU; ≥4 processes are oversubscribed)")
    save_figure(fig, path)


def main() -> None:
    p = arg_parser(__doc__)
    add_model_flags(p)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--passes", type=int, default=2, help="repeat every launch, pool the steps")
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    a = p.parse_args()
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="bench_layouts_"))
    base = model_args(synthetic_data(work, a.vocab), a)
    names = [n.strip() for n in a.layouts.split(",")]
    spec = {"warmup": a.warmup, "steps": a.steps, "memory": True}
    # Every layout `passes` times, spread over minutes; steps of all passes pooled (best-of).
    results: dict[str, list[dict]] = {}
    baseline = []
    for i in range(a.passes):
        for name, ranks in run_layouts(names, base, spec, work / f"pass{i}").items():
            if name == "1 process":
                baseline.append(summarize(name, ranks, None)["tokens_per_s"])
            pooled = results.setdefault(name, ranks)
            if pooled is not ranks:
                for mine, more in zip(pooled, ranks, strict=True):
                    mine["step_s"] += more["step_s"]
    two = {"threads2": {"args": base, **spec, "threads": 2}}
    results["1 process, 2 threads"] = launch(1, two, work / "threads2")["threads2"]
    ref = summarize("1 process", results["1 process"], None) if "1 process" in results else None
    rows = [summarize(n, results[n], ref) for n in [*names, "1 process, 2 threads"]]
    cols = columns(
        "layout:layout:s; world:procs:d; tokens_per_s:tokens/s:,.0f;"
        "step_ms:step ms:.0f; speedup:× 1 proc:.2f;"
        "mem_max_MiB:mem/rank max MiB:.1f; mem_min_MiB:min MiB:.1f;"
        "mem_rel:mem × 1 proc:.2f; final_loss:loss:.4f"
    )
    notes = [
        f"model {a.n_layer}L/{a.n_head}h/{a.n_embd}d, vocab {a.vocab} (synthetic data), "
        f"seq {a.seq}, "
        f"global batch {a.batch} sequences = {a.batch * a.seq} tokens per step; fp32, eager",
        f"step ms: best of {a.passes} passes x {a.steps} timed steps (a step lasts until its "
        "slowest rank is done); tokens/s from it",
        "mem/rank: parameters + gradients + optimizer state + peak saved activations, counted "
        "from the tensors each rank holds (see bench_memory for the breakdown); not process RSS",
        "every process runs 1 thread; 2 processes fill the 2 cores, 4 and 8 processes share them "
        "(oversubscribed: their tokens/s shows overhead, not scaling); other engineers' jobs "
        "shared the machine during the run (load average at start above)",
        "pipeline layouts: 4 microbatches; losses agree across layouts (same data, same init)",
    ]
    if ref is not None:
        notes.append(
            "× 1 proc is against the 1-process (1 thread) run; its best step per pass gave "
            + ", ".join(f"{b:,.0f}" for b in baseline)
            + " tokens/s (drift of the shared machine)"
        )
    config = {"args": {k: v for k, v in vars(a).items() if k != "out"}}
    write_results(
        "bench_layouts",
        "bench_layouts: throughput and memory per layout",
        info,
        config,
        rows,
        table(rows, cols),
        notes,
        Path(a.out),
    )
    plot(rows, Path(a.out) / "bench_layouts.png")


if __name__ == "__main__":
    main()
