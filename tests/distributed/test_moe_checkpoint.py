"""Mixture-of-Experts checkpoints reshard across expert-parallel degrees, in real torchrun
launches of recipes/train.py (tests/distributed/checkpoint_worker.py):

- a run on ep=2 (2 processes) saves at step 3 of 6 and goes on; resuming its step-3 on ep=4,
  on ep=2 x pp=2 (evaluating along the way), on tp=2 (experts' hidden dim split) and in one
  process continues with the uninterrupted run's losses (1e-5) and ends with its balancing
  biases and parameters;
- no sample is repeated or skipped across save + resume (the global sample ids every rank
  drew, joined over the data-parallel ranks, are 0..6 G - 1 in order);
- the step-3 checkpoint exports (Mixtral-style names) and samples like the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpt3d.checkpoint_dir import load_model_state_dict
from tests.helpers import PARITY_MODEL, launch_per_world, make_dataset, read_jsonl, recipe

# 3 launches (2, 4 processes and plain python): ~60 s here, each bounded at 400 s.
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.timeout(1200),
]
WORKER = "tests/distributed/checkpoint_worker.py"
STEPS, SAVE_AT, G = 6, 3, 16
MOE = ["--model.n_experts=8", "--model.moe_top_k=2", "--model.moe_aux_coef=0.01"]
BASE = [
    *PARITY_MODEL,  # global batch G = 16
    *MOE,
    f"--training.steps={STEPS}",
    "--training.log_interval=1",
    "--metrics.plot=false",
    # recipes/train.py's default config differs by world size: pin the layout
    "--parallel.pp=1",
    "--parallel.tp=1",
    "--parallel.dp_shard=-1",
]
PP = ["--parallel.pp=2", "--parallel.pp_microbatches=4"]
# resumed case -> (world size, layout); all resume from the ep=2 run's step-3
RESUMED = {
    "ep4": (4, ["--parallel.ep=4"]),
    # evaluation at steps 4 and 6: each eval <-> train switch re-runs the pipeline's shape
    # inference, which must not count as training (biases compared exactly below)
    "ep2_pp2": (4, ["--parallel.ep=2", *PP, "--training.eval_interval=2"]),
    "tp2": (2, ["--parallel.tp=2"]),
    "one_process": (0, []),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_ckpt")
    data = make_dataset(root / "data")
    common = [*BASE, f"--data.dataset={data}"]

    def train(name, args):
        return {"kind": "train", "args": [*common, f"--job.output_dir={root / name}", *args]}

    step = root / "ref" / "checkpoints" / f"step-{SAVE_AT}"
    resume = ["--checkpoint.resume", str(step)]
    # world 2 first: its ref run writes the checkpoint every other case resumes from
    launches = {2: {"ref": train("ref", ["--parallel.ep=2", f"--checkpoint.interval={SAVE_AT}"])}}
    for name, (world, layout) in RESUMED.items():
        launches.setdefault(world, {})[name] = train(name, [*layout, *resume])
    procs = launch_per_world(WORKER, launches, root)
    return root, {w: p.stdout[-3000:] + p.stderr[-3000:] for w, p in procs.items() if p.returncode}


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


def drawn(ids_dir: Path) -> list[list[int]]:
    """Global batches a run drew, in order, each dp rank's slice joined (tp/pp peers of a
    dp rank draw the same slice)."""
    by_dp: dict[int, list] = {}
    for f in sorted(ids_dir.glob("ids_rank*.jsonl")):
        lines = read_jsonl(f)
        assert by_dp.setdefault(lines[0]["dp_rank"], [r["ids"] for r in lines]) == [
            r["ids"] for r in lines
        ]
    dps = sorted(by_dp)
    return [sum((by_dp[d][i] for d in dps), []) for i in range(len(by_dp[dps[0]]))]


@pytest.mark.parametrize("case", list(RESUMED))
def test_moe_resume_on_another_layout_continues_exactly(runs, case):
    root, failures = runs
    assert not failures, failures
    ref, got = losses(root / "ref"), losses(root / case)
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    diffs = [abs(got[s] - ref[s]) for s in got]
    assert max(diffs) < 1e-5, diffs
    print(f"{case}: max |loss - uninterrupted| = {max(diffs):.2e}")
    # The balancing biases and weights at the end are the uninterrupted run's.
    _, want = load_model_state_dict(root / "ref" / "checkpoints" / f"step-{STEPS}")
    _, have = load_model_state_dict(root / case / "checkpoints" / f"step-{STEPS}")
    bias_names = [n for n in want if n.endswith("expert_bias")]
    assert len(bias_names) == 4 and any(want[n].abs().sum() > 0 for n in bias_names)
    for name in want:
        tol = 0 if name.endswith("expert_bias") else 1e-5
        torch.testing.assert_close(have[name], want[name], atol=tol, rtol=0, msg=name)
    # No sample repeated or skipped: the ref's first SAVE_AT batches, then the resumed run's.
    before = drawn(root / "out" / "ref")[:SAVE_AT]
    ids = sum(before + drawn(root / "out" / case), [])
    assert ids == list(range(STEPS * G)), "samples repeated, skipped or reordered"


def test_moe_checkpoint_exports_and_samples(runs, tmp_path, capsys):
    root, failures = runs
    assert not failures, failures
    step = root / "ref" / "checkpoints" / f"step-{SAVE_AT}"
    assert recipe("export")(["--checkpoint", str(step), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    texts = []
    for source in (step, tmp_path / "hf"):
        argv = ["--checkpoint", str(source), "--prompt", "a", "--max_new_tokens", "8"]
        assert recipe("sample")(argv) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and texts[0].strip()
