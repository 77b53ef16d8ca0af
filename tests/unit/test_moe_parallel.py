"""Expert parallelism without a process group: the MoE rules of preflight (each one clear
UserError before any collective), the plan files' [experts] section, the ep sub-axis in the
layout, and the dispatcher's regrouping order."""

from __future__ import annotations

import pytest
import torch

from gpt3d.config import load_config
from gpt3d.errors import ConfigError, PlanError, UserError
from gpt3d.parallel.dims import resolve_dims
from gpt3d.parallel.expert_parallel import expert_major_order
from gpt3d.parallel.tensor_parallel import PLANS_DIR, load_plan, plan_path
from gpt3d.preflight import preflight
from tests.helpers import make_dataset, model_args

MOE = [*model_args(4, 4, 64), "--model.n_experts=8", "--model.moe_top_k=2"]
BASE = ["--training.seq_len=32", "--training.global_batch_size=16", "--training.eval_interval=0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4000, n_val=1000)


def run(data, args, world=1):
    return preflight(load_config([f"--data.dataset={data}", *BASE, *args]), world)


def error(data, args, world=1) -> str:
    with pytest.raises(UserError) as info:
        run(data, args, world)
    message = str(info.value)
    assert "\n" not in message.strip()
    return message


# name -> (world size, args, text the one-line message contains)
MOE_ERRORS = {
    "ep on a dense model": (2, [*model_args(4, 4, 64), "--parallel.ep=2"], "needs a Mixture"),
    "ep does not divide dp_shard": (2, [*MOE, "--parallel.ep=4"], "must divide dp_shard=2"),
    "ep with tp leaves no dp_shard": (
        4,
        [*MOE, "--parallel.ep=4", "--parallel.tp=2"],
        "dp_shard=2",
    ),
    "experts not divisible by ep": (
        4,
        [*model_args(4, 4, 64), "--model.n_experts=6", "--parallel.ep=4"],
        "n_experts=6 is not divisible by parallel.ep=4",
    ),
    "ep with ddp": (2, [*MOE, "--parallel.ep=2", "--parallel.dp_mode=ddp"], "dp_mode=fsdp"),
    "top-k above experts": (1, [*MOE, "--model.moe_top_k=9"], "moe_top_k (9)"),
    "moe options on a dense model": (1, [*model_args(4, 4, 64), "--model.moe_top_k=2"], "dense"),
    "expert hidden vs tp": (
        2,
        [*MOE, "--model.moe_hidden=33", "--parallel.tp=2"],
        "hidden width 33 is not divisible by parallel.tp=2",
    ),
    "compile with ep": (
        2,
        [*MOE, "--parallel.ep=2", "--training.compile=true"],
        "training.compile",
    ),
    "dense-only plan under tp": (
        2,
        [*MOE, "--parallel.tp=2", "--parallel.plan=gpt_tp"],
        "no [experts] rule for the MoE experts",
    ),
    "dense-only plan under ep": (
        2,
        [*MOE, "--parallel.ep=2", "--parallel.plan=gpt_tp"],
        "no [experts] rule",
    ),
}


@pytest.mark.parametrize("case", list(MOE_ERRORS))
def test_moe_errors_are_one_clear_line_before_any_collective(data, case):
    world, args, text = MOE_ERRORS[case]
    assert text in error(data, args, world)


def test_init_from_is_refused_for_a_moe_model_even_with_a_real_file(data, tmp_path):
    from gpt3d.hf import save_hf
    from gpt3d.model import GPT, preset_config

    cfg = preset_config("tiny", n_layer=4, n_head=4, n_embd=64, block_size=32, vocab_size=512)
    save_hf(tmp_path / "hf", GPT(cfg).state_dict(), cfg)
    args = [*MOE, f"--checkpoint.init_from={tmp_path / 'hf'}"]
    assert "cannot start a Mixture-of-Experts model" in error(data, args)


def test_ep_is_a_sub_axis_of_dp_shard(data):
    r = run(data, [*MOE, "--parallel.ep=2"], world=4)
    assert (r.dims.dp_shard, r.dims.ep, r.dims.efsdp, r.dims.world_size) == (4, 2, 2, 4)
    assert "dp_shard=4 (ep=2)" in r.dims.describe()
    assert [x.glob for x in r.ep_rules] == ["h.*.moe.experts"]
    assert r.tp_rules == ()  # tp = 1: no tensor-parallel rules applied
    dense = resolve_dims(load_config([]).parallel, 4)
    assert dense.ep == 1 and "(ep=" not in dense.describe()


def test_moe_models_default_to_the_moe_plans(data):
    assert plan_path("", False, moe=True).name == "gpt_moe.toml"
    assert plan_path("", True, moe=True).name == "gpt_moe_sp.toml"
    assert plan_path("", False).name == "gpt_tp.toml"
    r = run(data, [*MOE, "--parallel.tp=2", "--parallel.sequence_parallel=true"], world=2)
    globs = {x.glob for x in r.tp_rules}
    assert {"h.*.moe", "h.*.moe_drop", "h.*.attn.q_proj"} <= globs
    assert [x.glob for x in r.ep_rules] == ["h.*.moe.experts"]


@pytest.mark.parametrize("every", [1, 2])
def test_moe_plan_fits_all_moe_and_mixed_models(data, every):
    """The dense-MLP rules are optional: an all-MoE model has no h.*.mlp to match."""
    r = run(data, [*MOE, f"--model.moe_every={every}", "--parallel.tp=2"], world=2)
    assert any(x.glob == "h.*.mlp.c_fc" and x.optional for x in r.tp_rules)


def test_shipped_moe_plans_parse(tmp_path):
    for name in ("gpt_moe", "gpt_moe_sp"):
        rules = load_plan(PLANS_DIR / f"{name}.toml")
        experts = [r for r in rules if r.section == "experts"]
        assert [(r.glob, r.style) for r in experts] == [("h.*.moe.experts", "expert_parallel")]


PLAN_ERRORS = {
    "tp style on the experts": (
        '[modules."h.*.moe.experts"]\nstyle = "colwise"\n'
        '[experts."h.*.moe.experts"]\nstyle = "expert_parallel"\n',
        "tensor-parallel styles cannot split stacked experts",
    ),
    "experts rule on another module": (
        '[experts."h.*.moe.router"]\nstyle = "expert_parallel"\n',
        "expert rules apply to the MoE experts",
    ),
    "unknown expert style": ('[experts."h.*.moe.experts"]\nstyle = "expert"\n', "unknown style"),
    "expert style in modules": ('[modules."h.*.attn"]\nstyle = "expert_parallel"\n', "unknown"),
    "optional not a bool": (
        '[experts."h.*.moe.experts"]\nstyle = "expert_parallel"\noptional = "yes"\n',
        "true or false",
    ),
    "no table at all": ('description = "empty"\n', "no such table"),
}


@pytest.mark.parametrize("case", list(PLAN_ERRORS))
def test_plan_file_errors_for_experts(data, tmp_path, case):
    text, match = PLAN_ERRORS[case]
    plan = tmp_path / "plan.toml"
    plan.write_text(text)
    with pytest.raises(PlanError, match=match):
        run(data, [*MOE, "--parallel.ep=2", f"--parallel.plan={plan}"], world=2)


@pytest.mark.parametrize("world, ep, efsdp", [(2, 2, 1), (4, 2, 2)])
def test_moe_ep2_recipe_preflights(data, world, ep, efsdp):
    """recipes/configs/moe_ep2.toml on 2 and 4 processes (synthetic tokens stand in for the
    prepared Shakespeare)."""
    from tests.helpers import REPO

    recipe = str(REPO / "recipes/configs/moe_ep2.toml")
    args = ["--config", recipe, f"--data.dataset={data}", "--model.vocab_size=512"]
    r = preflight(load_config(args), world)
    assert (r.dims.ep, r.dims.efsdp, r.model.n_experts, r.model.moe_top_k) == (ep, efsdp, 8, 2)


def test_dense_model_with_dense_plan_is_unchanged(data):
    r = run(data, [*model_args(4, 4, 64), "--parallel.tp=2"], world=2)
    assert r.ep_rules == () and {x.glob for x in r.tp_rules} >= {"h.*.mlp.c_fc"}


def test_check_moe_config_values_become_config_errors(data):
    with pytest.raises(ConfigError, match="moe_hidden"):
        run(data, [*MOE, "--model.moe_hidden=-1"])


# ---- the dispatcher's regrouping ---------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_expert_major_order_groups_rows_by_expert_keeping_source_order(seed):
    g = torch.Generator().manual_seed(seed)
    P, E = 1 + seed % 4, 1 + (seed * 7) % 3
    by_source = torch.randint(0, 4, (P, E), generator=g)  # zeros included
    # Rows as they arrive: source-major, each tagged (local expert, source, index in segment).
    rows = [(e, s, i) for s in range(P) for e in range(E) for i in range(int(by_source[s, e]))]
    order = expert_major_order(by_source)
    assert [rows[i] for i in order.tolist()] == sorted(rows)  # expert, then source, then i
