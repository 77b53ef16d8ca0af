"""Performance features keep every layout's numbers (the 3D parity tests, with features on).

Same method as test_parity.py: real torchrun workers train 5 steps from the same per-name
initial weights on the same batches as the 1-process fp32 reference.

- fp32 activation checkpointing (full / selective) and torch.compile: exact, the parity
  tolerances (loss 1e-5, grad norm 1e-5 relative, step-1 grads 1e-6, final params 1e-5).
  Compile cases also fail on any recompile after the first step (features_worker.py).
- bf16 (autocast without data parallelism, FSDP2 MixedPrecisionPolicy with it): compute in
  bf16 while master weights, gradients and gradient reductions stay fp32 (checked by dtype).
  bf16 keeps ~3 significant digits, so the loss *trajectory* is compared with
  BF16_LOSS_ATOL and the grad norm with BF16_NORM_RTOL. Final parameters are not compared
  by value: Adam turns tiny gradient differences into steps of size ~lr, so their distance
  from fp32 is bounded by lr x steps whatever the precision.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.test_parity import BASE, STEPS, merged
from tests.helpers import failed, launch_per_world, make_dataset
from tests.helpers import pp_args as pp

# 5 launches in the module fixture (~55 s here, the compile one pays a cold inductor compile)
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(1800)]
WORKER = "tests/distributed/features_worker.py"
TP, SP = "--parallel.tp", "--parallel.sequence_parallel=true"
AC_FULL = "--training.activation_checkpointing=full"
AC_SEL = ["--training.activation_checkpointing=selective", "--training.ac_every=2"]
COMPILE, BF16 = "--training.compile=true", "--training.dtype=bfloat16"
STAGE = "--training.compile_scope=stage"
FSDP = "--parallel.dp_mode=fsdp"  # the default, auto, would pick ddp for this small model

# Documented bf16 tolerances against the fp32 reference (loss ~6.2, falling ~0.07 in the 5
# steps). Measured on CPU: loss within 8e-5, grad norm within 6e-4 relative (>10x margin).
BF16_LOSS_ATOL = 1e-3
BF16_NORM_RTOL = 5e-3

# name -> (world size, layout + feature overrides); world 0 = plain python, 1 process
EXACT = {
    "ac_full": (0, [AC_FULL]),
    "ac_selective": (0, AC_SEL),
    "tp2_sp_ac_full": (2, [f"{TP}=2", SP, AC_FULL]),
    "fsdp2_ac_full": (2, [FSDP, AC_FULL]),
    "pp2_1f1b_ac_selective": (2, [*pp(2, "1F1B", 4), *AC_SEL]),
    "pp2_tp2_ac_full": (4, [f"{TP}=2", *pp(2, "1F1B", 4), AC_FULL]),
    "fsdp2_pp2_ac_selective": (4, [FSDP, *pp(2, "Interleaved1F1B", 4, 2), *AC_SEL]),
    # one compile launch (cold inductor compile costs ~15 s per process on CPU)
    "compile_fsdp2": (-2, [FSDP, COMPILE]),
    "compile_pp2_ac_full": (-2, [COMPILE, *pp(2, "1F1B", 4), AC_FULL]),
    "compile_stage_fsdp2": (-2, [FSDP, COMPILE, STAGE]),  # model + loss in one graph
    "compile_stage_pp2": (-2, [COMPILE, STAGE, *pp(2, "1F1B", 4)]),
}
BF16_CASES = {
    "bf16": (0, [BF16]),
    "bf16_tp2_sp": (2, [BF16, f"{TP}=2", SP]),
    "bf16_fsdp2": (2, [FSDP, BF16]),
    "bf16_ddp2": (2, ["--parallel.dp_mode=ddp", BF16]),  # FSDP2's replicate (fp32 CPU: GradSync)
    "bf16_pp2_gpipe": (2, [BF16, *pp(2, "GPipe", 4)]),
    "bf16_dp2_tp2_ac": (4, [FSDP, BF16, f"{TP}=2", AC_FULL]),
    "bf16_fsdp2_pp2": (4, [FSDP, BF16, *pp(2, "1F1B", 4)]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch per world size (compile cases in their own 2-process launch)."""
    root = tmp_path_factory.mktemp("features")
    data = make_dataset(root / "data")
    launches: dict[int, dict] = {0: {"ref": [f"--data.dataset={data}", *BASE]}}
    for name, (world, layout) in {**EXACT, **BF16_CASES}.items():
        launches.setdefault(world, {})[name] = [f"--data.dataset={data}", *BASE, *layout]
    inductor = {"TORCHINDUCTOR_CACHE_DIR": str(root / "inductor")}
    return root / "out", failed(launch_per_world(WORKER, launches, root, env=inductor))


def _load(runs, name: str, world: int) -> tuple[dict, dict]:
    out, failures = runs
    assert 0 not in failures, f"reference launch failed:\n{failures[0]}"
    assert world not in failures, f"launch of world {world} failed:\n{failures[world]}"
    return merged(out, "ref"), merged(out, name)


def _same_names(kind: str, got: dict, ref: dict):
    """(name, value, reference value); the last stage's lm_head is a copy of tied wte."""
    names = set(got[kind]) | {"wte.weight"}
    assert names >= set(ref[kind]), f"{kind} missing: {set(ref[kind]) - names}"
    for name, value in got[kind].items():
        yield name, value, ref[kind]["wte.weight" if name == "lm_head.weight" else name]


@pytest.mark.parametrize("case", list(EXACT))
def test_fp32_feature_is_exact(runs, case):
    ref, got = _load(runs, case, EXACT[case][0])
    assert len(got["losses"]) == STEPS
    torch.testing.assert_close(got["losses"], ref["losses"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["grad_norms"], ref["grad_norms"], atol=0, rtol=1e-5)
    for kind, atol in (("grads", 1e-6), ("params", 1e-5)):
        for name, value, expected in _same_names(kind, got, ref):
            torch.testing.assert_close(value, expected, atol=atol, rtol=0, msg=f"{kind} {name}")


@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bf16_tracks_fp32_with_fp32_master_weights(runs, case):
    ref, got = _load(runs, case, BF16_CASES[case][0])
    torch.testing.assert_close(got["losses"], ref["losses"], atol=BF16_LOSS_ATOL, rtol=0)
    torch.testing.assert_close(got["grad_norms"], ref["grad_norms"], atol=0, rtol=BF16_NORM_RTOL)
    assert got["losses"][-1] < got["losses"][0]  # it trains
    for kind in ("params", "grads"):
        for name, value, _ in _same_names(kind, got, ref):
            assert value.dtype == torch.float32, f"{kind} {name} is {value.dtype}, not fp32"
