"""Gradient compression on the data-parallel axes (gpt3d/parallel/compression.py), in real
torchrun launches against the 1-process fp32 reference (same weights, same batches):

- gpt3d's own dp_replicate all-reduce (GradSync, used whenever that axis is compressed),
  run in fp32 (PowerSGD configured but never started): exactly the reference, at the parity
  tolerances, on DDP, HSDP (also with grad accumulation), DDP x PP, DDP x TP and a MoE
  model on HSDP with expert parallelism (ep 2).
- bf16 / fp16 reductions: every step-1 gradient equals the fp32 one within the dtype's
  rounding (relative norm error below 2 unit roundoffs: bf16 2^-7, fp16 2^-10; measured:
  bf16 <= 3.6e-3, fp16 <= 5.0e-4) and measurably differs from it (so the compressed path
  really ran); losses within 1e-3; parameters and gradients stay fp32; replicas identical.
- PowerSGD: with error feedback the compressed sums plus the errors still held add up to the
  exact gradient sum over the steps (1e-5; measured 1e-7 over 6 training steps, 2e-6 over
  200 steps of fixed matrices), in training and on fixed
  matrices, where the running mean converges like 1/steps (rank 4 of a full-rank 64 x 48
  sum: 93 % off after 1 step, 6.9 % after 100, 3.4 % after 200) and a sum of rank <= r is
  exact at once; training stays within 5e-2 of the reference loss over 5 steps (measured
  <= 2.9e-2, compressed from step 1); replicas stay bitwise identical.
- A resume of a PowerSGD run continues bitwise; resumed on another layout, the compressor
  starts afresh and says so.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch

from tests.distributed.test_parity import BASE, STEPS, merged
from tests.helpers import (
    DEBUG_CONFIG,
    PARITY_MODEL,
    failed,
    launch_per_world,
    make_dataset,
    read_jsonl,
    run_script,
)
from tests.helpers import pp_args as pp

# 3 launches in the module fixture (~60 s here), each bounded at 400 s; the resume test
# makes 3 more.
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(1800)]
WORKER = "tests/distributed/compression_worker.py"
# dp_mode is explicit: its default, auto, picks ddp for models this small
FSDP, DDP, TP2 = "--parallel.dp_mode=fsdp", "--parallel.dp_mode=ddp", "--parallel.tp=2"
HSDP = ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]
BF16, FP16 = "--parallel.grad_reduce_dtype=bfloat16", "--parallel.grad_reduce_dtype=float16"
REPLICATE_BF16 = "--parallel.grad_reduce_dtype_replicate=bfloat16"
PP2 = pp(2, "1F1B", 4)


def powersgd(rank: int = 2, start: int = 0) -> list[str]:
    return [
        "--parallel.grad_compression=powersgd",
        f"--parallel.powersgd_rank={rank}",
        f"--parallel.powersgd_start_step={start}",
    ]


NEVER = powersgd(start=10_000)  # GradSync all-reduces in fp32: PowerSGD never starts

MOE = ["--model.n_experts=4", "--model.moe_top_k=2"]  # a Mixture-of-Experts reference
EP2 = [*HSDP, "--parallel.ep=2"]  # experts split over ep, FSDP over dp_shard / ep

# name -> (world size, overrides): must equal the reference exactly (a MoE one with MOE)
EXACT = {
    "ddp2_sync": (2, [DDP, *NEVER]),
    "hsdp_sync": (4, [*HSDP, *NEVER]),
    "hsdp_sync_grad_accum": (4, [*HSDP, *NEVER, "--training.grad_accum=2"]),
    "ddp2_pp2_sync": (4, [DDP, *NEVER, *PP2]),
    "ddp2_tp2_sync": (4, [DDP, *NEVER, TP2]),
    "hsdp_ep2_moe_sync": (4, [*EP2, *MOE, *NEVER]),
}
# name -> (world size, overrides, the dtype whose rounding bounds the error)
LOW_PRECISION = {
    "fsdp2_bf16": (2, [FSDP, BF16], "bfloat16"),
    "fsdp2_fp16": (2, [FSDP, FP16], "float16"),
    "ddp2_bf16": (2, [DDP, BF16], "bfloat16"),
    "ddp2_fp16": (2, [DDP, FP16], "float16"),
    "hsdp_bf16": (4, [*HSDP, BF16], "bfloat16"),
    "hsdp_fp16": (4, [*HSDP, FP16], "float16"),
    "hsdp_bf16_replicate_only": (4, [*HSDP, REPLICATE_BF16], "bfloat16"),
    "fsdp2_pp2_fp16": (4, [FSDP, FP16, *PP2], "float16"),
    "ddp2_tp2_bf16": (4, [DDP, BF16, TP2], "bfloat16"),
}
UNIT_ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
LOW_LOSS_ATOL = 1e-3
POWERSGD = {
    "ddp2_powersgd": (2, [DDP, *powersgd()]),
    "hsdp_powersgd": (4, [*HSDP, *powersgd()]),
    "ddp2_pp2_powersgd": (4, [DDP, *powersgd(), *PP2]),
    "ddp2_tp2_powersgd_fp16": (4, [DDP, *powersgd(), TP2, FP16]),
}
POWERSGD_LOSS_ATOL = 5e-2
LEDGER = {"ddp2_ledger": (2, [DDP, *powersgd(1)]), "hsdp_ledger": (4, [*HSDP, *powersgd(1)])}
FIXED_RANK, FIXED_STEPS = 4, 200


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compression")
    data = make_dataset(root / "data")

    def train(overrides: list[str]) -> dict:
        return {"kind": "train", "args": [f"--data.dataset={data}", *BASE, *overrides]}

    launches: dict[int, dict] = {0: {"ref": train([]), "ref_moe": train(MOE)}}
    for name, (world, overrides, *_) in {**EXACT, **LOW_PRECISION, **POWERSGD}.items():
        launches.setdefault(world, {})[name] = train(overrides)
    for name, (world, overrides) in LEDGER.items():
        launches[world][name] = {**train([*overrides, "--training.steps=6"]), "kind": "ledger"}
    launches[2]["fixed"] = {"kind": "fixed", "rank": FIXED_RANK, "steps": FIXED_STEPS}
    return root / "out", failed(launch_per_world(WORKER, launches, root))


def _load(runs, name: str, world: int, ref: str = "ref") -> tuple[dict, dict]:
    out, failures = runs
    for w in (0, world):
        assert w not in failures, f"launch of world {w} failed:\n{failures[w]}"
    return merged(out, ref), merged(out, name)


def _record(runs, name: str, world: int) -> dict:
    out, failures = runs
    assert world not in failures, f"launch of world {world} failed:\n{failures[world]}"
    return torch.load(out / name / "rank0.pt")


def _replicas_identical(runs, name: str) -> None:
    """Every rank's parameters equal its data-parallel peers' bitwise (spread files)."""
    files = glob.glob(str(runs[0] / name / "spread_rank*.json"))
    assert files, f"no replica check for {name}"
    for f in files:
        assert json.loads(Path(f).read_text())["max_spread"] == 0.0, f


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("case", list(EXACT))
def test_own_replicate_all_reduce_is_exact_in_fp32(runs, case):
    world, overrides = EXACT[case]
    ref, got = _load(runs, case, world, "ref_moe" if MOE[0] in overrides else "ref")
    torch.testing.assert_close(got["losses"], ref["losses"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["grad_norms"], ref["grad_norms"], atol=0, rtol=1e-5)
    for kind, atol in (("grads", 1e-6), ("params", 1e-5)):
        assert got[kind], f"no {kind} dumped"
        for name, value in got[kind].items():
            expected = ref[kind]["wte.weight" if name == "lm_head.weight" else name]
            torch.testing.assert_close(value, expected, atol=atol, rtol=0, msg=f"{kind} {name}")
    _replicas_identical(runs, case)


@pytest.mark.parametrize("case", list(LOW_PRECISION))
def test_low_precision_reduction_within_dtype_rounding(runs, case):
    world, _, dtype = LOW_PRECISION[case]
    ref, got = _load(runs, case, world)
    largest = max(g.norm() for g in ref["grads"].values())
    errors = {}
    for name, g in got["grads"].items():
        assert g.dtype == torch.float32, f"{name} gradient is {g.dtype}"
        expected = ref["grads"]["wte.weight" if name == "lm_head.weight" else name]
        if expected.norm() < 1e-6 * largest:
            # the key biases: 0 in exact arithmetic (softmax ignores a constant added to
            # every key); what fp32 leaves is ~1e-11 noise, below float16's scaled range
            continue
        errors[name] = _rel(g, expected)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 2 * UNIT_ROUNDOFF[dtype], f"{worst}: {errors[worst]:.2e}"
    assert errors[worst] > 1e-5, "no rounding at all: the reduction did not run in " + dtype
    torch.testing.assert_close(got["losses"], ref["losses"], atol=LOW_LOSS_ATOL, rtol=0)
    assert all(p.dtype == torch.float32 for p in got["params"].values())
    _replicas_identical(runs, case)


@pytest.mark.parametrize("case", list(POWERSGD))
def test_powersgd_trains_close_to_reference(runs, case):
    world, _ = POWERSGD[case]
    ref, got = _load(runs, case, world)
    assert len(got["losses"]) == STEPS and got["losses"][-1] < got["losses"][0]
    torch.testing.assert_close(got["losses"], ref["losses"], atol=POWERSGD_LOSS_ATOL, rtol=0)
    # compressed from step 1: the step-1 gradients are approximations, not the exact sums
    errors = [
        _rel(g, ref["grads"].get(n, ref["grads"]["wte.weight"])) for n, g in got["grads"].items()
    ]
    assert max(errors) > 1e-3
    _replicas_identical(runs, case)


@pytest.mark.parametrize("case", list(LEDGER))
def test_error_feedback_keeps_the_gradient_sum(runs, case):
    """sum over steps of the compressed sums + the errors left on the replicas = the exact
    sum of every step's gradients (what error feedback promises), matrix by matrix."""
    world, _ = LEDGER[case]
    r = _record(runs, case, world)
    assert r["exact"], "no compressed matrix"
    for name, exact in r["exact"].items():
        assert _rel(r["delivered"][name] + r["errors"][name], exact) <= 1e-5, name
        assert _rel(r["delivered"][name], exact) > 1e-4, f"{name}: nothing was compressed"


def test_powersgd_on_fixed_matrices(runs):
    r = _record(runs, "fixed", 2)
    for kind in ("full", "low"):
        assert r["identity"][kind] <= 1e-5, kind
    assert r["rel_mean"]["low"][0] <= 1e-5  # a sum of rank <= r is exact at the first step
    full = r["rel_mean"]["full"]  # a full-rank 64 x 48 sum, rank 4: one step is far off ...
    assert full[0] > 0.5
    # ... but nothing is lost: the running mean converges like 1/steps (measured 0.069 after
    # 100 steps, 0.034 after 200, 0.017 after 400)
    assert full[199] <= 0.05 and full[199] < full[99] / 1.8


# ---------------------------------------------------------------- resume


def test_resume_continues_exactly(tmp_path):
    data = make_dataset(tmp_path / "data")
    args = [
        *DEBUG_CONFIG,
        f"--data.dataset={data}",
        *PARITY_MODEL,
        "--training.steps=8",
        "--training.log_interval=1",
        "--metrics.plot=false",
        "--checkpoint.interval=4",
        DDP,
        *powersgd(start=2),
    ]
    first, again, other = tmp_path / "first", tmp_path / "again", tmp_path / "other"
    p = run_script("recipes/train.py", [*args, f"--job.output_dir={first}"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    step4 = first / "checkpoints" / "step-4"
    resume = [*args, f"--checkpoint.resume={step4}"]
    p = run_script("recipes/train.py", [*resume, f"--job.output_dir={again}"], nproc=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "starts afresh" not in p.stdout
    ref, got = _losses(first), _losses(again)
    assert sorted(got) == [5, 6, 7, 8]
    assert all(got[s] == ref[s] for s in got), (got, ref)
    meta = json.loads((step4 / "meta.json").read_text())
    assert meta["grad_sync"].startswith("powersgd rank 2 on ")
    # another layout: the state (per-rank local shards) cannot carry over; it starts afresh
    p = run_script("recipes/train.py", [*resume, f"--job.output_dir={other}"], nproc=4)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "powersgd rank 2 state starts afresh" in p.stdout
    assert sorted(_losses(other)) == [5, 6, 7, 8]


def _losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl") if "loss" in r}
