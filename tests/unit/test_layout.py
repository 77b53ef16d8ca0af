"""Layout, plan-file and pipeline-placement validation: no processes needed."""

from __future__ import annotations

import pytest
import torch

from gpt3d.config import load_config
from gpt3d.model import GPT, preset_config
from gpt3d.parallel.dims import resolve_dims, validate_layout
from gpt3d.parallel.pipeline import layer_split, stages_of_rank
from gpt3d.parallel.plan import PlanError, check_plan_matches, load_plan, plan_for

MODEL = ["--model.preset=tiny", "--model.n_layer=4", "--model.n_head=4", "--model.n_embd=64"]


def layout(world: int, *overrides: str):
    cfg = load_config(
        [*MODEL, "--training.global_batch_size=16", "--training.seq_len=32", *overrides]
    )
    from gpt3d.config import gpt_config

    dims = resolve_dims(cfg.parallel, world)
    validate_layout(dims, gpt_config(cfg.model), cfg.training, cfg.parallel)
    return dims


def test_dp_shard_takes_what_is_left():
    dims = layout(8, "--parallel.tp=2", "--parallel.pp=2", "--model.pad_vocab_multiple=64")
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp) == (2, 1, 2, 2)
    ddp = layout(4, "--parallel.dp_mode=ddp")
    assert (ddp.dp_replicate, ddp.dp_shard) == (4, 1)


@pytest.mark.parametrize(
    "world, overrides, message",
    [
        (
            4,
            ["--parallel.tp=2", "--parallel.dp_shard=1", "--model.pad_vocab_multiple=64"],
            "--nproc_per_node=2",
        ),
        (3, ["--parallel.tp=2"], "not divisible"),
        (3, ["--parallel.tp=3", "--parallel.dp_shard=1"], "n_head=4 is not divisible"),
        (2, ["--parallel.tp=2"], "pad_vocab_multiple"),
        (8, ["--parallel.pp=8", "--parallel.pp_microbatches=8"], "cannot fill 8 pipeline stages"),
        (2, ["--parallel.pp=2", "--parallel.pp_microbatches=1"], "at least 2 microbatches"),
        (2, ["--parallel.pp=2", "--parallel.pp_schedule=ZBVZeroBubble"], "pp_stages_per_rank=2"),
        (2, ["--parallel.pp=2", "--parallel.pp_stages_per_rank=2"], "runs one stage per rank"),
        (2, ["--parallel.pp=2", "--parallel.pp_microbatches=3"], "global_batch_size=16"),
        (4, ["--training.global_batch_size=6"], "not divisible by dp (4)"),
        (
            2,
            [
                "--parallel.tp=2",
                "--model.pad_vocab_multiple=64",
                "--parallel.sequence_parallel=true",
                "--training.seq_len=31",
            ],
            "seq_len=31",
        ),
        (2, ["--parallel.dp_mode=ddp", "--parallel.dp_shard=2"], "dp_mode='ddp'"),
        (2, ["--parallel.pp=2", "--parallel.pp_layer_split=1,1"], "pp_layer_split"),
        (
            4,
            [
                "--parallel.pp=2",
                "--parallel.pp_schedule=Interleaved1F1B",
                "--parallel.pp_stages_per_rank=2",
                "--parallel.pp_microbatches=5",
                "--training.global_batch_size=10",
            ],
            "multiple of the rounds",
        ),
    ],
)
def test_bad_layout_is_one_clear_error(world, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        layout(world, *overrides)


def test_layer_split_and_stage_placement():
    assert [len(r) for r in layer_split(6, 4)] == [1, 2, 2, 1]  # extra layers to the middle
    assert [list(r) for r in layer_split(4, 2, [1, 3])] == [[0], [1, 2, 3]]
    assert stages_of_rank(1, 4, 2, "Interleaved1F1B") == [1, 5]  # loop
    assert stages_of_rank(1, 4, 2, "ZBVZeroBubble") == [1, 6]  # V: first and last on rank 0
    assert stages_of_rank(0, 4, 2, "DualPipeV") == [0, 7]


# ---- plan files ----------------------------------------------------------------------------
def write(tmp_path, text: str):
    path = tmp_path / "plan.toml"
    path.write_text(text)
    return path


def module_names():
    with torch.device("meta"):
        return [n for n, _ in GPT(preset_config("tiny")).named_modules() if n]


@pytest.mark.parametrize("plan", ["recipes/plans/gpt_tp.toml", "recipes/plans/gpt_tp_sp.toml"])
def test_shipped_plans_load_and_match_the_model(plan):
    rules = load_plan(plan)
    check_plan_matches(rules, module_names(), plan)
    with torch.device("meta"):
        model = GPT(preset_config("tiny"))
    styles = {name: type(style).__name__ for name, style in plan_for(rules, model, True).items()}
    assert styles["h.1.attn.q_proj"] == "ColwiseParallel"
    assert styles["h.0.mlp.c_proj"] == "RowwiseParallel"
    assert styles["wte"] == "RowwiseParallel" and styles["lm_head"] == "ColwiseParallel"
    assert "h.0.attn" not in styles or styles["h.0.attn"] == "PrepareModuleInput"


def test_glob_matches_whole_name_segments():
    rules = load_plan("recipes/plans/gpt_tp_sp.toml")
    attn = next(r for r in rules if r.glob == "h.*.attn")
    assert attn.matches("h.3.attn") and not attn.matches("h.3.attn.q_proj")


def test_stage_skips_entries_for_modules_it_does_not_hold():
    from gpt3d.parallel.pipeline import build_stage_module

    rules = load_plan("recipes/plans/gpt_tp.toml")
    stage = build_stage_module(preset_config("tiny"), 1, 2, range(1, 2))
    plan = plan_for(rules, stage, True)
    assert "wte" not in plan and "lm_head" in plan and "h.0.attn.q_proj" not in plan


def test_loss_parallel_off_gathers_logits():
    from torch.distributed.tensor import Replicate

    rules = load_plan("recipes/plans/gpt_tp.toml")
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


@pytest.mark.parametrize(
    "text, message",
    [
        ("[modules.\"h.*.attn.q_proj\"\nstyle='colwise'", "not valid TOML"),
        ("[modules.\"h.*.attn.q_proj\"]\nstyle = 'colwize'", "did you mean 'colwise'"),
        (
            "[modules.\"h.*.attn.q_proj\"]\nstyle = 'colwise'\noutput_layouts = 'sharded(1)'",
            "layouts are 'replicate' or 'shard",
        ),
        (
            "[modules.\"h.*.attn.q_proj\"]\nstyle = 'colwise'\ndesired_input_layouts = 'replicate'",
            "style colwise takes",
        ),
        ("[modules.\"h.*.atn.q_proj\"]\nstyle = 'colwise'", "closest module names"),
        ("[modules.\"wte\"]\ninput_layouts = 'replicate'", "needs style"),
        ("[plan]\nx = 1", "expected \\[modules"),
    ],
)
def test_bad_plan_file_names_the_entry(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(PlanError, match=message):
        check_plan_matches(load_plan(path), module_names(), path)


def test_missing_plan_file(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "nope.toml")
