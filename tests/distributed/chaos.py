"""The chaos soak: random SIGKILLs of random ranks of an 8-process (dp2 x pp2 x tp2) run with
async checkpoints under torchrun --max-restarts, against the same run uninterrupted.

    plan = make_plan(seed, n_kills, ...)       # which rank dies when (seeded: reproducible)
    result = run_soak(root, data, plan, ...)   # two real launches (tests/distributed/
                                               # chaos_worker.py), then analyse()

What must hold (test_chaos.py asserts it; benchmarks/soak.py records it):
- the chaos run ends with exit 0 after exactly one restart per kill;
- every loss it logged, retried steps included, equals the uninterrupted run's bitwise;
- every sample is consumed exactly once by the steps that count, and a retried step draws
  exactly the samples it drew before;
- per kill, the next attempt resumes from the latest checkpoint that was complete when the
  rank died (or a newer one), so at most the steps since that checkpoint are recomputed.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tests.helpers import SMALL_MODEL, read_jsonl, run_script

WORKER = "tests/distributed/chaos_worker.py"
WORLD, G = 8, 8  # dp2 x pp2 x tp2; SMALL_MODEL's global batch (2 layers, 32 wide)
LAYOUT = [
    "--parallel.dp_shard=2",
    "--parallel.pp=2",
    "--parallel.tp=2",
    "--parallel.pp_microbatches=4",
]
KINDS = ("step", "save", "startup")
PHASES = ("rendezvous", "process_group", "load", "first_step")
# torch 2.13's shared rendezvous store keeps stale keys across restarts (pytorch#135712).
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def make_plan(seed: int, kinds: list[str], interval: int) -> list[dict]:
    """One kill per attempt, in the order of `kinds` (a start-up kill needs a restart, so
    never first). Each attempt can reach its kill from any checkpoint it resumes from as long
    as steps >= 2 * interval + 3 (tests/distributed/chaos_worker.py for the fields)."""
    assert kinds and kinds[0] != "startup", "attempt 0 has no restart to kill"
    rng = random.Random(seed)
    plan = []
    for attempt, kind in enumerate(kinds):
        if kind == "step":
            spec = {
                "nth": rng.randint(2, interval + 2),
                "fraction": round(rng.uniform(0.1, 0.9), 2),
            }
        elif kind == "save":
            spec = {"nth": rng.randint(1, 2), "fraction": round(rng.random(), 2)}
        else:
            spec = {"phase": rng.choice(PHASES), "delay": round(rng.uniform(0.0, 0.5), 2)}
        plan.append({"attempt": attempt, "rank": rng.randrange(WORLD), "when": kind, **spec})
    return plan


def random_kinds(seed: int, n: int) -> list[str]:
    """n kill kinds, every kind at least once when n >= 3, start-up never first."""
    rng = random.Random(seed + 1)
    kinds = list(KINDS) + [rng.choice(KINDS) for _ in range(n - len(KINDS))]
    rng.shuffle(kinds)
    kinds = kinds[:n]
    if kinds[0] == "startup":
        swap = next(i for i, k in enumerate(kinds) if k != "startup")
        kinds[0], kinds[swap] = kinds[swap], kinds[0]
    return kinds


def train_args(data: Path, out: Path, steps: int, interval: int) -> list[str]:
    return [
        *SMALL_MODEL,
        *LAYOUT,
        f"--data.dataset={data}",
        f"--job.output_dir={out}",
        f"--training.steps={steps}",
        "--training.log_interval=1",
        "--metrics.plot=false",
        "--checkpoint.async_save=true",
        f"--checkpoint.interval={interval}",
        "--checkpoint.keep_last=2",
        "--checkpoint.resume=auto",
        "--parallel.timeout_s=60",
    ]


def launch(root: Path, name: str, args: list[str], kills: list[dict], timeout: float):
    """One torchrun launch of the chaos worker (max-restarts = len(kills)); (proc, seconds)."""
    (root / f"{name}.json").write_text(json.dumps({"args": args, "kills": kills}))
    restarts = [f"--max-restarts={len(kills)}", "--monitor-interval=0.5"] if kills else []
    t0 = time.perf_counter()
    proc = run_script(
        WORKER,
        [root / f"{name}.json", root / f"{name}_record"],
        WORLD,
        timeout,
        extra_launcher=restarts,
        env=RESTART_ENV,
    )
    return proc, time.perf_counter() - t0


def run_soak(root: Path, data: Path, plan: list[dict], steps: int, interval: int, timeout=900):
    """The uninterrupted run, then the chaos run; analyse() of both."""
    ref, ref_s = launch(root, "ref", train_args(data, root / "ref", steps, interval), [], timeout)
    chaos, chaos_s = launch(
        root, "chaos", train_args(data, root / "chaos", steps, interval), plan, timeout
    )
    result = {"ref_returncode": ref.returncode, "chaos_returncode": chaos.returncode}
    result |= {"wall_ref_s": round(ref_s, 1), "wall_chaos_s": round(chaos_s, 1)}
    result["output_tail"] = chaos.stdout[-3000:] + chaos.stderr[-3000:]
    if ref.returncode == 0 and chaos.returncode == 0:
        result |= analyse(root, plan, steps)
    return result


# ---------------------------------------------------------------- analysis


def losses(out: Path) -> list[tuple[int, float]]:
    """Every (step, loss) the run logged, in order (retried steps appear twice)."""
    return [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def global_batches(record: Path, attempt: int) -> list[list[int]]:
    """The global batches an attempt drew, in order: each dp rank's slices joined. Tensor and
    pipeline peers (same dp rank) must agree; a killed attempt may have drawn one batch more
    on some ranks than on others, so each peer's list must be a prefix of the longest."""
    by_dp: dict[int, list[list[int]]] = {}
    for f in sorted(record.glob("ids_rank*.jsonl")):
        lines = [r for r in read_jsonl(f) if r["attempt"] == attempt]
        if not lines:
            continue
        mine, dp = [r["ids"] for r in lines], lines[0]["dp_rank"]
        known = by_dp.setdefault(dp, mine)
        short, long = sorted((known, mine), key=len)
        assert long[: len(short)] == short, f"{f.name} drew other samples than its peers"
        by_dp[dp] = long
    if not by_dp:
        return []
    n = min(len(v) for v in by_dp.values())
    return [sum((by_dp[d][i] for d in sorted(by_dp)), []) for i in range(n)]


def analyse(root: Path, plan: list[dict], steps: int) -> dict:
    record = root / "chaos_record"
    ref = dict(losses(root / "ref"))
    got = losses(root / "chaos")
    mismatched = [(s, loss, ref.get(s)) for s, loss in got if ref.get(s) != loss]
    starts = {r["attempt"]: r["start"] for r in read_jsonl(record / "attempts.jsonl")}
    # step -> the samples of its batch, from every attempt that drew it
    drawn: dict[int, list[list[int]]] = {}
    for attempt, start in sorted(starts.items()):
        for i, batch in enumerate(global_batches(record, attempt)):
            drawn.setdefault(start + i + 1, []).append(batch)
    consistent = all(all(b == bs[0] for b in bs) for bs in drawn.values())
    final = [drawn[s][-1] if s in drawn else [] for s in range(1, steps + 1)]
    kills = read_jsonl(record / "kills.jsonl") if (record / "kills.jsonl").exists() else []
    per_kill = []
    for k in kills:
        later = [s for a, s in sorted(starts.items()) if a > k["attempt"]]
        resumed = later[0] if later else None
        done = k["steps_done"] if k["steps_done"] is not None else resumed
        per_kill.append(
            k
            | {
                "resumed_from": resumed,
                "recomputed": None if resumed is None else done - resumed,
                "since_checkpoint": done - k["latest"],
            }
        )
    return {
        "kills_planned": len(plan),
        "kills": per_kill,
        "attempts_trained": len(starts),
        "losses_logged": len(got),
        "steps_logged": sorted({s for s, _ in got}) == list(range(1, steps + 1)),
        "loss_mismatches": mismatched[:5],
        "retried_draws_identical": consistent,
        "samples_exactly_once": sum(final, []) == list(range(steps * G)),
    }
