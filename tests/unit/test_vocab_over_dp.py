"""parallel.embedding_sharding: which layouts keep the table sharded by vocabulary rows over
dp_shard (x tp) (gpt3d/parallel/vocab_over_dp.py), what `auto` picks, which plan files the
rows can stand in for, the error when it is asked for where it cannot work, and that the
planner resolves it as recipes/train.py does. The numbers
(losses, gradients, parameters against one process) are in tests/distributed/test_parity.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gpt3d.config import load_config
from gpt3d.errors import ConfigError
from gpt3d.parallel.tensor_parallel import PLANS_DIR, load_plan
from gpt3d.parallel.vocab_over_dp import sequence_split, table_rules_why_not, without_table_rules
from gpt3d.planner.layout import Layout, Workload
from gpt3d.preflight import preflight

TINY = ["--model.preset=tiny", "--model.pad_vocab_multiple=64", "--parallel.dp_mode=fsdp"]


def resolved(world: int, *args: str) -> tuple[str, str]:
    run = preflight(load_config([*TINY, *args]), world)
    return run.config.parallel.embedding_sharding, run.embedding_choice


def test_auto_shards_by_rows_when_the_gathered_tokens_are_few():
    # 2 ranks x 4 sequences x 64 tokens = 512 gathered rows against 50304 vocabulary rows
    mode, why = resolved(2, "--training.global_batch_size=8", "--training.seq_len=64")
    assert mode == "vocab"
    assert "auto: 512 gathered tokens per microbatch, at most half the 50304-row" in why


def test_auto_keeps_the_table_in_fsdp_when_the_gathered_tokens_outgrow_it():
    # 2 ranks x 128 x 128 = 32768 gathered rows: more than half of 50304
    mode, why = resolved(2, "--training.global_batch_size=256", "--training.seq_len=128")
    assert mode == "fsdp"
    assert "auto: 32768 gathered tokens per microbatch, over half" in why
    # gradient accumulation makes the microbatch, and so the gathered tokens, smaller
    args = ["--training.global_batch_size=256", "--training.seq_len=128"]
    assert resolved(2, *args, "--training.grad_accum=4")[0] == "vocab"


def test_with_tp_the_rows_span_dp_shard_and_tp_and_pay_against_a_tp_ranks_rows():
    mode, why = resolved(
        4, "--parallel.tp=2", "--training.global_batch_size=8", "--training.seq_len=64"
    )
    assert mode == "vocab"
    assert why == (
        "vocabulary rows over dp_shard x tp (auto: 512 gathered tokens per microbatch, at most "
        "half the 50304-row vocabulary's 25152 rows per tp rank)"
    )
    # 2 x 64 x 128 = 16384 gathered tokens: at most half of 50304 rows, over half of 25152
    args = ["--training.global_batch_size=128", "--training.seq_len=128"]
    assert resolved(2, *args)[0] == "vocab"
    assert resolved(4, "--parallel.tp=2", *args)[0] == "fsdp"


@pytest.mark.parametrize(
    ("plan", "seq_split"),
    [("gpt_tp", False), ("gpt_tp_sp", True), ("gpt_moe", False), ("gpt_moe_sp", True)],
)
def test_the_rows_stand_in_for_the_shipped_plans_table_rules(plan, seq_split):
    rules = load_plan(PLANS_DIR / f"{plan}.toml")
    assert table_rules_why_not(rules, loss_parallel=True) == ""
    assert sequence_split(rules) is seq_split
    dropped = {r.glob for r in rules} - {r.glob for r in without_table_rules(rules)}
    assert dropped == {"wte", "lm_head"}


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            ('[modules."lm_head"]\nstyle = "colwise"', '[modules."lm_head"]\nstyle = "rowwise"'),
            "a colwise lm_head rule",
        ),
        (("use_local_output = false", "use_local_output = true"), "DTensor logits"),
        (
            (
                'output_layouts = "shard(1)"       # reduce-scatter: (B',
                'output_layouts = "shard(2)" # (',
            ),
            "wte output_layouts replicate or shard(1)",
        ),
    ],
)
def test_a_plan_with_other_table_rules_keeps_the_table_in_fsdp(tmp_path, edit, reason):
    text = (PLANS_DIR / "gpt_tp_sp.toml").read_text()
    assert edit[0] in text
    plan = tmp_path / "plan.toml"
    plan.write_text(text.replace(edit[0], edit[1], 1))
    args = ["--parallel.tp=2", f"--parallel.plan={plan}", "--parallel.sequence_parallel=true"]
    assert reason in table_rules_why_not(load_plan(plan), loss_parallel=True)
    mode, why = resolved(4, *args)
    assert mode == "fsdp" and reason in why
    with pytest.raises(ConfigError, match="the table rules of gpt3d's shipped plans"):
        resolved(4, *args, "--parallel.embedding_sharding=vocab")


@pytest.mark.parametrize(
    ("world", "args", "reason"),
    [
        (2, ["--parallel.tp=2"], "dp_shard > 1"),  # tp takes the whole world
        (4, ["--parallel.tp=2", "--parallel.loss_parallel=false"], "parallel.loss_parallel"),
        (4, ["--parallel.tp=2", "--training.seq_len=63"], "training.seq_len divisible by tp"),
        (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"], "no dp_replicate"),
        (2, ["--parallel.dp_mode=ddp"], "dp_mode=fsdp"),
    ],
)
def test_asking_for_rows_where_they_cannot_work_is_a_config_error(world, args, reason):
    with pytest.raises(ConfigError, match="parallel.embedding_sharding=vocab: it needs") as e:
        resolved(world, "--parallel.embedding_sharding=vocab", *args)
    assert reason in str(e.value)
    # auto on the same layout quietly keeps the table in FSDP (or has no FSDP root at all)
    assert resolved(world, *args)[0] == "fsdp"


def test_an_explicit_fsdp_is_kept_and_said():
    mode, why = resolved(2, "--parallel.embedding_sharding=fsdp")
    assert (mode, why) == ("fsdp", "in FSDP's root group (parallel.embedding_sharding)")


@pytest.mark.parametrize(
    ("batch", "layout"),
    [
        (8, Layout(dp_shard=2)),
        (256, Layout(dp_shard=2)),
        (256, Layout(dp_shard=2, grad_accum=4)),
        (8, Layout(dp_shard=2, tp=2)),
        (8, Layout(dp_shard=2, tp=2, sequence_parallel=True)),
        (128, Layout(dp_shard=2, tp=2)),
        (128, Layout(dp_shard=2)),
        (8, Layout(dp_shard=2, tp=2, pp=2, microbatches=2)),
        (8, Layout(dp_shard=2, embedding="fsdp")),
        (8, Layout(dp_shard=4, pp=2, microbatches=2)),
        (512, Layout(dp_shard=2, pp=2, microbatches=2)),
        (512, Layout(dp_shard=2, pp=2, microbatches=8)),
    ],
)
def test_the_planner_resolves_auto_as_the_run_does(batch, layout):
    by_rows(batch, layout)


def by_rows(batch: int, layout: Layout) -> bool:
    """Whether a run on this layout shards the table by rows; asserts the planner agrees."""
    run = preflight(
        load_config(
            [
                *TINY,
                f"--training.global_batch_size={batch}",
                "--training.seq_len=128",
                f"--training.grad_accum={layout.grad_accum}",
                f"--parallel.dp_shard={layout.dp_shard}",
                f"--parallel.tp={layout.tp}",
                f"--parallel.sequence_parallel={str(layout.sequence_parallel).lower()}",
                f"--parallel.pp={layout.pp}",
                f"--parallel.pp_microbatches={layout.microbatches if layout.pp > 1 else 0}",
                f"--parallel.embedding_sharding={layout.embedding}",
            ]
        ),
        layout.world,
    )
    w = Workload(run.model, 128, batch, "float32", (), 1, "cpu")
    assert layout.table_by_rows(w) == (run.config.parallel.embedding_sharding == "vocab")
    return layout.table_by_rows(w)


def test_pipeline_microbatches_count_in_auto():
    # 512 sequences over dp 2 and 2 microbatches: 2 x 128 x 128 gathered rows, too many;
    # over 8 microbatches: 2 x 32 x 128, at most half of 50304
    lay = Layout(dp_shard=2, pp=2, microbatches=2)
    assert not by_rows(512, lay)
    assert by_rows(512, replace(lay, microbatches=8))
