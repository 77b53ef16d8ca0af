"""Layout, plan-file and pipeline-placement validation: no processes needed."""

from __future__ import annotations

import pytest
import torch

from gpt3d.config import gpt_config, load_config
from gpt3d.errors import PlanError
from gpt3d.model import GPT, preset_config
from gpt3d.parallel.dims import resolve_dims
from gpt3d.parallel.pipeline import layer_split, stages_of_rank
from gpt3d.parallel.tensor_parallel import (
    PLANS_DIR,
    check_plan_matches,
    load_plan,
    plan_for,
    plan_path,
)
from gpt3d.preflight import check_layout
from tests.helpers import model_args

MODEL = model_args(4, 4, 64)
GPT_TP, GPT_TP_SP = PLANS_DIR / "gpt_tp.toml", PLANS_DIR / "gpt_tp_sp.toml"


def layout(world: int, *overrides: str):
    cfg = load_config(
        [*MODEL, "--training.global_batch_size=16", "--training.seq_len=32", *overrides]
    )
    dims = resolve_dims(cfg.parallel, world)
    check_layout(dims, gpt_config(cfg.model), cfg.training, cfg.parallel)
    return dims


def test_dp_shard_takes_what_is_left():
    dims = layout(8, "--parallel.tp=2", "--parallel.pp=2", "--model.pad_vocab_multiple=64")
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp) == (2, 1, 2, 2)
    ddp = layout(4, "--parallel.dp_mode=ddp")
    assert (ddp.dp_replicate, ddp.dp_shard) == (4, 1)


def test_layer_split_and_stage_placement():
    assert [len(r) for r in layer_split(6, 4)] == [1, 2, 2, 1]  # extra layers to the middle
    assert [list(r) for r in layer_split(4, 2, [1, 3])] == [[0], [1, 2, 3]]
    assert stages_of_rank(1, 4, 2, "Interleaved1F1B") == [1, 5]  # loop
    assert stages_of_rank(1, 4, 2, "ZBVZeroBubble") == [1, 6]  # V: first and last on rank 0
    assert stages_of_rank(0, 4, 2, "DualPipeV") == [0, 7]


# ---- plan files ----------------------------------------------------------------------------
def module_names():
    with torch.device("meta"):
        return [n for n, _ in GPT(preset_config("tiny")).named_modules() if n]


@pytest.mark.parametrize("plan", [GPT_TP, GPT_TP_SP])
def test_shipped_plans_load_and_match_the_model(plan):
    rules = load_plan(plan)
    check_plan_matches(rules, module_names(), plan)
    with torch.device("meta"):
        model = GPT(preset_config("tiny"))
    styles = {name: type(style).__name__ for name, style in plan_for(rules, model, True).items()}
    assert styles["h.1.attn.q_proj"] == "ColwiseParallel"
    assert styles["h.0.mlp.c_proj"] == "RowwiseParallel"
    # "rowwise" on an nn.Embedding: gpt3d's vocab-parallel embedding (a RowwiseParallel)
    assert styles["wte"] == "VocabParallelEmbedding" and styles["lm_head"] == "ColwiseParallel"
    assert "h.0.attn" not in styles or styles["h.0.attn"] == "PrepareModuleInput"


def test_glob_matches_whole_name_segments():
    rules = load_plan(GPT_TP_SP)
    attn = next(r for r in rules if r.glob == "h.*.attn")
    assert attn.matches("h.3.attn") and not attn.matches("h.3.attn.q_proj")


def test_stage_skips_entries_for_modules_it_does_not_hold():
    from gpt3d.parallel.pipeline import build_stage_module

    rules = load_plan(GPT_TP)
    stage = build_stage_module(preset_config("tiny"), 1, 2, range(1, 2))
    plan = plan_for(rules, stage, True)
    assert "wte" not in plan and "lm_head" in plan and "h.0.attn.q_proj" not in plan


def test_loss_parallel_off_gathers_logits():
    from torch.distributed.tensor import Replicate

    rules = load_plan(GPT_TP)
    with torch.device("meta"):
        style = plan_for(rules, GPT(preset_config("tiny")), loss_parallel=False)["lm_head"]
    assert (
        isinstance(
            style.output_layouts[0]
            if isinstance(style.output_layouts, tuple)
            else style.output_layouts,
            Replicate,
        )
        and style.use_local_output
    )


def test_missing_plan_file(tmp_path):
    with pytest.raises(PlanError, match="not found"):
        load_plan(tmp_path / "nope.toml")


def test_plan_names_and_paths(tmp_path):
    assert plan_path("", sequence_parallel=False) == GPT_TP
    assert plan_path("", sequence_parallel=True) == GPT_TP_SP
    assert plan_path("gpt_tp_sp", sequence_parallel=False) == GPT_TP_SP
    mine = tmp_path / "mine.toml"
    assert plan_path(str(mine), sequence_parallel=False) == mine
    with pytest.raises(PlanError, match="not a shipped plan"):
        plan_path("gpt_tpp", sequence_parallel=False)


@pytest.mark.parametrize(
    "world, overrides, mode, why",
    [
        (2, [], "ddp", "auto: the unsharded model state"),  # tiny model: replicate
        (8, ["--model.n_layer=48", "--model.n_head=25", "--model.n_embd=1600"], "fsdp", "over"),
        (2, ["--parallel.dp_shard=2"], "fsdp", "ask for sharding"),
        (2, ["--parallel.dp_mode=fsdp"], "fsdp", "(parallel.dp_mode)"),
        (2, ["--parallel.dp_mode=ddp"], "ddp", "(parallel.dp_mode)"),
    ],
)
def test_dp_mode_auto_replicates_only_what_fits_comfortably(world, overrides, mode, why):
    from gpt3d.preflight import choose_dp_mode

    cfg = load_config([*MODEL, *overrides])
    reason = choose_dp_mode(cfg, gpt_config(cfg.model), world)
    assert cfg.parallel.dp_mode == mode and why in reason, reason
