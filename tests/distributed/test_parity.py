"""Every layout gives the numbers of one process.

For each layout, real torchrun workers train 5 optimizer steps from the same per-name
initial weights on the same global batches as a 1-process reference, and we compare:
losses at every step (1e-5), gradient norm (1e-5 relative), every parameter's full step-1
gradient (1e-6) and every final parameter (1e-5). All layouts of one world size share one
launch (tests/distributed/parity_worker.py), so the launch cost is paid 4 times in all.
"""

from __future__ import annotations

import glob

import pytest
import torch

from tests.helpers import PARITY_MODEL, failed, launch_per_world, make_dataset
from tests.helpers import pp_args as pp

# 4 launches (1, 2, 4, 8 processes) in the module fixture: ~60 s here, bounded at 400 s each.
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(1800)]
WORKER = "tests/distributed/parity_worker.py"
STEPS = 5
BASE = [*PARITY_MODEL, f"--training.steps={STEPS}", "--training.grad_clip=1.0"]
REFERENCES = {
    "tied": [],
    "untied": ["--model.tie_embeddings=false"],
    "padded": ["--model.vocab_size=500", "--model.pad_vocab_multiple=64"],
}
TP, SP = "--parallel.tp", "--parallel.sequence_parallel=true"
FSDP = "--parallel.dp_mode=fsdp"  # the default, auto, would pick ddp for this small model
VOCAB = "--parallel.embedding_sharding=vocab"  # auto keeps it in FSDP's root here
RESHARD = "--parallel.fsdp_reshard_per_microbatch=true"


# name -> (world size, reference, layout overrides); layouts written as (dp, pp, tp)
CASES = {
    "tp2": (2, "tied", [f"{TP}=2"]),
    "tp2_sp": (2, "tied", [f"{TP}=2", SP]),
    "tp2_gathered_logits": (2, "tied", [f"{TP}=2", "--parallel.loss_parallel=false"]),
    "tp2_padded_vocab": (2, "padded", [f"{TP}=2", SP]),
    "fsdp2": (2, "tied", [FSDP]),
    "ddp2": (2, "tied", ["--parallel.dp_mode=ddp"]),
    "fsdp2_grad_accum": (2, "tied", [FSDP, "--training.grad_accum=2"]),
    "fsdp2_vocab_rows": (2, "tied", [FSDP, VOCAB]),
    "fsdp2_vocab_rows_untied_accum": (2, "untied", [FSDP, VOCAB, "--training.grad_accum=2"]),
    "pp2_1f1b_grad_accum": (2, "tied", [*pp(2, "1F1B", 4), "--training.grad_accum=2"]),
    "pp2_gpipe": (2, "tied", pp(2, "GPipe", 4)),
    "pp2_1f1b": (2, "tied", pp(2, "1F1B", 4)),
    "pp2_interleaved1f1b": (2, "tied", pp(2, "Interleaved1F1B", 4, 2)),
    "pp2_loopedbfs": (2, "tied", pp(2, "LoopedBFS", 4, 2)),
    "pp2_interleaved_zb": (2, "tied", pp(2, "InterleavedZeroBubble", 4, 2)),
    "pp2_zbv": (2, "tied", pp(2, "ZBVZeroBubble", 4, 2)),
    "pp2_dualpipev": (2, "tied", pp(2, "DualPipeV", 4, 2)),
    "tp4": (4, "tied", [f"{TP}=4"]),
    "fsdp4_vocab_rows_padded": (4, "padded", [FSDP, VOCAB]),
    "hsdp_2x2": (4, "tied", ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),
    "pp4_1f1b": (4, "tied", pp(4, "1F1B", 8)),
    "dp2_pp2": (4, "tied", [FSDP, *pp(2, "1F1B", 4)]),
    "dp2_pp2_auto": (4, "tied", pp(2, "1F1B", 4)),  # auto: ddp here
    "dp2_pp2_resharded": (4, "tied", [FSDP, *pp(2, "1F1B", 4), RESHARD]),
    "dp2_pp2_gpipe_resharded_untied_accum": (
        4,
        "untied",
        [FSDP, *pp(2, "GPipe", 4), RESHARD, "--training.grad_accum=2"],
    ),
    "dp2_pp2_vocab_rows": (4, "tied", [FSDP, *pp(2, "1F1B", 4), VOCAB]),
    "dp2_pp2_zbv_vocab_rows": (4, "tied", [FSDP, *pp(2, "ZBVZeroBubble", 4, 2), VOCAB]),
    "dp2_pp2_interleaved_resharded": (4, "tied", [FSDP, *pp(2, "Interleaved1F1B", 4, 2), RESHARD]),
    "dp2_tp2_sp": (4, "tied", [FSDP, f"{TP}=2", SP]),
    "dp2_tp2_vocab_rows": (4, "tied", [FSDP, f"{TP}=2", VOCAB]),
    "dp2_tp2_sp_vocab_rows_padded": (4, "padded", [FSDP, f"{TP}=2", SP, VOCAB]),
    "dp2_tp2_sp_vocab_rows_untied_accum": (
        4,
        "untied",
        [FSDP, f"{TP}=2", SP, VOCAB, "--training.grad_accum=2"],
    ),
    "pp2_tp2_tied": (4, "tied", [f"{TP}=2", *pp(2, "1F1B", 4)]),
    "pp2_tp2_untied": (4, "untied", [f"{TP}=2", *pp(2, "1F1B", 4)]),
    "dp2_pp2_tp2_fsdp_sp": (8, "tied", [FSDP, f"{TP}=2", SP, *pp(2, "1F1B", 4)]),
    "dp2_pp2_tp2_fsdp_untied": (8, "untied", [FSDP, f"{TP}=2", SP, *pp(2, "GPipe", 4)]),
    "dp2_pp2_tp2_sp_vocab_rows": (8, "tied", [FSDP, f"{TP}=2", SP, *pp(2, "1F1B", 4), VOCAB]),
    "dp2_pp2_tp2_loopedbfs_resharded": (
        8,
        "tied",
        [FSDP, f"{TP}=2", SP, *pp(2, "LoopedBFS", 4, 2), RESHARD],
    ),
    "dp2_pp2_tp2_ddp": (8, "tied", [f"{TP}=2", "--parallel.dp_mode=ddp", *pp(2, "1F1B", 4)]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Launch the reference (1 process) and each world size once; returns the output dir."""
    root = tmp_path_factory.mktemp("parity")
    data = {"tied": make_dataset(root / "data512"), "padded": make_dataset(root / "data500", 500)}

    def args_for(ref: str, layout: list[str]) -> list[str]:
        dataset = data["padded" if ref == "padded" else "tied"]
        return [f"--data.dataset={dataset}", *BASE, *REFERENCES[ref], *layout]

    launches = {0: {f"ref_{r}": args_for(r, []) for r in REFERENCES}}
    for name, (world, ref, layout) in CASES.items():
        launches.setdefault(world, {})[name] = args_for(ref, layout)
    return root / "out", failed(launch_per_world(WORKER, launches, root))


def merged(out, case: str) -> dict:
    """Union of what each stage's writer dumped; losses from the last stage (non-zero)."""
    files = sorted(glob.glob(str(out / case / "rank*.pt")))
    assert files, f"no output for {case}"
    result = {"params": {}, "grads": {}, "losses": None, "grad_norms": None}
    for f in files:
        r = torch.load(f)
        result["params"].update(r["params"])
        result["grads"].update(r["grads"])
        result["losses"], result["grad_norms"] = r["losses"], r["grad_norms"]
    return result


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_single_process(runs, case):
    out, failures = runs
    world, ref_name, _ = CASES[case]
    assert world not in failures, f"{world}-process launch failed:\n{failures[world]}"
    ref, got = merged(out, f"ref_{ref_name}"), merged(out, case)

    assert len(got["losses"]) == STEPS
    torch.testing.assert_close(got["losses"], ref["losses"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["grad_norms"], ref["grad_norms"], atol=0, rtol=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]  # the reference did train

    tied = ref_name != "untied"
    for kind, atol in (("grads", 1e-6), ("params", 1e-5)):
        names = set(got[kind]) | ({"wte.weight"} if tied else set())
        assert names >= set(ref[kind]), f"{kind} missing: {set(ref[kind]) - names}"
        for name, value in got[kind].items():
            # pp > 1 keeps a second copy of a tied embedding on the last stage
            expected = ref[kind]["wte.weight" if tied and name == "lm_head.weight" else name]
            torch.testing.assert_close(value, expected, atol=atol, rtol=0, msg=f"{kind} {name}")
