"""The fake-tensor memory estimate (gpt3d/planner/fake.py): against real runs of gpt3d's
Trainer measured the same way (real torchrun launches), and the analytic model against it.

Also a torchrun worker: `python tests/unit/test_planner_fake.py cases.json out/` measures
each case's real run on this rank (gpt3d.planner.fake.measure_real).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a torchrun worker
    sys.path.insert(0, str(REPO))

from gpt3d.planner import Layout, Workload, memory_by_rank  # noqa: E402
from gpt3d.planner.fake import estimate, run_plan  # noqa: E402
from tests.helpers import launch_per_world, make_dataset, model_args, pp_args  # noqa: E402

MiB = 2**20


def small(n_layer=8, n_head=4, n_embd=128, vocab=512, seq=64, batch=8, dtype="float32", **kw):
    return Workload.from_preset(
        "gpt2", seq, batch, dtype, 64, device="cpu", n_layer=n_layer, n_head=n_head,
        n_embd=n_embd, block_size=seq, vocab_size=vocab, **kw,
    )  # fmt: skip


# ---------------------------------------------------------------- the build path itself


def test_allocate_builds_what_materialize_builds():
    """fake.allocate is materialize minus the values: same tensors, shapes and dtypes."""
    import torch

    from gpt3d.parallel.parallelize import materialize, parallelize
    from gpt3d.planner.fake import allocate

    run = run_plan(small(n_layer=2, tie_embeddings=True), Layout())
    real, other = parallelize(run, None), parallelize(run, None)
    materialize(real, torch.device("cpu"), lambda n, shape, region: torch.zeros(shape))
    allocate(other, torch.device("cpu"))
    for a, b in zip(real.chunks, other.chunks, strict=True):
        sig = [(n, t.shape, t.dtype, t.device) for n, t in a.state_dict(keep_vars=True).items()]
        assert sig == [
            (n, t.shape, t.dtype, t.device) for n, t in b.state_dict(keep_vars=True).items()
        ]
        assert b.lm_head.weight is b.wte.weight  # the tie survives to_empty


# ------------------------------------------------------ the analytic model against fake

# (workload overrides, layout): every data-parallel mode, dtype, AC mode and schedule family
MATRIX = [
    ({}, {}),
    ({"dtype": "bfloat16"}, {}),
    ({"vocab": 50257}, {}),
    ({}, {"ac": "full"}),
    ({}, {"ac": "selective"}),
    ({}, {"dp_shard": 2}),
    ({"dtype": "bfloat16", "vocab": 50257}, {"dp_shard": 2}),
    ({"dtype": "bfloat16"}, {"dp_replicate": 2, "dp_mode": "ddp"}),
    ({}, {"dp_replicate": 2, "dp_shard": 2}),
    ({"vocab": 50257}, {"tp": 2, "sequence_parallel": True}),
    ({}, {"tp": 4}),
    ({}, {"pp": 2, "microbatches": 4}),
    ({}, {"pp": 2, "microbatches": 4, "schedule": "GPipe"}),
    ({}, {"pp": 2, "microbatches": 4, "dp_shard": 2}),
    ({}, {"pp": 2, "microbatches": 4, "dp_shard": 2, "reshard_per_microbatch": True}),
    ({}, {"pp": 2, "microbatches": 4, "schedule": "Interleaved1F1B", "stages_per_rank": 2}),
    ({}, {"pp": 2, "microbatches": 4, "schedule": "InterleavedZeroBubble", "stages_per_rank": 2}),
    ({}, {"pp": 2, "microbatches": 4, "schedule": "ZBVZeroBubble", "stages_per_rank": 2}),
    ({"vocab": 50257}, {"pp": 2, "microbatches": 4, "schedule": "DualPipeV", "stages_per_rank": 2}),
    ({"dtype": "bfloat16", "vocab": 50257},
     {"pp": 2, "microbatches": 4, "tp": 2, "dp_shard": 2, "sequence_parallel": True}),
]  # fmt: skip


@pytest.fixture(scope="module")
def fake_matrix():
    """Fake estimates of every MATRIX entry (all pipeline ranks), two processes at a time."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [(small(**wkw), Layout(**lkw)) for wkw, lkw in MATRIX]
    with ThreadPoolExecutor(max_workers=2) as pool:
        fakes = list(pool.map(lambda c: estimate(run_plan(*c), workers=1), cases))
    return list(zip(cases, fakes, strict=True))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_analytic_model_agrees_with_the_fake_estimate(fake_matrix):
    """Per pipeline rank: model state exact, activations (saved-tensor peak) within 3 % in
    fp32 (split backward frees part of a microbatch at I, the replay all of it at W) and
    10 % in bf16 (autocast's casts), total within 15 % (temporaries are fitted)."""
    worst = 0.0
    for (w, lay), fakes in fake_matrix:
        for a, f in zip(memory_by_rank(w, lay), fakes, strict=True):
            where = f"{w.dtype} vocab {w.model.vocab_size} {lay} pp rank {a.pp_rank}"
            assert a.params == f.params and a.grads == f.grads, where
            assert a.optimizer == f.optimizer, where
            rel = 0.03 if w.dtype == "float32" else 0.10
            assert a.activations == pytest.approx(f.activations, rel=rel), where
            assert a.total == pytest.approx(f.total, rel=0.15), where
            worst = max(worst, abs(a.total / f.total - 1))
    assert worst > 0  # the comparison ran (and the bound is not trivially met by equality)


@pytest.mark.slow
def test_fake_total_bounds_its_live_peak(fake_matrix):
    """The breakdown's total counts gradients whole: >= the live-byte peak, and above it by
    at most the gradients (they may not all exist yet at the peak)."""
    for _, fakes in fake_matrix:
        for f in fakes:
            assert f.detail["peak"] <= f.total <= f.detail["peak"] + f.grads + 1


# ------------------------------------------------------------ fake against real runs

REAL_MODEL = [*model_args(4, 4, 64, block=32), "--model.pad_vocab_multiple=64"]
REAL_BASE = [
    *REAL_MODEL,
    "--training.seq_len=32",
    "--training.global_batch_size=8",
    "--training.eval_interval=0",
    "--training.warmup_steps=0",
    "--checkpoint.interval=0",
    "--checkpoint.save_final=false",
    "--metrics.plot=false",
]
TP2, SP = "--parallel.tp=2", "--parallel.sequence_parallel=true"
REAL_CASES = {
    2: {
        "tp2": [TP2],  # loss parallel (vocab-sharded logits): phase 1 saw +21 % here
        "fsdp_bf16": ["--training.dtype=bfloat16"],
        "ddp": ["--parallel.dp_mode=ddp"],
        "zbv": pp_args(2, "ZBVZeroBubble", 4, 2),
        "gpipe_ac": [*pp_args(2, "GPipe", 4), "--training.activation_checkpointing=full"],
    },
    4: {
        "dp2_tp2_sp": [TP2, SP],
        "tp2_pp2": [TP2, SP, *pp_args(2, "1F1B", 4)],
        # FSDP resharded per microbatch: the fake step must run gpt3d's own pipeline stage
        "dp2_pp2_resharded": [
            "--parallel.dp_mode=fsdp",
            *pp_args(2, "1F1B", 4),
            "--parallel.fsdp_reshard_per_microbatch=true",
        ],
    },
}


# FSDP resharded per microbatch under 1F1B: its per-microbatch collectives and the pipeline's
# sends complete in a timing-dependent order, and buffers of a collective still in flight
# add to the live peak: over four real runs rank 0 peaked at 2.152-2.352 MB, never below the
# fake's 2.144 MB; the quietest dp peer of a stage stays near it (rank 1: 2.152 MB). The
# stage kept unsharded all step (what the fake estimated before it used gpt3d's stage
# class) reads 2.348 MB, 9 % above that.
TIMING_DEPENDENT = {"dp2_pp2_resharded"}


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("planner_real")
    data = make_dataset(root / "data", vocab_size=512)
    launches = {
        world: {name: {"args": [*REAL_BASE, f"--data.dataset={data}", *args]}
                for name, args in cases.items()}
        for world, cases in REAL_CASES.items()
    }  # fmt: skip
    procs = launch_per_world("tests/unit/test_planner_fake.py", launches, root, timeout=600)
    bad = {w: p.stdout[-2000:] + p.stderr[-3000:] for w, p in procs.items() if p.returncode}
    assert not bad, bad
    return root / "out", launches


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(1500)
def test_fake_estimate_equals_real_runs(real_runs):
    """Every rank of each real run (Trainer, gloo) against the fake estimate of that rank:
    state and the saved-tensor peak exactly, the live-byte peak within 2 %."""
    from gpt3d.config import load_config
    from gpt3d.preflight import preflight

    out, launches = real_runs
    for world, cases in launches.items():
        for name, spec in cases.items():
            run = preflight(load_config(spec["args"]), world)
            fakes = estimate(run, ranks=list(range(world)))
            for rank, fake in enumerate(fakes):
                real = json.loads((out / name / f"rank{rank}.json").read_text())
                where = f"{name} rank {rank}"
                for key in ("params", "grads", "optimizer", "activations"):
                    assert fake.__dict__[key] == real[key], (where, key)
                peak, real_peak = fake.detail["peak"], real["detail"]["peak"]
                if name in TIMING_DEPENDENT:  # the fake is the run without late frees
                    real_peak = min(quietest(out / name, rank, world, run.dims.pp), real_peak)
                    assert 0.9 * real_peak <= peak <= 1.02 * real_peak, (where, peak, real_peak)
                else:
                    assert peak == pytest.approx(real_peak, rel=0.02), where


def quietest(out: Path, rank: int, world: int, pp: int) -> float:
    """The lowest live-byte peak among the real ranks of this rank's pipeline stage (its data
    parallel peers run the same shapes)."""
    per_stage = world // pp
    first = rank // per_stage * per_stage
    peers = [
        json.loads((out / f"rank{r}.json").read_text()) for r in range(first, first + per_stage)
    ]
    return min(p["detail"]["peak"] for p in peers)


def _run_case(spec: dict, out: Path) -> None:
    """Worker side: measure this rank's real run (same meter as the fake estimate)."""
    import gc
    from dataclasses import asdict

    from gpt3d.config import load_config
    from gpt3d.planner.fake import measure_real

    mb = measure_real(load_config(spec["args"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{mb.detail['rank']}.json").write_text(json.dumps(asdict(mb)))
    gc.collect()


if __name__ == "__main__":
    from gpt3d.launch import guarded_main
    from tests.helpers import cases_main

    guarded_main(cases_main(_run_case), sys.argv[1:])
