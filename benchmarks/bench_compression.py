"""Gradient compression on the data-parallel axes: bytes, step time and convergence of each
[parallel] option against float32, with gpt3d's real Trainer in real torchrun launches.

    python benchmarks/bench_compression.py                  # ~25 min on the 2-core box
    python benchmarks/bench_compression.py --only speed     # rerun one part (or: report)

1. Bytes and step time, dp2 FSDP / dp2 DDP (2 processes) and HSDP 2x2 (4 processes), a
   communication-bound model (wide, few tokens per rank; gloo over loopback). Every option
   of a layout is built in one launch and stepped round-robin, so load drift hits all
   alike. Bytes are counted, not estimated, on counting steps run before the timed ones:
   - payload: bytes of the tensors each rank hands to every collective (torch.distributed
     functions wrapped), attributed to the mesh axis of the collective's process group;
   - socket: bytes the process wrote to its sockets during each collective
     (/proc/self/io wchar; gloo's own algorithm included), per axis.
2. Convergence: dp2 DDP on the bundled Shakespeare corpus (recipes/prepare.py), a small
   GPT, a few hundred steps per option: final train (mean of the last 20 steps) and val
   loss against float32, and a loss-curve plot.

Writes results/bench_compression.{json,md,png} and bench_compression_curves.json. The
worker side (counting, timing, training) is benchmarks/compression_worker.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import (
    REPO,
    RESULTS,
    TORCHRUN,
    arg_parser,
    columns,
    machine,
    median,
    save_figure,
    subplots,
    synthetic_data,
    table,
    write_results,
)

RECIPE_DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "shakespeare"

DDP = "--parallel.dp_mode=ddp"
HSDP = ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]
BF16, FP16 = "--parallel.grad_reduce_dtype=bfloat16", "--parallel.grad_reduce_dtype=float16"


def powersgd(rank: int, start: int = 0) -> list[str]:
    return [
        "--parallel.grad_compression=powersgd",
        f"--parallel.powersgd_rank={rank}",
        f"--parallel.powersgd_start_step={start}",
    ]


# option name -> overrides; "float32 via GradSync" is gpt3d's own uncompressed all-reduce
# (PowerSGD never starting): the mechanism's cost without compression, an honest peer.
COMMON = {"float32": [], "bfloat16": [BF16], "float16": [FP16]}
SPEED_LAYOUTS = {
    "dp2 FSDP": (2, ["--parallel.dp_mode=fsdp"], COMMON),
    "dp2 DDP": (
        2,
        [DDP],
        {
            **COMMON,
            "float32 via GradSync": powersgd(4, 10**9),
            "powersgd r4": powersgd(4),
            "powersgd r1": powersgd(1),
        },
    ),
    "HSDP 2x2": (
        4,
        HSDP,
        {
            **COMMON,
            "bfloat16 on dp_replicate": ["--parallel.grad_reduce_dtype_replicate=bfloat16"],
            "float16 on dp_replicate": ["--parallel.grad_reduce_dtype_replicate=float16"],
            "powersgd r4 on dp_replicate": powersgd(4),
        },
    ),
}
CONVERGENCE = {
    "float32": [],
    "bfloat16": [BF16],
    "float16": [FP16],
    "powersgd r4": powersgd(4, 10),
    "powersgd r1": powersgd(1, 10),
}


# ---------------------------------------------------------------- driver side


def launch_self(world: int, cases: dict, work: Path) -> dict:
    """One torchrun launch of benchmarks/compression_worker.py over `cases`."""
    work.mkdir(parents=True, exist_ok=True)
    spec = work / f"cases_{world}_{len(cases)}.json"
    spec.write_text(json.dumps(cases))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    worker = str(Path(__file__).with_name("compression_worker.py"))
    cmd = [*TORCHRUN, "--standalone", f"--nproc_per_node={world}", worker, str(spec)]
    cmd.append(str(work / "out"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
    print(
        f"  launch of {world} processes, {list(cases)}: {time.perf_counter() - t0:.0f}s", flush=True
    )
    if proc.returncode != 0:
        raise RuntimeError(f"launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return {
        name: [json.loads(f.read_text()) for f in sorted((work / "out" / name).glob("rank*.json"))]
        for name in cases
    }


def speed_rows(name: str, world: int, options: dict, ranks: list[dict]) -> list[dict]:
    rows, base = [], None
    for option in options:
        per_rank = [r["options"][option] for r in ranks]
        steps = [max(ts) for ts in zip(*(r["step_s"] for r in per_rank), strict=True)]
        row = {"layout": name, "world": world, "option": option}
        row["step_ms"] = 1e3 * median(steps)
        row["step_ms_min"] = 1e3 * min(steps)
        for axis in ("dp_shard", "dp_replicate"):
            for key in ("reduce_payload", "reduce_socket", "reduce_seconds", "reduce_calls"):
                values = [r["bytes"].get(axis, {}).get(key, 0) for r in per_rank]
                row[f"{axis}_{key}"] = max(values)
        row["reduce_socket_MB"] = (
            row["dp_shard_reduce_socket"] + row["dp_replicate_reduce_socket"]
        ) / 1e6
        row["reduce_payload_MB"] = (
            row["dp_shard_reduce_payload"] + row["dp_replicate_reduce_payload"]
        ) / 1e6
        row["shard_MB"] = row["dp_shard_reduce_socket"] / 1e6
        row["replicate_MB"] = row["dp_replicate_reduce_socket"] / 1e6
        row["comm_ms"] = 1e3 * (row["dp_shard_reduce_seconds"] + row["dp_replicate_reduce_seconds"])
        base = base or row
        row["bytes_rel"] = row["reduce_socket_MB"] / base["reduce_socket_MB"]
        row["comm_rel"] = row["comm_ms"] / base["comm_ms"]
        row["time_rel"] = row["step_ms_min"] / base["step_ms_min"]
        row["time_rel_median"] = row["step_ms"] / base["step_ms"]
        rows.append(row)
    return rows


def convergence_rows(results: dict) -> list[dict]:
    rows, base = [], None
    for option, ranks in results.items():
        r = ranks[0]
        final_val = r["val"][max(r["val"], key=int)]
        row = {
            "option": option,
            "train_loss": sum(r["losses"][-20:]) / len(r["losses"][-20:]),
            "val_loss": final_val,
            "seconds": r["seconds"],
        }
        base = base or row
        row["train_rel_pct"] = 100 * (row["train_loss"] / base["train_loss"] - 1)
        row["val_rel_pct"] = 100 * (row["val_loss"] / base["val_loss"] - 1)
        rows.append(row)
    return rows


def plot(speed: list[dict], curves: dict, path: Path) -> None:
    made = subplots(1, 3, figsize=(17, 4.8))
    if made is None:
        return
    fig, (a1, a2, a3) = made
    for option, ranks in curves.items():
        r, k = ranks[0], 10  # train loss: running mean over 10 steps
        losses = r["losses"]
        smooth = [
            sum(losses[max(0, i - k + 1) : i + 1]) / min(i + 1, k) for i in range(len(losses))
        ]
        steps = sorted(int(s) for s in r["val"])
        for ax, first in ((a1, 1), (a2, len(losses) // 3)):
            xs = range(first, len(losses) + 1)
            (line,) = ax.plot(xs, smooth[first - 1 :], lw=1.2, label=f"{option}")
            val = [(s, r["val"][str(s)]) for s in steps if s >= first]
            ax.plot(*zip(*val, strict=True), "o--", color=line.get_color(), ms=4, lw=0.8)
    a1.set_title("convergence, dp2 DDP, Shakespeare")
    a2.set_title("the same, zoomed (last two thirds)")
    for ax in (a1, a2):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss: train (mean of 10), val (dots)")
    a1.legend(fontsize=8)
    labels = [f"{r['layout']}: {r['option']}" for r in speed]
    shard = [r["shard_MB"] for r in speed]
    a3.barh(labels, shard, color="tab:blue", label="dp_shard")
    a3.barh(
        labels,
        [r["replicate_MB"] for r in speed],
        left=shard,
        color="tab:orange",
        label="dp_replicate",
    )
    a3.invert_yaxis()
    a3.set_xlabel("gradient bytes written to sockets per rank per step (MB)")
    a3.tick_params(axis="y", labelsize=7)
    a3.legend(fontsize=7)
    fig.suptitle("bench_compression (2-core CPU, gloo over loopback)")
    save_figure(fig, path)


SPEED_COLUMNS = (
    "layout:layout:s; option:option:s; shard_MB:dp_shard MB/step:.2f; "
    "replicate_MB:dp_replicate MB/step:.2f; reduce_payload_MB:payload MB/step:.2f; "
    "bytes_rel:bytes vs fp32:.3f; comm_ms:in collectives ms:.1f; comm_rel:vs fp32:.2f; "
    "step_ms_min:step ms (best):.1f; time_rel:vs fp32:.2f; step_ms:step ms (median):.1f; "
    "time_rel_median:vs fp32:.2f"
)
CONVERGENCE_COLUMNS = (
    "option:option:s; train_loss:train loss (last 20):.4f; train_rel_pct:vs fp32 %:+.2f; "
    "val_loss:val loss:.4f; val_rel_pct:vs fp32 %:+.2f"
)


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--steps", type=int, default=20, help="timed steps per option")
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--conv-steps", type=int, default=300)
    p.add_argument(
        "--only",
        choices=("speed", "convergence", "report"),
        help="run one part (or none: report); the rest comes from the last results",
    )
    a = p.parse_args()
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="gpt3d_bench_compression_"))
    previous = _previous("bench_compression.json", {})
    if a.only in ("convergence", "report"):
        speed = [r for r in previous.get("rows", []) if "layout" in r]
        speed_info = previous.get("config", {}).get("speed_measured") or previous.get("machine")
    else:
        speed, speed_info = run_speed(a, work), info
    print(table(speed, columns(SPEED_COLUMNS)))
    if a.only in ("speed", "report"):
        record = _previous("bench_compression_curves.json")
    else:
        record = {"machine": info, "model": CONVERGENCE_MODEL, "curves": run_convergence(a, work)}
        (RESULTS / "bench_compression_curves.json").write_text(json.dumps(record) + "\n")
    curves = record["curves"]
    conv = convergence_rows(curves)
    print(table(conv, columns(CONVERGENCE_COLUMNS)))
    config = {
        "speed_model": speed_model(a, "<synthetic tokens, vocab 512>"),
        "speed_layouts": {
            k: {"world": w, "layout": lay, "options": o} for k, (w, lay, o) in SPEED_LAYOUTS.items()
        },
        "timed_steps": a.steps,
        "convergence_model": CONVERGENCE_MODEL,
        "convergence_options": CONVERGENCE,
        "speed_measured": speed_info,
        "convergence_measured": record["machine"],
    }
    md = "## Bytes and step time\n\n" + (
        table(speed, columns(SPEED_COLUMNS)) if speed else "(not run)"
    )
    md += "\n\n## Convergence (dp2 DDP, Shakespeare)\n\n"
    md += table(conv, columns(CONVERGENCE_COLUMNS))
    when = [
        f"{part} measured {m['date']} (load average {m['load_avg_1m_at_start']} at start, "
        f"commit {m['git_commit']})"
        for part, m in (("bytes and step time", speed_info), ("convergence", record["machine"]))
        if m
    ]
    notes = [*NOTES, "; ".join(when) + "; curves in bench_compression_curves.json."]
    title = "Gradient compression on the data-parallel axes"
    write_results("bench_compression", title, info, config, speed + conv, md, notes)
    plot(speed, curves, RESULTS / "bench_compression.png")


def speed_model(a, data) -> list[str]:
    return [
        f"--data.dataset={data}",
        "--model.preset=tiny",
        f"--model.n_layer={a.n_layer}",
        "--model.n_head=8",
        f"--model.n_embd={a.n_embd}",
        "--model.block_size=16",
        "--model.vocab_size=512",
        "--training.seq_len=16",
        "--training.global_batch_size=4",
        "--training.steps=1000000",
        "--training.warmup_steps=0",
        "--training.lr=1e-4",
        "--training.eval_interval=0",
    ]


CONVERGENCE_MODEL = [
    "--config",
    "recipes/configs/shakespeare.toml",
    f"--data.dataset={RECIPE_DATA}",
    "--model.preset=tiny",
    "--model.n_layer=2",
    "--model.n_head=2",
    "--model.n_embd=64",
    "--model.pad_vocab_multiple=64",
    "--training.seq_len=64",
    "--training.global_batch_size=16",
    "--training.warmup_steps=20",
    "--training.lr=1e-3",
    "--training.min_lr=1e-4",
    "--training.eval_steps=8",
    "--training.eval_interval=0",
    DDP,
]


def run_speed(a, work: Path) -> list[dict]:
    base = speed_model(a, synthetic_data(work, 512))
    rows = []
    for name, (world, layout, options) in SPEED_LAYOUTS.items():
        key = name.replace(" ", "_")
        spec = {"kind": "speed", "args": [*base, *layout], "options": options}
        spec.update(warmup=2, count_steps=5, steps=a.steps)
        rows += speed_rows(name, world, options, launch_self(world, {key: spec}, work)[key])
    return rows


def run_convergence(a, work: Path) -> dict:
    if not (RECIPE_DATA / "train.bin").exists():
        raise SystemExit(f"{RECIPE_DATA} is not prepared: python recipes/prepare.py")
    args = [*CONVERGENCE_MODEL, f"--training.steps={a.conv_steps}"]
    cases = {
        name.replace(" ", "_"): {"kind": "converge", "args": [*args, *extra], "eval_every": 50}
        for name, extra in CONVERGENCE.items()
    }
    out = launch_self(2, cases, work)
    return {name: out[name.replace(" ", "_")] for name in CONVERGENCE}


def _previous(name: str, default: dict | None = None) -> dict:
    path = RESULTS / name
    if path.exists():
        return json.loads(path.read_text())
    if default is not None:
        return default
    raise SystemExit(f"--only needs the other part's results: {path} is missing")


NOTES = [
    "bytes: counted on 5 steps per option before the timed ones; 'MB/step' columns are the bytes "
    "each rank's process wrote to its sockets during the gradient reduce-scatters / all-reduces "
    "of that axis (/proc/self/io wchar, max over ranks); 'payload' is the size of the tensors "
    "handed to those collectives. Parameter all-gathers are not gradient traffic and are left out.",
    "in collectives: seconds spent inside those gradient collectives in a step (the least "
    "disturbed of the 5 counting steps). "
    "PowerSGD's matmuls and QR, casts and bucket copies are outside: they show in the step time.",
    "step time: the slowest rank's time per step, options stepped round-robin in one launch "
    "(best and median of the timed steps); 'vs fp32' against the float32 row of the same layout. "
    "The box is shared (see load average): other jobs only add time, so the best step is the "
    "steadier measure.",
]


if __name__ == "__main__":
    main()
