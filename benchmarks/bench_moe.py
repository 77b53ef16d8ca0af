"""Mixture-of-Experts: throughput, memory and all-to-all share against the dense model with
the same active parameters, for ep 1/2/4; and the expert load balance of a Shakespeare run
with and without the balancing-bias updates.

    python benchmarks/bench_moe.py                        # both parts (~20 min on the 2-core box)
    python benchmarks/bench_moe.py --part throughput      # ~3 min
    python benchmarks/bench_moe.py --part balance --balance-steps 120

Throughput: a 4-layer, 256-wide GPT (vocab 512, synthetic tokens) dense and as MoE (8 experts
top-2 in every block, each expert 4C/2 wide: a token's MLP FLOPs and active parameters are
the dense model's, plus an 8 x C router), through gpt3d's Trainer in real launches: every
case of a world size is built in one launch and the cases take steps in turns, so the load
of other jobs hits dense and MoE alike; "x dense" is the median of per-round ratios. Per
case: best step (a step ends when its slowest rank does), memory per rank (parameters +
gradients + AdamW state + peak saved activations, counted from tensors), and the share of
the step inside the expert all-to-alls ("ep.all_to_all" profiler ranges: the count and row
exchanges of dispatch and combine and their backward, waiting for the slowest peer
included), from two profiled steps.

Balance: torchrun recipes/train.py --config recipes/configs/moe_ep2.toml (moe-mini, ep=2,
Shakespeare) once per moe_bias_rate (0, 1e-3, 1e-2), aux loss off; max/mean tokens per
expert (worst layer, and the mean over layers) every step, and the loss curves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ (common, worker)

from common import (  # noqa: E402
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
from common import (
    model_args as common_model_args,
)

MOE = ["--model.n_experts=8", "--model.moe_top_k=2"]
# name -> (processes, MoE?, layout overrides)
CASES = {
    "dense, 1 process": (1, False, []),  # the first case of each world size is its dense peer
    "MoE, 1 process": (1, True, []),
    "dense, FSDP 2": (2, False, []),
    "MoE, FSDP 2, ep 1": (2, True, []),
    "MoE, FSDP 2, ep 2": (2, True, ["--parallel.ep=2"]),
    "dense, FSDP 4": (4, False, []),
    "MoE, FSDP 4, ep 2": (4, True, ["--parallel.ep=2"]),
    "MoE, FSDP 4, ep 4": (4, True, ["--parallel.ep=4"]),
}


# ---------------------------------------------------------------- worker (inside torchrun)


def run_group(spec: dict, out: Path) -> None:
    """Every case of one world size built side by side, then stepped in turns (rotated each
    round), so load from other jobs hits dense and MoE alike; then per case two profiled
    steps (all-to-all share) and one step under the saved-activation meter (memory)."""
    import torch
    import torch.distributed as dist
    from worker import local, memory_record

    from gpt3d.config import load_config
    from gpt3d.trainer import Trainer

    trainers = {n: Trainer.from_config(load_config(a)) for n, a in spec["cases"].items()}

    def step(trainer) -> float:
        if dist.is_initialized():
            dist.barrier()  # start each timed step together
        t0 = time.perf_counter()
        trainer.train_step()
        return time.perf_counter() - t0

    names = list(trainers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(spec["warmup"] + spec["rounds"]):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            dt = step(trainers[name])
            if r >= spec["warmup"]:
                times[name].append(dt)
    for name, trainer in trainers.items():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled = [step(trainer) for _ in range(2)]
        a2a_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key == "ep.all_to_all")
        record = {
            "rank": trainer.env.rank,
            "tokens_per_step": trainer.tokens_per_step(),
            "step_s": times[name],
            "a2a_share": a2a_us / 1e6 / sum(profiled),
            "n_params": sum(local(p).numel() for p in trainer.params),  # this rank's shards
            "loss": trainer.train_step().loss,
            **memory_record(trainer),
        }
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / f"rank{trainer.env.rank}.json").write_text(json.dumps(record))


def worker_main(argv: list[str]) -> None:
    from gpt3d.launch import guarded_main

    def main(args: list[str]) -> int:
        run_group(json.loads(Path(args[0]).read_text()), Path(args[1]))
        return 0

    guarded_main(main, argv)


# ---------------------------------------------------------------- part 1: throughput


def launch(nproc: int, spec: dict, out: Path) -> dict:
    """This script in worker mode on nproc processes; {case: [per-rank records]}."""
    path = out / f"cases_{nproc}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec))
    me = [str(Path(__file__).resolve()), "--worker"]
    torchrun = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *me] if nproc == 1 else [*torchrun, *me]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, str(path), str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600
    )
    took = time.perf_counter() - t0
    print(f"  {nproc} process(es), {len(spec['cases'])} case(s): {took:.0f}s", flush=True)
    if proc.returncode:
        raise RuntimeError(f"launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return {
        name: [json.loads(f.read_text()) for f in sorted((out / name).glob("rank*.json"))]
        for name in spec["cases"]
    }


def model_args(data: Path, a) -> list[str]:
    return common_model_args(data, a, preset="tiny")


def slowest(ranks: list[dict]) -> list[float]:
    """Per timed step, the slowest rank's time (the step ends when it does)."""
    return [max(ts) for ts in zip(*(r["step_s"] for r in ranks), strict=True)]


def summarize(name: str, ranks: list[dict], dense: list[dict]) -> dict:
    steps, dense_steps = slowest(ranks), slowest(dense)
    mem = [
        r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] + r["activation_peak_bytes"]
        for r in ranks
    ]
    dense_mem = max(
        r["param_bytes"] + r["grad_bytes"] + r["optim_bytes"] + r["activation_peak_bytes"]
        for r in dense
    )
    ratios = [d / t for d, t in zip(dense_steps, steps, strict=True)]  # same round
    w, moe, lay = CASES[name]
    return {
        "case": name,
        "procs": w,
        "ep": int(lay[0].split("=")[1]) if lay else 1,
        "step_ms": 1e3 * min(steps),
        "tokens_per_s": ranks[0]["tokens_per_step"] / min(steps),
        "vs_dense": median(ratios),
        "a2a_pct": 100 * sum(r["a2a_share"] for r in ranks) / len(ranks),
        "mem_max_MiB": max(mem) / 2**20,
        "mem_vs_dense": max(mem) / dense_mem,
        "params_per_rank_M": max(r["n_params"] for r in ranks) / 1e6,
        "loss": ranks[0]["loss"],
    }


def throughput(a, out: Path) -> list[dict]:
    data = synthetic_data(out, a.vocab)
    base = model_args(data, a)
    rows = []
    for nproc in (1, 2, 4):
        names = [n for n, (w, _, _) in CASES.items() if w == nproc]
        cases = {n: [*base, *(MOE if CASES[n][1] else []), *CASES[n][2]] for n in names}
        spec = {"cases": cases, "warmup": a.warmup, "rounds": a.rounds}
        results = launch(nproc, spec, out)
        dense = results[next(n for n in names if not CASES[n][1])]
        rows += [summarize(n, results[n], dense) for n in names]
    return rows


def throughput_report(a, rows: list[dict], info: dict) -> None:
    from gpt3d.model import count_params_formula, preset_config

    shape = dict(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, vocab_size=a.vocab)
    shape |= dict(block_size=a.seq, pad_vocab_multiple=64)
    moe = preset_config("tiny", **shape, n_experts=8, moe_top_k=2)
    dense = preset_config("tiny", **shape)
    cols = columns(
        "case:case:s; procs:procs:d; tokens_per_s:tokens/s:,.0f; vs_dense:× dense:.2f; "
        "step_ms:step ms:.0f; a2a_pct:all-to-all % of step:.1f; mem_max_MiB:mem/rank MiB:.1f; "
        "mem_vs_dense:mem × dense:.2f; params_per_rank_M:params/rank M:.2f; loss:loss:.4f"
    )
    notes = [
        f"model {a.n_layer}L/{a.n_head}h/{a.n_embd}d, vocab {a.vocab} (synthetic), seq {a.seq}, "
        f"global batch {a.batch} sequences; fp32, eager",
        f"dense: {count_params_formula(dense) / 1e6:.2f} M parameters; MoE (8 experts top-2, "
        f"expert width {moe.expert_hidden}): {count_params_formula(moe) / 1e6:.2f} M in all, "
        f"{count_params_formula(moe, active=True) / 1e6:.2f} M active per token (dense "
        "MLP FLOPs per token + an 8-way router, no MLP biases)",
        "× dense: tokens/s against the dense model on the same number of processes, the "
        f"median over {a.rounds} rounds of per-round ratios (all cases of a world size are "
        "built in one launch and stepped in turns, so other jobs' load hits both alike)",
        f"step ms: best of {a.rounds} timed steps, the slowest rank's; tokens/s from it",
        "all-to-all %: time inside the expert dispatch/combine all-to-alls (forward and "
        "backward, incl. the count exchange and waiting for the slowest peer) over the step "
        "time, two profiled steps, mean over ranks; 0 without expert parallelism",
        "mem/rank: parameters + gradients + AdamW state + peak saved activations counted "
        "from the tensors each rank holds (benchmarks/worker.py), the largest rank",
        "one thread per process: 2 processes fill the 2 cores, 4 share them (oversubscribed: "
        "overheads, not scaling); other jobs shared the machine (load average above)",
    ]
    write_results(
        "bench_moe",
        "bench_moe: MoE vs dense with the same active parameters",
        info,
        {k: v for k, v in vars(a).items() if k != "out"},
        rows,
        table(rows, cols),
        notes,
        Path(a.out),
    )


# ---------------------------------------------------------------- part 2: load balance


def balance(a, out: Path) -> dict[str, list[dict]]:
    rates = a.balance_rates.split(",")
    runs = {(f"bias rate {r}" if float(r) else "no bias updates"): r for r in rates}
    records = {}
    for name, rate in runs.items():
        run_dir = out / f"balance_{rate}"
        args = [
            "--config",
            "recipes/configs/moe_ep2.toml",
            f"--job.output_dir={run_dir}",
            f"--model.moe_bias_rate={rate}",
            "--model.moe_aux_coef=0",
            f"--training.steps={a.balance_steps}",
            "--training.log_interval=1",
            "--checkpoint.interval=0",
            "--checkpoint.save_final=false",
            "--metrics.plot=false",
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "recipes/train.py", *args]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
        print(f"  balance run '{name}': {time.perf_counter() - t0:.0f}s", flush=True)
        if proc.returncode:
            raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        records[name] = [json.loads(line) for line in lines if line.strip()]
    return records


def balance_report(a, records: dict[str, list[dict]], info: dict) -> None:
    rows = []
    for name, recs in records.items():
        train = [r for r in recs if "moe_load_max" in r]
        val = [r for r in recs if "val_loss" in r]
        last = train[-40:]
        rows.append(
            {
                "run": name,
                "load_max_first10": sum(r["moe_load_max"] for r in train[:10]) / len(train[:10]),
                "load_max_last40": sum(r["moe_load_max"] for r in last) / len(last),
                "load_mean_last40": sum(r["moe_load_mean"] for r in last) / len(last),
                "bias_spread_end": train[-1]["moe_bias_spread"],
                "loss_end": train[-1]["loss"],
                "val_loss_end": val[-1]["val_loss"] if val else None,
                "tokens_per_s": sum(r["tokens_per_sec"] for r in last) / len(last),
            }
        )
    cols = columns(
        "run:run:s; load_max_first10:worst-layer load, steps 1-10:.2f; "
        "load_max_last40:worst-layer load, last 40:.2f; "
        "load_mean_last40:mean-layer load, last 40:.2f; "
        "bias_spread_end:bias spread at end:.3f; loss_end:final train loss:.4f; "
        "val_loss_end:final val loss:.4f; tokens_per_s:tokens/s:,.0f"
    )
    notes = [
        f"torchrun --nproc_per_node=2 recipes/train.py --config recipes/configs/moe_ep2.toml "
        f"(moe-mini: 4 layers x 128, 8 experts top-2 in every block; ep=2) for "
        f"{a.balance_steps} steps on the bundled Shakespeare, aux loss off, moe_bias_rate "
        f"{a.balance_rates.replace(',', ' / ')} (1e-3 is the default, DeepSeek-V3's)",
        "load = max over experts / mean over experts of the tokens a layer routed in a step, "
        "summed over both ranks (1.00 = perfect balance, 8/2 = 4.00 = every token in the same "
        "two experts); worst layer and mean over the 4 layers",
        "bias spread: max over layers of max(bias) - min(bias); the bias only changes which "
        "experts are chosen, never the combine weights",
        "tokens/s: mean of the last 40 steps; the runs ran one after the other while other "
        "jobs loaded the machine by different amounts, so it is no comparison between them",
        "plot: bench_moe_balance.png (load per step on the left, train loss on the right)",
    ]
    write_results(
        "bench_moe_balance",
        "bench_moe: expert load balance with and without bias updates",
        info,
        {"steps": a.balance_steps, "rates": a.balance_rates},
        rows,
        table(rows, cols),
        notes,
        Path(a.out),
    )
    plot_balance(records, Path(a.out) / "bench_moe_balance.png")


def plot_balance(records: dict[str, list[dict]], path: Path) -> None:
    made = subplots(1, 2, figsize=(11, 4))
    if made is None:
        return
    fig, (a1, a2) = made
    colors = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")
    for (name, recs), color in zip(records.items(), colors, strict=False):
        train = [r for r in recs if "moe_load_max" in r]
        steps = [r["step"] for r in train]
        a1.plot(
            steps,
            [r["moe_load_max"] for r in train],
            color=color,
            lw=0.8,
            label=f"{name}: worst layer",
        )
        a1.plot(
            steps,
            [r["moe_load_mean"] for r in train],
            color=color,
            ls="--",
            lw=0.8,
            label=f"{name}: mean layer",
        )
        a2.plot(steps, [r["loss"] for r in train], color=color, lw=0.8, label=name)
    a1.axhline(1.0, color="k", lw=0.6)
    a1.set_xlabel("step")
    a1.set_ylabel("max / mean tokens per expert")
    a1.legend(fontsize=7)
    a2.set_xlabel("step")
    a2.set_ylabel("train loss")
    a2.legend(fontsize=8)
    fig.suptitle("moe-mini on Shakespeare, ep=2: expert load with and without bias updates")
    save_figure(fig, path)


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--part", choices=("all", "throughput", "balance"), default="all")
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=8, help="timed steps per case, in turns")
    p.add_argument("--balance-steps", type=int, default=120)
    p.add_argument(
        "--balance-rates", default="0,0.001,0.01", help="moe_bias_rate of each balance run"
    )
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    info = machine()
    scratch = Path(tempfile.mkdtemp(prefix="gpt3d_bench_moe_"))
    if a.part in ("all", "throughput"):
        throughput_report(a, throughput(a, scratch), info)
    if a.part in ("all", "balance"):
        balance_report(a, balance(a, scratch), info)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        worker_main(sys.argv[2:])
    main()
