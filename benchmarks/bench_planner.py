"""The layout planner's predictions (gpt3d/planner) against measured runs on this machine.

    python benchmarks/bench_planner.py                 # ~25 min on the 2-core box
    python benchmarks/bench_planner.py --part memory   # or --part time

Memory: every layout of bench_memory (8 layers x 256, seq 128, batch 8, fp32) for both
vocabularies (512 and GPT-2's 50257). Each rank of a real torchrun run of gpt3d's Trainer is
measured with gpt3d.planner.fake.measure_real (live tensor storages and the saved-tensor
peak over one steady step); predicted by the analytic model and by the fake-tensor estimate
of every pipeline rank. Target: model state and activations of every pipeline rank within
10 %.

Time: `recipes/plan.py --calibrate` measures this machine (matmul peak, a GPT step with every
process busy, gloo collectives, the same with more processes than cores), then every layout
of bench_layouts (4 layers x 256, vocab 512, seq 128, batch 8, fp32) is predicted by the cost
model and measured (best step of `--passes` x `--steps`, slowest rank). Target: Spearman rank
correlation >= 0.8 and every prediction within 25 %. All measured in this one run.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from bench_memory import MEMORY_LAYOUTS
from common import (
    LAYOUTS,
    REPO,
    arg_parser,
    columns,
    machine,
    model_args,
    save_figure,
    subplots,
    synthetic_data,
    table,
    write_results,
)

MiB = 2**20
MEMORY_MODEL = dict(n_layer=8, n_head=4, n_embd=256, seq=128, batch=8)
TIME_MODEL = dict(n_layer=4, n_head=4, n_embd=256, vocab=512, seq=128, batch=8)


def shape(vocab: int | None = None, **model):
    from argparse import Namespace

    return Namespace(**{**model, **({"vocab": vocab} if vocab else {})})


def run_of(args: list[str], world: int):
    from gpt3d.config import load_config
    from gpt3d.preflight import preflight

    return preflight(load_config(args), world)


# ------------------------------------------------------------------------------ memory


def measure_memory(work: Path, vocab: int) -> dict:
    """{layout: [per-rank measured breakdown dicts]} of real runs (one launch per world)."""
    from tests.helpers import launch_per_world

    base = model_args(synthetic_data(work, vocab), shape(vocab, **MEMORY_MODEL))
    base += ["--checkpoint.save_final=false", "--metrics.plot=false"]
    launches: dict[int, dict] = {}
    for name, (world, layout) in MEMORY_LAYOUTS.items():
        launches.setdefault(world, {})[key(name)] = {"args": [*base, *layout], "name": name}
    root = work / f"memory{vocab}"
    root.mkdir(parents=True, exist_ok=True)
    procs = launch_per_world("tests/unit/test_planner_fake.py", launches, root, timeout=1800)
    for world, p in procs.items():
        if p.returncode:
            raise RuntimeError(f"{world}-process memory launch failed:\n{p.stderr[-4000:]}")
    measured = {}
    for world, cases in launches.items():
        for k, spec in cases.items():
            ranks = [json.loads((root / "out" / k / f"rank{r}.json").read_text())
                     for r in range(world)]  # fmt: skip
            measured[spec["name"]] = {"args": spec["args"], "world": world, "ranks": ranks}
    return measured


def key(name: str) -> str:
    return name.replace(" ", "_").replace("×", "x").replace("+", "_")


def memory_rows(measured: dict, vocab: int) -> list[dict]:
    from gpt3d.planner.check import workload_and_layout
    from gpt3d.planner.fake import estimate
    from gpt3d.planner.memory import memory_by_rank

    rows = []
    for name, m in measured.items():
        run = run_of(m["args"], m["world"])
        w, lay = workload_and_layout(run, "cpu")
        analytic, fake = memory_by_rank(w, lay), estimate(run)
        per_stage = m["world"] // lay.pp
        for p in range(lay.pp):
            real = m["ranks"][p * per_stage]
            rows.append(memory_row(name, vocab, p, real, analytic[p], fake[p]))
        print(f"  {name} vocab {vocab}: {len(fake)} pipeline rank(s) estimated", flush=True)
    return rows


def memory_row(name, vocab, pp_rank, real: dict, analytic, fake) -> dict:
    state = real["params"] + real["grads"] + real["optimizer"]
    row = {"layout": name, "vocab": vocab, "pp_rank": pp_rank,
           "state_MiB": state / MiB, "act_MiB": real["activations"] / MiB,
           "peak_MiB": real["detail"]["peak"] / MiB}  # fmt: skip
    for tag, mb in (("analytic", analytic), ("fake", fake)):
        row[f"{tag}_state_MiB"] = mb.model_state / MiB
        row[f"{tag}_act_MiB"] = mb.activations / MiB
        row[f"{tag}_total_MiB"] = mb.total / MiB
        row[f"{tag}_state_err"] = mb.model_state / state - 1
        row[f"{tag}_act_err"] = mb.activations / real["activations"] - 1
    row["fake_peak_err"] = fake.detail["peak"] / real["detail"]["peak"] - 1
    return row


# ------------------------------------------------------------------------------ time


def measure_time(work: Path, rounds: int, steps: int) -> tuple[dict, list[str]]:
    """{layout: [(node compute rate, step seconds) per timed step over all rounds]}: every
    layout once per round, rounds minutes apart (benchmarks/planner_time.py)."""
    from tests.helpers import launch_per_world

    base = model_args(synthetic_data(work, TIME_MODEL["vocab"]), shape(**TIME_MODEL))
    pairs: dict[str, list] = {}
    for i in range(rounds):
        launches: dict[int, dict] = {}
        for name, (world, layout) in LAYOUTS.items():
            spec = {"args": [*base, *layout], "warmup": 2, "steps": steps, "name": name}
            launches.setdefault(world, {})[key(name)] = spec
        root = work / f"time{i}"
        root.mkdir(parents=True)
        procs = launch_per_world("benchmarks/planner_time.py", launches, root, timeout=1800)
        for world, p in procs.items():
            if p.returncode:
                raise RuntimeError(f"{world}-process time launch failed:\n{p.stderr[-4000:]}")
        for cases in launches.values():
            for k, spec in cases.items():
                got = json.loads((root / "out" / k / "pairs.json").read_text())
                pairs.setdefault(spec["name"], []).extend(got)
        print(f"  time round {i + 1}/{rounds} done", flush=True)
    return pairs, base


def load_factor(profile, rate: float, world: int) -> float:
    """The node's compute rate when a step ran over the calibration's for that many busy
    processes (one process alone, or every core busy)."""
    cores = profile.cores or 1
    alone = world < cores and profile.efficiency_alone
    per_process = profile.efficiency_alone if alone else profile.compute_efficiency
    return capped(
        profile, rate / (min(world, cores) * per_process * profile.peak_flops("float32")), world
    )


def capped(profile, factor: float, world: int) -> float:
    """More processes than cores: the ~0.1 s probes do not all overlap (the scheduler shares
    a core unevenly over so short a time), so their summed rate over-reads the node; it
    cannot deliver more than its calibrated rate."""
    return min(factor, 1.0) if world > (profile.cores or 1) else factor


def loaded(profile, factor: float):
    """The profile with every CPU-bound rate scaled by `factor` (other jobs on the shared
    cores slow compute, framework work and gloo's copies alike)."""
    from gpt3d.planner.hardware import Link

    def link(x):
        return x and Link(*(b * factor for b in (x.all_reduce, x.all_gather, x.reduce_scatter,
                                                 x.p2p)), x.latency_s / factor)  # fmt: skip

    return replace(
        profile,
        compute_efficiency=profile.compute_efficiency * factor,
        efficiency_alone=profile.efficiency_alone * factor,
        overhead_s={k: v / factor for k, v in profile.overhead_s.items()},
        intra=link(profile.intra),
        inter=link(profile.inter),
        crowded=link(profile.crowded),
        mem_gbps=profile.mem_gbps * factor,
    )


def time_rows(pairs: dict, base: list[str], profile) -> list[dict]:
    """Per layout its fastest step (the least disturbed), predicted at the machine speed
    probed right before that step."""
    rows = []
    for name, steps in pairs.items():
        rate, measured = min(steps, key=lambda p: p[1])
        factor = load_factor(profile, rate, LAYOUTS[name][0])
        rows.append(time_row(name, measured, factor, base, profile))
    return rows


def time_row(name: str, measured: float, factor: float, base: list[str], profile) -> dict:
    """One layout's measured step (seconds) against the cost model at that machine speed."""
    from gpt3d.planner.check import workload_and_layout
    from gpt3d.planner.cost import estimate_time
    from gpt3d.planner.hardware import Cluster

    world, layout = LAYOUTS[name]
    w, lay = workload_and_layout(run_of([*base, *layout], world), "cpu")
    t = estimate_time(w, lay, Cluster(world, world, loaded(profile, factor)))
    return {"layout": name, "world": world, "measured_ms": 1e3 * measured, "load": factor,
            "predicted_ms": 1e3 * t.step, "err": t.step / measured - 1,
            "compute_ms": 1e3 * t.compute, "comm_ms": 1e3 * (t.tp_comm + t.pp_comm +
            t.dp_comm), "bubble_ms": 1e3 * t.pp_bubble}  # fmt: skip


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r

    rx, ry = ranks(xs), ranks(ys)
    n, mx, my = len(xs), sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (sx * sy) if n > 1 and sx and sy else float("nan")


# ------------------------------------------------------------------------------ report


def plot(mem: list[dict], tim: list[dict], path: Path) -> None:
    made = subplots(1, 2, figsize=(11, 4.8))
    if made is None:
        return
    fig, (a1, a2) = made
    for tag, marker in (("analytic", "o"), ("fake", "x")):
        for kind, color in (("state", "tab:blue"), ("act", "tab:orange")):
            a1.scatter([r[f"{kind}_MiB"] for r in mem], [r[f"{tag}_{kind}_MiB"] for r in mem],
                       marker=marker, color=color, s=18, label=f"{kind} ({tag})")  # fmt: skip
    lo = min(r["act_MiB"] for r in mem) * 0.8
    hi = max(r["state_MiB"] for r in mem) * 1.2
    for f, style in ((1.0, "k-"), (1.1, "k:"), (0.9, "k:")):
        a1.plot([lo, hi], [lo * f, hi * f], style, lw=0.8)
    a1.set(xscale="log", yscale="log", xlabel="measured MiB per rank",
           ylabel="predicted MiB", title="memory (bench_memory layouts, ±10 %)")  # fmt: skip
    a1.legend(fontsize=7)
    for world, color in ((1, "k"), (2, "tab:green"), (4, "tab:red"), (8, "tab:purple")):
        pts = [r for r in tim if r["world"] == world]
        a2.scatter([r["measured_ms"] for r in pts], [r["predicted_ms"] for r in pts],
                   color=color, label=f"{world} process(es)")  # fmt: skip
    lo = min(min(r["measured_ms"], r["predicted_ms"]) for r in tim) * 0.8
    hi = max(max(r["measured_ms"], r["predicted_ms"]) for r in tim) * 1.2
    for f, style in ((1.0, "k-"), (1.25, "k:"), (0.75, "k:")):
        a2.plot([lo, hi], [lo * f, hi * f], style, lw=0.8)
    a2.set(xscale="log", yscale="log", xlabel="measured step, ms", ylabel="predicted step, ms",
           title="step time (bench_layouts layouts, ±25 %)")  # fmt: skip
    a2.legend(fontsize=7)
    save_figure(fig, path)


def main() -> None:
    p = arg_parser(__doc__)
    p.add_argument("--part", choices=("all", "memory", "time"), default="all")
    p.add_argument("--passes", type=int, default=3, help="rounds of every timed layout")
    p.add_argument("--steps", type=int, default=6, help="timed steps per launch")
    p.add_argument("--out", default=str(REPO / "benchmarks/results"))
    p.add_argument("--repredict", action="store_true",
                   help="predict the recorded results/bench_planner.json again with the current "
                   "cost model (same measurements, same calibrated profile)")  # fmt: skip
    a = p.parse_args()
    if a.repredict:
        return repredict(a)
    info, work = machine(), Path(tempfile.mkdtemp(prefix="bench_planner_"))
    record: dict = {"memory": [], "time": [], "profile": None}
    if a.part in ("all", "time"):
        from gpt3d.planner.calibrate import measure_cpu_profile

        profile = measure_cpu_profile(world=2)
        pairs, base = measure_time(work, a.passes, a.steps)
        record["time"], record["profile"] = time_rows(pairs, base, profile), asdict(profile)
        record["time_pairs"] = pairs
    if a.part in ("all", "memory"):
        for vocab in (512, 50257):
            record["memory"] += memory_rows(measure_memory(work, vocab), vocab)
    if a.part != "all":  # keep the other part of the recorded run
        kept = json.loads((Path(a.out) / "bench_planner.json").read_text())
        other = "time" if a.part == "memory" else "memory"
        record[other] = kept[other]
        if other == "time":
            record.update(profile=kept["profile"], time_pairs=kept.get("time_pairs"))
    report(record, info, a)


def repredict(a) -> None:
    """The recorded run's measured steps (and the machine speed at each), predicted again by
    today's cost model."""
    from gpt3d.planner.hardware import HardwareProfile

    data = json.loads((Path(a.out) / "bench_planner.json").read_text())
    work = Path(tempfile.mkdtemp(prefix="bench_planner_"))
    base = model_args(synthetic_data(work, TIME_MODEL["vocab"]), shape(**TIME_MODEL))
    profile = HardwareProfile.from_dict(data["profile"])
    time = [time_row(r["layout"], r["measured_ms"] / 1e3, capped(profile, r["load"], r["world"]),
                     base, profile) for r in data["time"]]  # fmt: skip
    record = {"memory": data["memory"], "profile": data["profile"], "time": time,
              "time_pairs": data.get("time_pairs")}  # fmt: skip
    info = {**data["machine"], "repredicted": machine()["date"]}
    a.passes, a.steps = data["config"]["args"]["passes"], data["config"]["args"]["steps"]
    report(record, info, a)


def report(record: dict, info: dict, a) -> None:
    mem, tim = record["memory"], record["time"]
    parts, notes = [], []
    if mem:
        cols = columns(
            "layout:layout:s; vocab:vocab:d; pp_rank:pp rank:d; state_MiB:state:.2f;"
            "analytic_state_err:analytic:+.1%; fake_state_err:fake:+.1%; act_MiB:activations:.2f;"
            "analytic_act_err:analytic:+.1%; fake_act_err:fake:+.1%; peak_MiB:live peak:.1f;"
            "fake_peak_err:fake:+.1%; analytic_total_MiB:analytic total:.1f"
        )
        parts += ["## Memory per rank, measured (MiB) and the predictions' error", "",
                  table(mem, cols), ""]  # fmt: skip
        errs = ("analytic_state_err", "fake_state_err", "analytic_act_err", "fake_act_err")
        worst = {k: max(abs(r[k]) for r in mem) for k in errs}
        notes.append(
            "memory: largest |error| over every layout, vocabulary and pipeline rank: state "
            f"{worst['analytic_state_err']:.1%} (analytic) / {worst['fake_state_err']:.1%} (fake), "
            f"activations {worst['analytic_act_err']:.1%} / {worst['fake_act_err']:.1%}; "
            "target 10 %"
        )
    if tim:
        cols = columns(
            "layout:layout:s; world:procs:d; measured_ms:measured ms:.0f;"
            "load:machine:.2f; predicted_ms:predicted ms:.0f; err:error:+.1%;"
            "compute_ms:compute:.0f; comm_ms:comm:.0f; bubble_ms:bubble:.0f"
        )
        rho = spearman([r["measured_ms"] for r in tim], [r["predicted_ms"] for r in tim])
        worst = max(tim, key=lambda r: abs(r["err"]))
        parts += ["## Step time, measured vs predicted (after --calibrate)", "", table(tim, cols)]
        notes.append(
            f"time: Spearman rank correlation {rho:.2f} (target >= 0.8); largest error "
            f"{worst['err']:+.1%} ({worst['layout']}); within 25 %: "
            f"{sum(abs(r['err']) <= 0.25 for r in tim)}/{len(tim)}"
        )
        record["spearman"] = rho
    config = {"args": {k: v for k, v in vars(a).items() if k != "out"},
              "memory_model": MEMORY_MODEL, "time_model": TIME_MODEL}  # fmt: skip
    write_results("bench_planner", "bench_planner: the planner's predictions vs measured runs",
                  info, config, mem + tim, "\n".join(parts), notes, Path(a.out))  # fmt: skip
    raw = Path(a.out) / "bench_planner.json"
    data = json.loads(raw.read_text())
    data.update(memory=mem, time=tim, profile=record["profile"], spearman=record.get("spearman"),
                time_pairs=record.get("time_pairs"))  # fmt: skip
    raw.write_text(json.dumps(data, indent=1) + "\n")
    if mem and tim:
        plot(mem, tim, Path(a.out) / "bench_planner.png")


if __name__ == "__main__":
    main()
