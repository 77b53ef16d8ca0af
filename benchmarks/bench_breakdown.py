"""Where each layout's step time goes, per rank, from torch.profiler traces of real steps of
gpt3d's Trainer (issue 17): compute, communication per mesh axis (exposed and overlapped),
pipeline idle, waiting for a slower peer, and framework overhead (Python, autograd, DTensor
dispatch, FSDP hooks, the loss's Python).

    python benchmarks/bench_breakdown.py                 # every layout of bench_layouts (~15 min)
    python benchmarks/bench_breakdown.py --layouts "1 process,tp2" --profile 1

The model is issue 17's matched one (4 layers x 256, 4 heads, GPT-2's vocabulary padded to
50304, 8 x 128 tokens per step, fp32, grad clip off; pipelines 4 microbatches). Each layout
runs warm-up steps, timed steps without the profiler, then profiled steps on every rank
(benchmarks/worker.py "profile"); benchmarks/trace_breakdown.py labels every microsecond of
each profiled step once, so the categories sum to the step (the residual column checks it).
The raw traces stay in the work directory (printed; several MB per rank); the committed
record is results/bench_breakdown.{md,json,png}.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from common import (
    LAYOUTS,
    REPO,
    RESULTS,
    arg_parser,
    columns,
    gpt2_data,
    machine,
    model_args,
    run_layouts,
    save_figure,
    subplots,
    table,
    write_results,
)
from trace_breakdown import analyze

# stacked-bar categories: (key in the rank row, legend, colour)
BARS = [
    ("compute", "compute (model)", "#4c72b0"),
    ("compute_wrappers", "compute in FSDP / DTensor wrappers", "#8fa8d6"),
    ("comm_dp", "exposed comm dp", "#dd8452"),
    ("comm_tp", "exposed comm tp", "#c44e52"),
    ("comm_pp", "exposed comm pp (+ tied emb.)", "#937860"),
    ("comm_other", "exposed comm other (loss, grad norm)", "#da8bc3"),
    ("idle_pipeline", "pipeline idle", "#8c8c8c"),
    ("idle_peer", "waiting for a slower peer", "#bbbbbb"),
    ("overhead", "framework overhead", "#55a868"),
]
OVERHEADS = ("python", "autograd", "dtensor", "fsdp", "loss")
COMM = ("dp", "tp", "pp", "tied", "other")
P2P = ("pp", "tied")


def rank_row(name: str, r: dict) -> dict:
    """One rank's means (ms per step) flattened for the tables and the plot."""
    t = r["time"]
    comm = {c: t.get(f"comm:{c}", 0.0) for c in (*COMM, "unmapped")}
    row = {
        "layout": name,
        "rank": r["rank"],
        "step_ms": r["unprofiled_step_ms"],
        "profiled_ms": r["wall"],
        "compute": t.get("compute", 0.0),
        "compute_wrappers": t.get("compute_wrappers", 0.0),
        "comm_dp": comm["dp"],
        "comm_tp": comm["tp"],
        "comm_pp": comm["pp"] + comm["tied"],
        "comm_other": comm["other"] + comm["unmapped"],
        "idle_pipeline": t.get("idle:pipeline", 0.0),
        "idle_peer": t.get("idle:peer", 0.0),
        "overhead": sum(v for k, v in t.items() if k.startswith("overhead:")),
        "residual": r["residual"],
        "optimizer_ms": r["phases"].get("Optimizer.step", 0.0),
        "tied_phase_ms": r["phases"].get("phase:tied", 0.0),
    }
    row["comm_exposed"] = sum(row[k] for k in ("comm_dp", "comm_tp", "comm_pp", "comm_other"))
    for c in COMM:  # p2p (pp, tied) has no busy time: gloo's spans end at the wait
        row[f"MiB_{c}"] = r["MiB"].get(c, 0.0)
        row[f"busy_{c}"] = None if c in P2P else r["busy"].get(c, 0.0)
        row[f"overlapped_{c}"] = None if c in P2P else r["overlapped"].get(c, 0.0)
        row[f"exposed_{c}"] = comm[c]
    for k in OVERHEADS:
        row[f"overhead_{k}"] = t.get(f"overhead:{k}", 0.0)
    row["top_aten_ms"] = {k: round(v, 2) for k, v in r["aten"].items()}
    return row


def layout_row(name: str, ranks: list[dict]) -> dict:
    """Means over a layout's ranks (every numeric column)."""
    keys = [k for k, v in ranks[0].items() if isinstance(v, float)]
    row = {k: sum(r[k] for r in ranks) / len(ranks) for k in keys}
    row.update({k: None for k, v in ranks[0].items() if v is None})
    row.update(layout=name, world=len(ranks))
    return row


def pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def markdown(rank_rows: list[dict], layout_rows: list[dict]) -> str:
    for r in layout_rows:
        r["comm_share"] = pct(r["comm_exposed"], r["profiled_ms"])
        r["overhead_share"] = pct(r["overhead"], r["profiled_ms"])
        busy = sum(r[f"busy_{c}"] for c in COMM if c not in P2P)
        ovl = sum(r[f"overlapped_{c}"] for c in COMM if c not in P2P)
        r["overlap_share"] = pct(ovl, busy) if busy else None
    per_rank = columns(
        "layout:layout:s; rank:rank:d; step_ms:step ms (no profiler):.0f;"
        "profiled_ms:profiled step ms:.0f; compute:compute:.0f;"
        "compute_wrappers:compute in wrappers:.0f; comm_dp:exposed dp:.0f;"
        "comm_tp:exposed tp:.0f; comm_pp:exposed pp + tied:.0f; comm_other:exposed other:.0f;"
        "idle_pipeline:pipeline idle:.0f; idle_peer:peer wait:.0f; overhead:overhead:.0f;"
        "residual:residual:.3f"
    )
    per_layout = columns(
        "layout:layout:s; world:procs:d; profiled_ms:step ms:.0f; comm_share:exposed comm %:.1f;"
        "overlap_share:collectives overlapped %:.0f; overhead_share:overhead %:.1f;"
        + "".join(
            f"MiB_{c}:{c} MiB:.1f; busy_{c}:{c} busy:.1f; exposed_{c}:{c} exposed:.1f;"
            for c in COMM
        )
        + "".join(f"overhead_{k}:{k}:.1f;" for k in OVERHEADS)
        + "optimizer_ms:optimizer step:.1f"
    )
    return "\n".join(
        [
            "### Per rank: ms per step, each microsecond counted once",
            "",
            table(rank_rows, per_rank),
            "",
            "### Per layout (mean over ranks): communication per axis and overhead kinds, ms",
            "",
            table(layout_rows, per_layout),
        ]
    )


def plot(rank_rows: list[dict], path: Path) -> None:
    made = subplots(1, 1, figsize=(11, 0.28 * len(rank_rows) + 1.8))
    if made is None:
        return
    fig, ax = made
    labels = [f"{r['layout']} · r{r['rank']}" for r in rank_rows]
    left = [0.0] * len(rank_rows)
    for key, legend, colour in BARS:
        widths = [r[key] for r in rank_rows]
        ax.barh(labels, widths, left=left, color=colour, label=legend)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("ms per profiled step (each microsecond counted once)")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("gpt3d step-time breakdown per layout and rank (2-core CPU, gloo)")
    save_figure(fig, path)


def case_dir(work: Path, name: str) -> Path:
    """Where common.run_layouts has the worker write a layout's files."""
    return work / name.replace(" ", "_").replace("×", "x").replace("+", "_")


def run(a, work: Path) -> dict:
    """Launch every layout (profiled) into `work`; the machine facts of the run."""
    info = machine()
    base = [*model_args(gpt2_data(Path(a.data)), a), "--training.grad_clip=0"]
    spec = {"warmup": a.warmup, "steps": a.steps, "profile": a.profile}
    run_layouts(a.names, base, spec, work)
    info["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    (work / "machine.json").write_text(json.dumps(info))
    return info


def notes(a, info: dict, layout_rows: list[dict], unmatched: dict, work: Path) -> list[str]:
    prof = [r["profiled_ms"] / r["step_ms"] for r in layout_rows]
    return [
        "model: 4 layers x 256, 4 heads, GPT-2 vocabulary (50257 padded to 50304), 8 x 128 "
        "tokens per step, fp32, eager, grad clip off (the norm is still measured: 'other' "
        "comm); pipelines 4 microbatches; every process 1 thread",
        f"per layout {a.warmup} warm-up steps, {a.steps} timed steps without the profiler "
        f"(step ms: their median on that rank), then {a.profile} profiled steps (their mean); "
        f"profiled ÷ unprofiled step: {min(prof):.2f}-{max(prof):.2f} over the layouts",
        "categories: see benchmarks/trace_breakdown.py; residual = step - sum of categories "
        "(0 up to rounding when every event nests)",
        "exposed comm = training thread blocked in a wait or a launch, minus the peer wait "
        "before the last participant joined (pipeline idle on the pp axis); busy = union of "
        "the collectives' runs on gloo's worker threads from the last participant's start; "
        "overlapped = busy while the training thread was not blocked (on 2 shared cores an "
        "overlapped transfer still takes CPU from compute); MiB = bytes this rank handed to "
        "collectives or sent; p2p (pp, tied) has no busy time: gloo's send/recv spans end "
        "when the work is waited for, not when the bytes land",
        "4- and 8-process layouts time-slice 2 cores: their peer wait and pipeline idle include "
        "being descheduled",
        f"transfers without a partner on another rank (their join = own start): {unmatched}",
        f"load average (1 min): {info['load_avg_1m_at_start']} at the start, "
        f"{info['load_avg_1m_at_end']} at the end; raw traces: {work}",
    ]


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated names")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps without the profiler")
    p.add_argument("--profile", type=int, default=2, help="profiled steps per layout")
    p.add_argument("--data", default=str(REPO / "recipes/data/shakespeare"))
    p.add_argument("--traces", type=Path, help="analyse this earlier run's directory instead")
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    a.n_layer, a.n_head, a.n_embd, a.vocab, a.seq, a.batch = 4, 4, 256, 50257, 128, 8
    a.names = [n.strip() for n in a.layouts.split(",")]
    if a.traces:
        work, info = a.traces, json.loads((a.traces / "machine.json").read_text())
    else:
        work = Path(tempfile.mkdtemp(prefix="bench_breakdown_"))
        info = run(a, work)
    rank_rows, layout_rows, unmatched = [], [], {}
    for name in a.names:
        result = analyze(case_dir(work, name))
        rows = [rank_row(name, r) for r in result["ranks"]]
        rank_rows += rows
        layout_rows.append(layout_row(name, rows))
        unmatched[name] = result["unmatched"]
        worst = max(abs(r["residual"]) for r in rows)
        print(f"{name}: residual max {worst:.4f} ms, unmatched {unmatched[name]}", flush=True)
    text = markdown(rank_rows, layout_rows)
    args = {k: v for k, v in vars(a).items() if k not in ("out", "names", "traces")}
    config = {"args": args, "per_layout": layout_rows}
    title = "bench_breakdown: where each layout's step time goes"
    write_results(
        "bench_breakdown",
        title,
        info,
        config,
        rank_rows,
        text,
        notes(a, info, layout_rows, unmatched, work),
        Path(a.out),
    )
    plot(rank_rows, Path(a.out) / "bench_breakdown.png")


if __name__ == "__main__":
    main()
