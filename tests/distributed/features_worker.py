"""parity_worker.py for the performance features: the same cases.json -> rank*.pt dumps,
plus a steady-state check for torch.compile. After the first optimizer step (which compiles
every block) dynamo is told to fail on any recompile, so a guard that changes from step to
step (shapes, grad mode, module state) fails the launch instead of silently recompiling.

Usage: torchrun --nproc_per_node=N features_worker.py <cases.json> <out_dir>
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gpt3d.launch import guarded_main  # noqa: E402
from tests.distributed.parity_worker import run_case  # noqa: E402
from tests.helpers import cases_main  # noqa: E402


def fail_on_recompile_after_first_step(trainer) -> None:
    if trainer.cfg.training.compile and trainer.step == 1:
        assert_compiled(trainer)
        torch.compiler.set_stance("fail_on_recompile")


def assert_compiled(trainer) -> None:
    """Every rank runs compiled code: the model with its loss as one function (compile_scope
    stage, one pipeline stage), else every block of every local stage."""
    if trainer.cfg.training.compile_scope == "stage" and trainer.dims.pp == 1:
        assert trainer._model_loss != trainer._forward_with_loss, "stage scope: not compiled"
        return
    for chunk in trainer.parts.chunks:
        for name, block in chunk.h.items():
            assert block._compiled_call_impl is not None, f"block {name} is not compiled"


def run_feature_case(args: list[str], out: Path) -> None:
    run_case(args, out, after_step=fail_on_recompile_after_first_step)
    torch.compiler.set_stance("default")  # the next case compiles its own blocks


if __name__ == "__main__":
    guarded_main(cases_main(run_feature_case), sys.argv[1:])
