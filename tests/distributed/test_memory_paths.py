"""What two memory paths hold, observed in real FSDP and pipeline runs (one launch each):

- FSDP's backward on CPU holds one unsharded block at a time: gpt3d turns FSDP2's default
  backward prefetch off where gloo's all-gather runs in the caller (it would overlap
  nothing and only hold the next block's parameters beside the current block's parameters
  and gradient). During backward every block is all-gathered only after the block behind
  it has reduce-scattered its gradient.
- A pipelined evaluation keeps no microbatch outputs on the last stage (torch's stage kept
  every microbatch's logits for a backward that never comes, until the next step), and
  gives one process's validation loss.
The numbers of training do not change (test_parity covers FSDP and the pipelines)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import SMALL_MODEL, make_dataset, run_script, trainer_for

pytestmark = [pytest.mark.distributed]

BASE = [*SMALL_MODEL, "--model.n_layer=4", "--training.eval_steps=2"]
LAYOUTS = {  # name -> (processes, overrides)
    "dp2 FSDP": (2, ["--parallel.dp_mode=fsdp"]),
    "dp2xpp2 FSDP resharded per microbatch": (
        4,
        [
            "--parallel.dp_mode=fsdp",
            "--parallel.pp=2",
            "--parallel.pp_microbatches=2",
            "--parallel.fsdp_reshard_per_microbatch=true",
        ],
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_paths")
    data = make_dataset(root / "data")
    ranks = {}
    for i, (name, (world, layout)) in enumerate(LAYOUTS.items()):
        args = [root / f"out{i}", f"--data.dataset={data}", *BASE, *layout]
        proc = run_script("tests/distributed/memory_paths_worker.py", args, world, timeout=100)
        assert proc.returncode == 0, proc.stderr[-3000:]
        files = sorted((root / f"out{i}").glob("rank*.json"))
        ranks[name] = [json.loads(f.read_text()) for f in files]
        assert len(ranks[name]) == world
    return data, ranks


@pytest.mark.timeout(240)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_fsdp_backward_unshards_one_block_at_a_time_on_cpu(runs, layout):
    for record in runs[1][layout]:
        assert record["device"] == "cpu"
        blocks = [(e, m) for e, m in record["events"] if m and m.startswith("h.")]
        gathered = [m for e, m in blocks if e == "all-gather"]
        assert len(set(gathered)) >= 2, blocks  # the step's backward went through the blocks
        # after a block's all-gather, the next event is its own reduce-scatter
        for (event, module), (after, module_after) in zip(blocks, blocks[1:], strict=False):
            if event == "all-gather":
                assert (after, module_after) == ("reduce-scatter", module), blocks


@pytest.mark.timeout(240)
def test_pipelined_evaluation_keeps_no_outputs_and_matches_one_process(runs):
    data, ranks = runs
    trainer = trainer_for([f"--data.dataset={data}", *BASE])
    trainer.train_step()
    expected = trainer.evaluate()
    for record in ranks["dp2xpp2 FSDP resharded per microbatch"]:
        assert record["last_stage_held"] == 0
        assert record["val_loss"] == pytest.approx(expected, abs=1e-5)
