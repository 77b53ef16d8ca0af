"""gpt3d against a hand-written peer on matched work, layout by layout (issue 17): tokens/s
of gpt3d's real Trainer and of huggingface/picotron, alternated in one run, with gpt3d's
parity (max |loss - 1-process loss|) next to each row.

    python benchmarks/bench_peer.py                        # gpt3d only, vs the recorded peer
    python benchmarks/bench_peer.py --picotron ~/picotron  # both sides, alternated (~40 min)
    python benchmarks/bench_peer.py --layouts "1 process,tp2" --rounds 1 --steps 10

Matched work: 4 layers x 256 wide, 4 heads, vocabulary 50304 (GPT-2's 50257 padded to 64),
8 x 128 tokens per step, fp32, one thread per process, gradient clipping off on both sides;
pipelines run 4 microbatches (of 2; of 1 per data-parallel rank in 3D). picotron's model is
a Llama (SwiGLU MLP, RMSNorm, RoPE, untied head) whose MLP width makes its non-embedding
parameters, and so its model FLOPs per token, equal to the GPT-2's (the JSON has both).

Method, the same on both sides: every run trains `warmup + steps` free-running steps (no
barrier between steps) and times each one on the rank that logs (last pipeline stage, tensor
and data-parallel rank 0) from before zero_grad to after the optimizer step; tokens/s comes
from the median of the steady steps pooled over rounds. Each layout's gpt3d and picotron
runs follow each other, their order flipping every round.

picotron is not part of gpt3d and nothing here fetches or patches it. --picotron DIR points
at your own checkout with the local patches benchmarks/README.md lists (CPU/gloo, offline
tokens, the step time printed in full). Without it, gpt3d's numbers are compared with the
peer numbers recorded in results/bench_peer.json, labelled with their date.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from common import (
    DDP,
    FSDP,
    REPO,
    RESULTS,
    TP2,
    arg_parser,
    columns,
    gpt2_data,
    launch,
    machine,
    median,
    model_args,
    pp_args,
    table,
    write_results,
)
from picotron_side import (
    BATCH,
    N_EMBD,
    N_HEAD,
    N_LAYER,
    PADDED_VOCAB,
    SEQ,
    VOCAB,
    Peer,
    matched_flops,
    picotron_inputs,
    run_picotron,
)

PP4 = pp_args(2, "1F1B", 4)
# row -> (gpt3d layout overrides, matched picotron layout)
LAYOUTS = {
    "1 process": ([], Peer()),
    "dp2 default (auto)": ([], Peer(dp=2, mbs=4)),
    "dp2 dp_mode=fsdp": ([FSDP], Peer(dp=2, mbs=4)),
    "dp2 dp_mode=ddp": ([DDP], Peer(dp=2, mbs=4)),
    "tp2": ([TP2], Peer(tp=2)),
    "pp2 1F1B": (PP4, Peer(pp=2, mbs=2, acc=4)),
    "pp2 GPipe vs AFAB": (pp_args(2, "GPipe", 4), Peer(pp=2, engine="afab", mbs=2, acc=4)),
    "tp2 × pp2 1F1B": ([TP2, *PP4], Peer(tp=2, pp=2, mbs=2, acc=4)),
    "dp2 × tp2 × pp2 default (auto)": ([TP2, *PP4], Peer(dp=2, tp=2, pp=2, mbs=1, acc=4)),
    "dp2 × tp2 × pp2 dp_mode=fsdp": ([FSDP, TP2, *PP4], Peer(dp=2, tp=2, pp=2, mbs=1, acc=4)),
}


# ---- gpt3d's side -----------------------------------------------------------------------
def logging_rank(world: int, pp: int) -> int:
    """gpt3d's mesh is (pp, dp_replicate, dp_shard, tp), row-major: the last stage's
    data-parallel and tensor rank 0."""
    return world // pp * (pp - 1)


def run_gpt3d(name: str, data: Path, a, work: Path) -> tuple[list[float], list[float], str]:
    """(step seconds on the logging rank, losses, the data-parallel wrapper used) of one
    free-running launch."""
    overrides, peer = LAYOUTS[name]
    args = [*model_args(data, a), "--training.grad_clip=0", *overrides]
    spec = {"args": args, "warmup": a.warmup, "steps": a.steps, "barrier": False}
    ranks = launch(peer.world, {"case": spec}, work)["case"]
    log = ranks[logging_rank(peer.world, peer.pp)]
    return log["step_s"], log["losses"], log["dp_mode"]


# ---- the run --------------------------------------------------------------------------------
ISSUE_RATIO = {  # gpt3d ÷ picotron in issue 17's table (before the loss and dp_mode changes)
    "1 process": 0.93,
    "dp2 dp_mode=fsdp": 0.80,
    "dp2 dp_mode=ddp": 0.92,
    "tp2": 1.16,
    "pp2 1F1B": 0.87,
    "pp2 GPipe vs AFAB": 0.89,
    "tp2 × pp2 1F1B": 1.09,
    "dp2 × tp2 × pp2 dp_mode=fsdp": 0.75,
}


def alternate(names: list[str], picotron: Path | None, data: Path, a, work: Path) -> dict:
    """{"gpt3d": {row: [(step_s, losses) per round]}, "picotron": {peer key: [...]}}: per
    round and peer layout, picotron then its gpt3d rows (reversed every other round)."""
    by_peer: dict[Peer, list[str]] = {}
    for name in names:
        by_peer.setdefault(LAYOUTS[name][1], []).append(name)
    model_dir = picotron_inputs(work) if picotron else None
    out = {"gpt3d": {}, "picotron": {}, "dp_mode": {}}
    for r in range(a.rounds):
        for peer, rows in by_peer.items():
            runs = [("picotron", peer.key)] if picotron else []
            runs += [("gpt3d", name) for name in rows]
            for side, key in runs if r % 2 == 0 else runs[::-1]:
                print(
                    f"round {r + 1}/{a.rounds}: {side} {key} (load {os.getloadavg()[0]:.1f})",
                    flush=True,
                )
                sub = work / f"r{r}_{side}_{re.sub(r'[^A-Za-z0-9]+', '_', key)}"
                if side == "gpt3d":
                    *result, out["dp_mode"][key] = run_gpt3d(key, data, a, sub)
                else:  # runs in `work`, where its weights file is
                    result = run_picotron(picotron, peer, model_dir, data, a, work)
                out[side].setdefault(key, []).append(result)
    return out


def max_dev(runs: list, ref: list) -> float | None:
    """max |loss - reference loss| over the steps and rounds both have."""
    if not runs or not ref:
        return None
    pairs = zip(runs, ref, strict=False)
    return max(abs(x - y) for (_, lo), (_, lr) in pairs for x, y in zip(lo, lr, strict=False))


def summarize(names: list[str], out: dict, recorded: dict | None) -> list[dict]:
    tokens = BATCH * SEQ
    rows = []
    for name in names:
        peer = LAYOUTS[name][1]
        mine = out["gpt3d"][name]
        step = median([t for ts, _ in mine for t in ts])
        row = {
            "layout": name,
            "world": peer.world,
            "gpt3d_tokens_per_s": tokens / step,
            "gpt3d_step_ms": 1e3 * step,
            "picotron_layout": peer.key,
            "gpt3d_steps_s": [t for ts, _ in mine for t in ts],
            "gpt3d_parity": max_dev(mine, out["gpt3d"].get("1 process", [])),
            "issue_ratio": ISSUE_RATIO.get(name),
            "gpt3d_dp_mode": out["dp_mode"][name] if peer.dp > 1 else None,
        }
        theirs = out["picotron"].get(peer.key)
        if theirs:
            peer_step = median([t for ts, _ in theirs for t in ts])
            row["picotron_tokens_per_s"] = tokens / peer_step
            row["picotron_steps_s"] = [t for ts, _ in theirs for t in ts]
            row["round_ratios"] = [
                median(p) / median(g) for (g, _), (p, _) in zip(mine, theirs, strict=True)
            ]
            row["picotron_parity"] = max_dev(theirs, out["picotron"].get(Peer().key, []))
        elif recorded and peer.key in recorded:
            row["picotron_tokens_per_s"] = recorded[peer.key]
        if row.get("picotron_tokens_per_s"):
            row["ratio"] = row["gpt3d_tokens_per_s"] / row["picotron_tokens_per_s"]
        rows.append(row)
    return rows


def recorded_peer() -> tuple[dict, str] | tuple[None, None]:
    """picotron tokens/s per layout key and the date they were measured, from the last
    alternated run (results/bench_peer.json)."""
    path = RESULTS / "bench_peer.json"
    if not path.exists():
        return None, None
    peer = json.loads(path.read_text())["config"]["peer"]
    return peer["tokens_per_s"], peer["date"]


def report(rows: list[dict], a, info: dict, measured: bool, date: str | None, flops: dict):
    cols = columns(
        "layout:layout:s; world:procs:d; gpt3d_dp_mode:gpt3d dp wrapper:s;"
        "gpt3d_tokens_per_s:gpt3d tokens/s:,.0f;"
        "picotron_tokens_per_s:picotron tokens/s:,.0f; ratio:gpt3d ÷ picotron:.2f;"
        "issue_ratio:issue 17 ratio:.2f; gpt3d_parity:gpt3d max abs Δ loss vs 1 proc:.1e;"
        "picotron_parity:picotron max abs Δ loss vs its 1 proc:.1e"
    )
    peer = {
        r["picotron_layout"]: r["picotron_tokens_per_s"]
        for r in rows
        if r.get("picotron_tokens_per_s")
    }
    source = (
        "picotron measured in this run, alternated with gpt3d"
        if measured
        else f"picotron NOT run: its column holds the numbers recorded on {date} "
        "(results/bench_peer.json), not measured now"
        if date
        else "picotron NOT run and no recorded numbers: pass --picotron DIR"
    )
    notes = [
        source,
        f"matched work: {N_LAYER} layers x {N_EMBD}, {N_HEAD} heads, vocabulary "
        f"{PADDED_VOCAB}, {BATCH} x {SEQ} tokens per step, fp32, 1 thread per process, "
        "grad clip off; pipelines 4 microbatches (3D: 4 per data-parallel rank); picotron's "
        f"Llama MLP width {flops['llama_intermediate']} -> model FLOPs per token differ by "
        f"{flops['rel_diff']:.1e}",
        f"tokens/s from the median step of {a.rounds} round(s) x {a.steps} steady steps "
        f"(after {a.warmup} warm-up steps) per side, free-running, timed on the logging rank; "
        "gpt3d ÷ picotron from those medians (per-round ratios in the JSON)",
        "issue 17 ratio: the same comparison before the loss-path and dp_mode changes",
        "gpt3d parity: max |loss - 1-process loss| over the timed steps of every round; "
        "picotron's (printed to 4 decimals) against its own 1-process run",
        f"load average (1 min): {info['load_avg_1m_at_start']} at the start, "
        f"{info['load_avg_1m_at_end']} at the end; 2 shared cores: 4 and 8 processes are "
        "oversubscribed",
    ]
    peer_record = {
        "date": info["date"] if measured else date,
        "tokens_per_s": peer,
        "source": "measured" if measured else "recorded",
    }
    config = {
        "args": {k: str(v) for k, v in vars(a).items() if k not in ("out", "picotron")},
        "matched_flops": flops,
        "peer": peer_record,
    }
    name = "bench_peer" if measured else "bench_peer_vs_recorded"
    write_results(
        name,
        "gpt3d vs picotron on matched work, per layout",
        info,
        config,
        rows,
        table(rows, cols),
        notes,
        Path(a.out),
    )


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--picotron", type=Path, help="your patched picotron checkout")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated rows")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="timed steady steps per run")
    p.add_argument("--data", default=str(REPO / "recipes/data/shakespeare"))
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    a.n_layer, a.n_head, a.n_embd, a.vocab, a.seq, a.batch = (
        N_LAYER,
        N_HEAD,
        N_EMBD,
        VOCAB,
        SEQ,
        BATCH,
    )
    names = [n.strip() for n in a.layouts.split(",")]
    if "1 process" not in names:
        names.insert(0, "1 process")  # the parity reference
    picotron = a.picotron.expanduser().resolve() if a.picotron else None
    if picotron and not (picotron / "train.py").exists():
        raise SystemExit(f"--picotron {picotron}: no train.py there (a picotron checkout?)")
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="bench_peer_"))
    data = gpt2_data(Path(a.data))
    out = alternate(names, picotron, data, a, work)
    info["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    recorded, date = (None, None) if picotron else recorded_peer()
    rows = summarize(names, out, recorded)
    report(rows, a, info, picotron is not None, date, matched_flops())


if __name__ == "__main__":
    main()
