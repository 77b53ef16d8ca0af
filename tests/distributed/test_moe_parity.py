"""Every expert-parallel layout gives the numbers of one process.

A Mixture-of-Experts GPT (4 layers, 8 experts top-2, sequence-wise aux loss and balancing
bias on) trains 5 AdamW steps in real torchrun workers from the same per-name initial
weights on the same global batches as a 1-process run, and must match it like the dense
parity suite: losses at every step (1e-5), grad norm (1e-5 relative), every step-1 gradient
(1e-6), every final parameter (1e-5), and every layer's balancing bias after every step
(identical: the biases move by sign(mean - tokens), integer counts summed over the dp axes).
Layouts: ep 1/2/4 with FSDP (and HSDP), ep2 with full activation checkpointing (the
recompute repeats the all-to-all), ep x pp (1F1B, Interleaved1F1B), ep x tp (experts' hidden
dim split over tp), tp with sequence parallel on a mixed dense/MoE model (also over FSDP with
the embedding table by vocabulary rows over dp_shard x tp), and ep2 x pp2 x tp2
on 8 processes. One launch per world size (tests/distributed/moe_worker.py).
"""

from __future__ import annotations

import glob

import pytest
import torch

from tests.distributed.test_parity import merged
from tests.helpers import PARITY_MODEL, failed, launch_per_world, make_dataset
from tests.helpers import pp_args as pp

# 4 launches (1, 2, 4, 8 processes): ~100 s here, each bounded at 400 s.
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(1800)]
WORKER = "tests/distributed/moe_worker.py"
STEPS = 5
MOE = ["--model.n_experts=8", "--model.moe_top_k=2", "--model.moe_aux_coef=0.01"]
BASE = [*PARITY_MODEL, *MOE, f"--training.steps={STEPS}", "--model.moe_bias_rate=0.001"]
REFERENCES = {"moe": [], "mixed": ["--model.moe_every=2"]}  # mixed: blocks 1, 3 are MoE
EP, TP, SP = "--parallel.ep", "--parallel.tp", "--parallel.sequence_parallel=true"
FSDP_ROWS = ["--parallel.dp_mode=fsdp", "--parallel.embedding_sharding=vocab"]

# name -> (world size, reference, layout overrides)
CASES = {
    "fsdp2_ep1": (2, "moe", []),
    "ep2": (2, "moe", [f"{EP}=2"]),
    "ep2_ac_full": (2, "moe", [f"{EP}=2", "--training.activation_checkpointing=full"]),
    "tp2": (2, "moe", [f"{TP}=2"]),
    "tp2_sp_mixed": (2, "mixed", [f"{TP}=2", SP]),
    "ep4": (4, "moe", [f"{EP}=4"]),
    "ep2_efsdp2": (4, "moe", [f"{EP}=2"]),  # dp_shard 4 = efsdp 2 x ep 2
    "ep2_hsdp": (4, "moe", [f"{EP}=2", "--parallel.dp_replicate=2", "--parallel.dp_shard=2"]),
    "ep2_pp2_1f1b": (4, "moe", [f"{EP}=2", *pp(2, "1F1B", 4)]),
    "ep2_pp2_interleaved": (4, "mixed", [f"{EP}=2", *pp(2, "Interleaved1F1B", 4, 2)]),
    "ep2_tp2": (4, "moe", [f"{EP}=2", f"{TP}=2"]),
    # the embedding table by vocabulary rows over dp_shard x tp (FSDP, no ep)
    "fsdp2_tp2_sp_mixed_vocab_rows": (4, "mixed", [*FSDP_ROWS, f"{TP}=2", SP]),
    "ep2_pp2_tp2_sp": (8, "moe", [f"{EP}=2", f"{TP}=2", SP, *pp(2, "1F1B", 4)]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_parity")
    data = make_dataset(root / "data")

    def args_for(ref: str, layout: list[str]) -> list[str]:
        return [f"--data.dataset={data}", *BASE, *REFERENCES[ref], *layout]

    launches = {0: {f"ref_{r}": args_for(r, []) for r in REFERENCES}}
    for name, (world, ref, layout) in CASES.items():
        launches.setdefault(world, {})[name] = args_for(ref, layout)
    return root / "out", failed(launch_per_world(WORKER, launches, root))


def biases(out, case: str) -> dict[str, list[torch.Tensor]]:
    result = {}
    for f in sorted(glob.glob(str(out / case / "bias_rank*.pt"))):
        result.update(torch.load(f))
    return result


@pytest.mark.parametrize("case", list(CASES))
def test_moe_layout_matches_single_process(runs, case):
    out, failures = runs
    world, ref_name, _ = CASES[case]
    assert world not in failures, f"{world}-process launch failed:\n{failures[world]}"
    ref, got = merged(out, f"ref_{ref_name}"), merged(out, case)

    assert len(got["losses"]) == STEPS
    torch.testing.assert_close(got["losses"], ref["losses"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["grad_norms"], ref["grad_norms"], atol=0, rtol=1e-5)
    assert ref["losses"][-1] < ref["losses"][0]  # the reference did train
    for kind, atol in (("grads", 1e-6), ("params", 1e-5)):
        names = set(got[kind]) | {"wte.weight"}
        assert names >= set(ref[kind]), f"{kind} missing: {set(ref[kind]) - names}"
        assert any(".moe.experts.w1" in n for n in got[kind])  # the experts were compared
        for name, value in got[kind].items():
            expected = ref[kind]["wte.weight" if name == "lm_head.weight" else name]
            torch.testing.assert_close(value, expected, atol=atol, rtol=0, msg=f"{kind} {name}")

    ref_bias, got_bias = biases(out, f"ref_{ref_name}"), biases(out, case)
    assert set(got_bias) == set(ref_bias) and len(ref_bias) in (2, 4)
    for name, steps in ref_bias.items():
        assert len(got_bias[name]) == STEPS
        for i, (a, b) in enumerate(zip(got_bias[name], steps, strict=True)):
            assert torch.equal(a, b), f"{name} bias after step {i + 1}: {a} != {b}"
    last = torch.stack([s[-1] for s in ref_bias.values()])
    assert last.abs().sum() > 0  # the biases did move
    dloss = max(abs(a - b) for a, b in zip(got["losses"], ref["losses"], strict=True))
    dparam = max((v - ref["params"].get(n, v)).abs().max().item() for n, v in got["params"].items())
    print(f"{case}: max |dloss| {dloss:.1e}, max |dparam| {dparam:.1e}, biases identical")
