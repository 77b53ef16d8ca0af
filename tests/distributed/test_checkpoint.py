"""Checkpoints, in real torchrun launches of recipes/train.py (checkpoint_worker.py runs
several scenarios per launch, so the launch cost is paid 5 times in all):

- save on (dp, pp, tp) = (2, 2, 2) at step 4 of 8, resume on the same layout: every later
  loss bitwise equal; on (1, 1, 4), (4, 1, 1), (2, 1, 2), (1, 2, 1) and 1 process: within 1e-5;
- the global sample ids every rank drew: each sample exactly once over save + resume;
- torchrun --max-restarts=2 with a rank SIGKILLed half-way through writing a checkpoint, then
  a rank SIGKILLed mid-training: each restart resumes from the latest complete checkpoint and
  the run ends with the uninterrupted run's losses, bitwise;
- SIGTERM on one rank (async saves on): every rank saves the same step, the background
  write equals a synchronous save of that step, the job exits 0; SIGTERM to
  torchrun (cluster preemption): the workers save and exit cleanly;
- a dataset of llm.c-format shards (3 train shards of unequal size): saved on (2, 1, 2),
  resumed in 1 process, within 1e-5 and each sample exactly once;
- Hugging Face GPT-2 (transformers' save_pretrained) -> init_from on (1, 2, 2) and (2, 1, 1)
  gives HF's logits; fine-tuned on (1, 2, 2) -> recipes/export.py -> from_pretrained gives
  gpt3d's logits;
- the checkpoints all these launches write (every layout above, MoE experts on ep=2,
  PowerSGD state) pass verify() with their checksums and read through gpt3d's allow-list
  unpickler exactly as DCP's own reader reads them.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from gpt3d.checkpoint_dir import load_model_state_dict, verify
from gpt3d.checkpoint_safety import read_dcp_metadata
from tests.helpers import (
    PARITY_MODEL,
    REPO,
    TORCHRUN,
    env,
    launch_per_world,
    make_dataset,
    read_jsonl,
    recipe,
    run_script,
)

# 5 launches in the module fixture (~55 s here), each bounded at 400 s.
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled"),
    pytest.mark.slow,
    pytest.mark.distributed,
    pytest.mark.timeout(1800),
]
WORKER = "tests/distributed/checkpoint_worker.py"
STEPS, SAVE_AT, G = 8, 4, 16
BASE = [
    *PARITY_MODEL,  # global batch G = 16
    f"--training.steps={STEPS}",
    "--training.log_interval=1",
    "--metrics.plot=false",
]
HF_SHAPE = dict(n_layer=4, n_head=4, n_embd=64, n_positions=32, vocab_size=512)


def layout(dp: int, pp: int, tp: int) -> list[str]:
    args = [f"--parallel.dp_shard={dp}", f"--parallel.pp={pp}", f"--parallel.tp={tp}"]
    return args + (["--parallel.pp_microbatches=4"] if pp > 1 else [])


# resumed case -> (world size, layout); all resume from the (2, 2, 2) run's step-4
RESUMED = {
    "same_2_2_2": (8, [*layout(2, 2, 2), "--parallel.sequence_parallel=true"]),
    "1_1_4": (4, layout(1, 1, 4)),
    "4_1_1": (4, layout(4, 1, 1)),
    "2_1_2": (4, layout(2, 1, 2)),
    "1_2_1": (2, layout(1, 2, 1)),
    "1_process": (0, layout(1, 1, 1)),
}


def save_hf_model(directory: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_SHAPE))
    with torch.no_grad():  # HF init has zero biases and unit LayerNorms: perturb them
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)


def sharded_dataset(data: Path, out: Path) -> Path:
    """The tokens of make_dataset in llm.c-format shards: train.bin cut into 3 unequal
    shards (windows never cross a cut, so the windows differ from the one-file dataset)."""
    import numpy as np

    from gpt3d.shards import write_shard

    out.mkdir()
    train = np.fromfile(data / "train.bin", dtype=np.uint16)
    for k, (a, b) in enumerate([(0, 5003), (5003, 12000), (12000, len(train))]):
        write_shard(out / f"synthetic_train_{k:06d}.bin", train[a:b], "llmc")
    write_shard(out / "synthetic_val_000000.bin", np.fromfile(data / "val.bin", np.uint16), "llmc")
    meta = json.loads((data / "meta.json").read_text())
    meta = {k: meta[k] for k in ("tokenizer", "vocab_size", "eot_id", "dtype")}
    (out / "meta.json").write_text(json.dumps({**meta, "format": "llmc"}))
    return out


def cases_for(root: Path, data: Path, hf: Path) -> dict[int, dict]:
    """world size -> {case: spec}; world 0 = plain python (one process)."""
    common = [*BASE, f"--data.dataset={data}"]

    def train(name, args, **extra):
        return {
            "kind": "train",
            "args": [*common, f"--job.output_dir={root / name}", *args],
        } | extra

    def hf_logits(args):
        return {"kind": "hf_logits", "args": [*common, *init, *args]}

    step4 = root / "ref" / "checkpoints" / f"step-{SAVE_AT}"
    resume = ["--checkpoint.resume", str(step4)]  # each saves step-8 on its own layout
    init = ["--checkpoint.init_from", str(hf)]
    saves = [f"--checkpoint.interval={SAVE_AT}", f"--training.eval_interval={SAVE_AT}"]
    launches = {8: {"ref": train("ref", [*RESUMED["same_2_2_2"][1], *saves])}}
    for name, (world, args) in RESUMED.items():
        launches.setdefault(world, {})[name] = train(name, [*args, *resume])
    launches[4]["hf_1_2_2"] = hf_logits(layout(1, 2, 2))
    launches[4]["finetune_1_2_2"] = train(
        "finetune_1_2_2", [*layout(1, 2, 2), *init, "--training.steps=2"]
    )
    launches[2]["hf_2_1_1"] = hf_logits(layout(2, 1, 1))
    shards = [f"--data.dataset={sharded_dataset(data, root / 'shards')}"]
    launches[4]["shards_ref"] = train("shards_ref", [*layout(2, 1, 2), *saves, *shards])
    shards_resume = ["--checkpoint.resume", str(root / "shards_ref" / "checkpoints" / "step-4")]
    launches[0]["shards_1_process"] = train(
        "shards_1_process", [*layout(1, 1, 1), *shards, *shards_resume]
    )
    # state beyond the dense layouts, for the allow-list test: MoE experts, PowerSGD's state
    moe = ["--model.n_experts=8", "--model.moe_top_k=2", "--parallel.ep=2"]
    launches[2]["moe_ep2"] = train("moe_ep2", [*layout(2, 1, 1), *moe, "--training.steps=2"])
    powersgd = ["--parallel.dp_replicate=2", "--parallel.dp_mode=ddp"]
    powersgd += ["--parallel.grad_compression=powersgd", "--parallel.powersgd_start_step=1"]
    launches[2]["powersgd"] = train("powersgd", [*layout(1, 1, 1), *powersgd, "--training.steps=3"])
    sync3 = ["--checkpoint.interval=3", "--checkpoint.save_final=false"]
    launches[2]["ref_1_2_1"] = train("ref_1_2_1", [*layout(1, 2, 1), *sync3])
    async2 = ["--checkpoint.async_save=true", "--checkpoint.interval=2"]
    launches[2]["sigterm"] = train(
        "sigterm", [*layout(1, 2, 1), *async2], faults={"sigterm_at_step": [3, 1]}
    )
    return launches


FAULT_ARGS = [*layout(1, 2, 1), "--checkpoint.interval=2", "--checkpoint.keep_last=2"]
FAULTS = {"kill_in_save": [6, 1], "kill_at_step": [7, 1]}  # (step, rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All launches; returns (root, {launch: CompletedProcess})."""
    root = tmp_path_factory.mktemp("ckpt")
    data, hf = make_dataset(root / "data"), root / "hf_gpt2"
    save_hf_model(hf)
    # world 8 launches first: the other launches resume from its step-4 checkpoint
    procs = launch_per_world(WORKER, cases_for(root, data, hf), root)
    out = f"--job.output_dir={root / 'fault'}"
    args = [*BASE, f"--data.dataset={data}", out, *FAULT_ARGS, "--checkpoint.resume=auto"]
    (root / "fault.json").write_text(
        json.dumps({"fault": {"kind": "train", "args": args, "faults": FAULTS}})
    )
    # torch 2.13's shared rendezvous store keeps stale keys across restarts: workers of the
    # next attempt can read dead peers' addresses and hang (pytorch#135712). Opt out.
    restarts = ["--max-restarts=2", "--monitor-interval=0.5"]
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    spec = [root / "fault.json", root / "out"]
    procs["fault"] = run_script(WORKER, spec, 2, 300, extra_launcher=restarts, env=env)
    return root, procs


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def losses(out_dir: Path) -> dict[int, float]:
    """step -> loss, the last logged value when a restarted run logged a step twice."""
    return {r["step"]: r["loss"] for r in read_jsonl(out_dir / "metrics.jsonl") if "loss" in r}


def drawn(out_dir: Path, attempt: int | None = None) -> list[list[int]]:
    """Global batches the run drew, in order: each dp rank's slice, joined. Tensor and
    pipeline peers (same dp rank) must have drawn identical slices."""
    by_dp: dict[int, list] = {}
    for f in sorted(out_dir.glob("ids_rank*.jsonl")):
        lines = [r for r in read_jsonl(f) if attempt is None or r["attempt"] == attempt]
        mine = [r["ids"] for r in lines]
        dp = lines[0]["dp_rank"] if lines else 0
        assert by_dp.setdefault(dp, mine) == mine, f"{f.name} drew other samples than its peers"
    dps = sorted(by_dp)
    return [sum((by_dp[d][i] for d in dps), []) for i in range(len(by_dp[dps[0]]))]


def test_launches_succeed(runs):
    _, procs = runs
    for proc in procs.values():
        ok(proc)


@pytest.mark.parametrize("case", list(RESUMED))
def test_resume_continues_exactly(runs, case):
    root, procs = runs
    ok(procs[RESUMED[case][0]])
    ref, got = losses(root / "ref"), losses(root / case)
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    diffs = [abs(got[s] - ref[s]) for s in got]
    if case.startswith("same"):
        assert got == {s: ref[s] for s in got}, "same-layout resume must be bitwise equal"
    else:
        assert max(diffs) < 1e-5, diffs
    print(f"{case}: max |loss - uninterrupted| = {max(diffs):.2e}")
    # The data continues: no sample repeated or skipped across save + resume.
    before, after = drawn(root / "out" / "ref")[:SAVE_AT], drawn(root / "out" / case)
    ids = sum(before + after, [])
    assert ids == list(range(STEPS * G)), "samples repeated, skipped or reordered"


def test_sharded_llmc_dataset_resumes_exactly_on_another_layout(runs):
    root, procs = runs
    ok(procs[4])
    ok(procs[0])
    assert len(list((root / "shards").glob("*train*.bin"))) == 3
    ref, got = losses(root / "shards_ref"), losses(root / "shards_1_process")
    assert sorted(got) == list(range(SAVE_AT + 1, STEPS + 1))
    diffs = [abs(got[s] - ref[s]) for s in got]
    assert max(diffs) < 1e-5, diffs
    assert ref != losses(root / "ref")  # other windows than the one-file dataset
    before = drawn(root / "out" / "shards_ref")[:SAVE_AT]
    after = drawn(root / "out" / "shards_1_process")
    assert sum(before + after, []) == list(range(STEPS * G))


def test_crash_in_save_and_restarts_resume_latest_complete(runs):
    root, procs = runs
    out = procs["fault"].stdout
    ok(procs["fault"])
    # attempt 0: step-2 and step-4 saved, rank 1 killed half-way through writing step-6
    assert "fault: rank 1 killed while writing step-6" in out
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", out)
    # attempt 1 picked step-4 (step-6.tmp was half-written), attempt 2 picked step-6
    assert [(Path(p).name, int(s)) for p, s in resumed] == [("step-4", 4), ("step-6", 6)]
    assert "fault: rank 1 killed after step 7" in out
    ref, got = losses(root / "ref_1_2_1"), losses(root / "fault")
    assert got == ref, "a restarted run must give the uninterrupted run's losses"
    for r in read_jsonl(root / "fault" / "metrics.jsonl"):  # also the steps logged twice
        assert r["loss"] == ref[r["step"]]
    # each attempt started drawing where its checkpoint left off
    for attempt, start_step in ((0, 0), (1, 4), (2, 6)):
        assert drawn(root / "out" / "fault", attempt)[0][0] == start_step * G
    kept = sorted(p.name for p in (root / "fault" / "checkpoints").iterdir())
    assert kept == ["step-6", "step-8"]  # keep_last=2, no .tmp left behind


def test_sigterm_on_one_rank_saves_and_stops_with_async_saves(runs):
    root, procs = runs
    ok(procs[2])
    assert "saving step 3 and stopping" in procs[2].stdout
    assert max(losses(root / "sigterm")) == 3
    ckpts = sorted(p.name for p in (root / "sigterm" / "checkpoints").iterdir())
    assert ckpts == ["step-2", "step-3"]  # async step-2 published before step-3 was written
    # the background write holds exactly the state a synchronous save of step 3 holds
    _, got = load_model_state_dict(root / "sigterm" / "checkpoints" / "step-3")
    _, ref = load_model_state_dict(root / "ref_1_2_1" / "checkpoints" / "step-3")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def hf_reference_logits(root: Path, x: torch.Tensor) -> torch.Tensor:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(root / "hf_gpt2").eval()
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("case,world", [("hf_1_2_2", 4), ("hf_2_1_1", 2)])
def test_init_from_hf_gives_hf_logits(runs, case, world):
    root, procs = runs
    ok(procs[world])
    dump = torch.load(root / "out" / case / "logits.pt")
    ref = hf_reference_logits(root, dump["x"])
    diff = (dump["logits"][..., : HF_SHAPE["vocab_size"]] - ref).abs().max().item()
    print(f"{case}: max |logits - HF| = {diff:.2e}")
    assert diff < 1e-4


def test_finetuned_export_loads_in_transformers(runs, tmp_path):
    from transformers import GPT2LMHeadModel

    from gpt3d.generate import load_plain_model

    root, procs = runs
    ok(procs[4])
    assert "init from" in procs[4].stdout and "4 layers, 4 heads, n_embd 64" in procs[4].stdout
    ckpt = root / "finetune_1_2_2" / "checkpoints" / "step-2"
    export = recipe("export")
    assert export(["--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ours = load_plain_model(ckpt)
    x = torch.randint(HF_SHAPE["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)).abs().max().item()
    print(f"export: max |HF logits - gpt3d logits| = {diff:.2e}")
    assert diff < 1e-4
    # and the fine-tune did start from the HF weights: its first loss is HF's on that batch
    from gpt3d.data import ShardedLoader

    x0, y0, _ = ShardedLoader(root / "data", "train", 32, G, 1337).batch_for_step(0)
    logits = hf_reference_logits(root, x0)  # (G, T, V)
    hf_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y0.flatten()).item()
    assert abs(losses(root / "finetune_1_2_2")[1] - hf_loss) < 1e-4


def test_sigterm_to_torchrun_saves_and_workers_exit_cleanly(tmp_path):
    """Cluster preemption: torchrun gets SIGTERM and forwards it; the workers finish the
    step they are in, save it, and exit 0 (torchrun itself still reports the signal)."""
    data = make_dataset(tmp_path / "data")
    args = [
        *BASE,
        f"--data.dataset={data}",
        f"--job.output_dir={tmp_path / 'run'}",
        "--training.steps=100000",
        *layout(1, 2, 1),
    ]
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO / "recipes/train.py"), *args]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 200
    while not (metrics.exists() and len(read_jsonl(metrics)) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    last = max(losses(tmp_path / "run"))
    assert f"saving step {last} and stopping" in out and f"done: {last} steps" in out, out[-3000:]
    assert "exitcode" not in out  # no worker failed: only torchrun's own SignalException
    ckpts = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()]
    assert ckpts == [f"step-{last}"]
    verify(tmp_path / "run" / "checkpoints" / f"step-{last}")


# Which checkpoint of the launches covers what. A new layout or a new kind of saved state
# (a new launch case in cases_for) gets its line here.
WRITTEN_ON = {
    "ref": "FSDP x PP x TP + SP (2, 2, 2), sync saves",
    "same_2_2_2": "FSDP x PP x TP + SP (2, 2, 2), resumed",
    "1_1_4": "TP 4",
    "4_1_1": "FSDP 4",
    "2_1_2": "FSDP x TP",
    "1_2_1": "PP 2",
    "1_process": "one process",
    "ref_1_2_1": "PP 2, every 3 steps",
    "sigterm": "PP 2, async saves",
    "finetune_1_2_2": "PP x TP, from Hugging Face weights",
    "shards_ref": "FSDP x TP on llm.c shards",
    "fault": "PP 2 after two crashes and restarts",
    "moe_ep2": "MoE: 8 experts over ep=2",
    "powersgd": "DDP with PowerSGD's per-rank state",
}


@pytest.mark.parametrize("case", WRITTEN_ON)
def test_every_layouts_checkpoint_reads_through_the_allow_list(runs, case):
    from tests.unit.test_checkpoint_safety import reads_exactly_as_dcp

    root, _ = runs
    written = sorted((root / case / "checkpoints").glob("step-*"))
    assert written, f"{case} ({WRITTEN_ON[case]}) wrote no checkpoint"
    for path in written:
        reads_exactly_as_dcp(path)
    keys = read_dcp_metadata(written[-1]).state_dict_metadata
    must_hold = {"moe_ep2": ".moe.experts.", "powersgd": "grad_sync."}.get(case, "model.")
    assert any(must_hold in k for k in keys), f"{case}: no {must_hold} entries"
