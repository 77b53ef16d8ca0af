"""The Mixture-of-Experts layer: against a per-token reference, grouped GEMM vs loop,
DeepSeek-V3 balancing (bias, sequence-wise aux loss), and the model around it."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gpt3d.model import GPT, PRESETS, count_params_formula, init_value, preset_config
from gpt3d.moe import (
    GroupedExperts,
    MoE,
    aux_loss_total,
    expert_counts,
    moe_layers,
    reset_moe_stats,
    sequence_aux_loss,
    set_aux_scale,
    update_expert_biases,
)
from gpt3d.parallel.pipeline import build_stage_module

DENSE = preset_config("tiny", vocab_size=300, block_size=32)
MOE = preset_config("tiny", vocab_size=300, block_size=32, n_layer=4, n_experts=4, moe_every=2)


def make(cfg, seed=0) -> GPT:
    model = GPT(cfg)
    model.init_weights(seed)
    return model


def make_moe(E=4, k=2, C=16, H=32, seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(C, H, E, k, **kw)
    with torch.no_grad():
        moe.router.weight.normal_(0, 0.5)  # spread the scores so top-k choices differ
    return moe


def reference_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token: sum over its k best (score + bias) experts of score * expert(x)."""
    B, T, C = x.shape
    w1, w2 = moe.experts.w1, moe.experts.w2
    rows = []
    for xt in x.reshape(-1, C):
        s = torch.softmax(moe.router.weight @ xt, dim=-1)  # (E,)
        chosen = torch.argsort(s + moe.expert_bias, descending=True)[: moe.top_k]
        experts = [F.gelu(xt @ w1[e], approximate="tanh") @ w2[e] for e in chosen.tolist()]
        rows.append(sum(s[e] * y for e, y in zip(chosen.tolist(), experts, strict=True)))
    return torch.stack(rows).view(B, T, C)


def grads(module, *tensors):
    return [p.grad.clone() for p in module.parameters()] + [t.grad.clone() for t in tensors]


# --- the model around the layer ---------------------------------------------------------


def test_dense_model_unchanged_when_n_experts_is_zero():
    model = make(DENSE)
    names = [n for n, _ in model.named_parameters()]
    assert not any("moe" in n for n in names)
    assert not any("moe" in n for n in model.state_dict())  # no MoE buffers either
    per_block = ["ln_1.weight", "ln_1.bias"]
    per_block += [
        f"attn.{m}.{t}"
        for m in ("q_proj", "k_proj", "v_proj", "c_proj")
        for t in ("weight", "bias")
    ]
    per_block += ["ln_2.weight", "ln_2.bias"]
    per_block += [f"mlp.{m}.{t}" for m in ("c_fc", "c_proj") for t in ("weight", "bias")]
    blocks = [f"h.{i}.{n}" for i in range(DENSE.n_layer) for n in per_block]
    assert names == ["wte.weight", "wpe.weight", *blocks, "ln_f.weight", "ln_f.bias"]
    assert model.num_params() == count_params_formula(DENSE) == count_params_formula(DENSE, True)


@pytest.mark.parametrize(
    "every, n_layer, moe_blocks", [(1, 3, [0, 1, 2]), (2, 4, [1, 3]), (3, 6, [2, 5]), (4, 2, [])]
)
def test_which_blocks_are_moe(every, n_layer, moe_blocks):
    cfg = preset_config("tiny", n_layer=n_layer, n_experts=4, moe_every=every)
    with torch.device("meta"):
        model = GPT(cfg)
    assert [i for i in range(n_layer) if cfg.is_moe_layer(i)] == moe_blocks
    for key, block in model.h.items():
        assert (block.moe is not None) == (int(key) in moe_blocks) == (block.mlp is None)
    assert sorted(moe_layers(model)) == [f"h.{i}.moe" for i in moe_blocks]


def test_moe_block_names_and_buffer_persistence():
    model = make(MOE)
    params = {n for n, _ in model.named_parameters() if n.startswith("h.1.")}
    moe = {"h.1.moe.router.weight", "h.1.moe.experts.w1", "h.1.moe.experts.w2"}
    assert moe <= params and not any(".mlp." in n for n in params)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items() if ".moe." in n}
    C, H, E = MOE.n_embd, MOE.expert_hidden, MOE.n_experts
    assert MOE.expert_hidden == 4 * C // MOE.moe_top_k
    assert shapes == {
        "h.1.moe.router.weight": (E, C),
        "h.1.moe.experts.w1": (E, C, H),
        "h.1.moe.experts.w2": (E, H, C),
        "h.1.moe.expert_bias": (E,),
        "h.3.moe.router.weight": (E, C),
        "h.3.moe.experts.w1": (E, C, H),
        "h.3.moe.experts.w2": (E, H, C),
        "h.3.moe.expert_bias": (E,),
    }


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(moe_every=1, tie_embeddings=False),
        dict(bias=False, moe_hidden=40, moe_top_k=1),
        dict(n_experts=8, moe_top_k=3, pad_vocab_multiple=64),
    ],
)
def test_moe_parameter_count_formula_matches_module_tree(kw):
    cfg = preset_config("tiny", vocab_size=300, n_layer=4, **{"n_experts": 4, "moe_every": 2, **kw})
    with torch.device("meta"):
        assert GPT(cfg).num_params() == count_params_formula(cfg)
    # active: one token uses the router and k of E experts of each MoE block
    E, k, C, H = cfg.n_experts, cfg.moe_top_k, cfg.n_embd, cfg.expert_hidden
    n_moe = sum(map(cfg.is_moe_layer, range(cfg.n_layer)))
    inactive = n_moe * (E - k) * 2 * C * H
    assert count_params_formula(cfg, active=True) == count_params_formula(cfg) - inactive


def test_moe_presets():
    for name in ("moe-mini", "gpt2-moe"):
        cfg = PRESETS[name]
        assert (cfg.n_experts, cfg.moe_top_k) == (8, 2)
        with torch.device("meta"):
            assert GPT(cfg).num_params() == count_params_formula(cfg)
    assert (PRESETS["moe-mini"].n_layer, PRESETS["moe-mini"].n_embd) == (4, 128)
    # gpt2-moe: top-2 of 8 experts of half width: a token uses gpt2's matmul parameters,
    # plus the routers, minus the dense MLP biases (experts have none)
    active = count_params_formula(PRESETS["gpt2-moe"], active=True)
    C = 768
    assert active - count_params_formula(PRESETS["gpt2"]) == 12 * (8 * C - 5 * C)


def test_moe_init_is_per_name_with_scaled_output_projection():
    model = make(MOE, seed=1)
    moe = model.h["1"].moe
    assert abs(moe.router.weight.std().item() - 0.02) < 3e-3
    assert abs(moe.experts.w1.std().item() - 0.02) < 1e-3
    assert abs(moe.experts.w2.std().item() - 0.02 / math.sqrt(2 * MOE.n_layer)) < 1e-3
    assert torch.equal(
        moe.experts.w2, init_value(MOE, "h.1.moe.experts.w2", moe.experts.w2.shape, 1)
    )
    assert not torch.equal(moe.experts.w1, model.h["3"].moe.experts.w1)
    assert torch.all(moe.expert_bias == 0)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(moe_top_k=5), "moe_top_k"),
        (dict(moe_every=0), "moe_every"),
        (dict(moe_impl="fast"), "moe_impl"),
        (dict(moe_aux_coef=-1.0), "aux_coef"),
    ],
)
def test_bad_moe_settings_raise_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GPT(preset_config("tiny", n_experts=4, **kw))


# --- the layer against a per-token reference -----------------------------------------


@pytest.mark.parametrize(
    "k, dtype", [(1, torch.float32), (2, torch.float32), (3, torch.float32), (2, torch.float64)]
)
def test_moe_matches_per_token_reference_forward_and_backward(k, dtype):
    moe = make_moe(E=4, k=k).to(dtype)
    moe.expert_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1]))  # biased choice, same formula
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(3, 5, 16, dtype=dtype)
    moe(x).backward(g)
    got = grads(moe, x)
    out = moe(x)
    moe.zero_grad()
    x.grad = None
    ref = reference_moe(moe, x)
    ref.backward(g)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(got, grads(moe, x), strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_dropless_every_token_reaches_its_k_experts_even_when_all_pick_the_same():
    moe = make_moe(E=4, k=2)
    moe.expert_bias.copy_(torch.tensor([5.0, 0.0, 5.0, 0.0]))  # everyone picks experts 0 and 2
    moe.train()
    x = torch.randn(2, 6, 16)
    out = moe(x)
    assert moe.tokens_per_expert.tolist() == [12, 0, 12, 0]
    torch.testing.assert_close(out, reference_moe(moe, x), atol=1e-6, rtol=1e-5)


def test_bias_changes_selection_but_never_the_combine_weights():
    moe = make_moe(E=4, k=1)
    x = torch.randn(1, 8, 16)
    scores = torch.softmax(x[0] @ moe.router.weight.t(), -1)  # (T, E)
    assert (scores.argmax(-1) != 3).any()  # unbiased, some tokens prefer other experts
    moe.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # now all choose expert 3
    w1, w2 = moe.experts.w1[3], moe.experts.w2[3]
    expert3 = F.gelu(x[0] @ w1, approximate="tanh") @ w2  # (T, C)
    expected = scores[:, 3:] * expert3  # weight = unbiased score, not score + 10
    torch.testing.assert_close(moe(x)[0], expected, atol=1e-6, rtol=1e-5)


# --- grouped GEMM vs loop ------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_equals_loop_path_bitwise(dtype):
    torch.manual_seed(0)
    counts = torch.tensor([0, 5, 0, 9, 2, 0])  # empty experts first, middle, last
    x0 = torch.randn(int(counts.sum()), 16).to(dtype)
    g = torch.randn(int(counts.sum()), 16).to(dtype)
    results = []
    for impl in ("grouped_mm", "loop"):
        torch.manual_seed(1)
        ex = GroupedExperts(16, 32, 6, impl).to(dtype)
        x = x0.clone().requires_grad_()
        y = ex(x, counts)
        y.backward(g)
        results.append([y, x.grad, ex.w1.grad, ex.w2.grad])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_moe_layer_grouped_and_loop_agree_bitwise():
    outs = []
    for impl in ("grouped_mm", "loop"):
        moe = make_moe(impl=impl, aux_coef=0.1).train()
        x = torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
        moe(x).square().sum().backward()
        outs.append(grads(moe, x))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_grouped_mm_backward_takes_a_stride_zero_gradient():
    ex = GroupedExperts(16, 32, 3, "grouped_mm")
    x = torch.randn(7, 16, requires_grad=True)
    ex(x, torch.tensor([3, 0, 4])).sum().backward()  # sum sends an expanded (stride-0) grad
    assert x.grad.shape == x.shape and ex.w1.grad is not None


def test_auto_picks_the_loop_where_grouped_mm_cannot_run():
    counts = torch.tensor([2, 3])
    for dtype, C in ((torch.float64, 16), (torch.float32, 6)):  # no fp64; rows not 16 bytes
        ex = GroupedExperts(C, 8, 2, "auto").to(dtype)
        ref = GroupedExperts(C, 8, 2, "loop").to(dtype)
        ref.load_state_dict(ex.state_dict())
        x = torch.randn(5, C, dtype=dtype)
        assert torch.equal(ex(x, counts), ref(x, counts))
    with pytest.raises(ValueError, match="grouped_mm"):
        GroupedExperts(6, 8, 2, "grouped_mm")(torch.randn(5, 6), counts)


# --- balancing: counts, bias update, sequence-wise aux loss ------------------------------


def test_counts_are_recorded_in_training_only_and_reset():
    model = make(MOE)
    idx = torch.randint(0, 300, (2, 8))
    model.eval()
    model(idx)
    assert expert_counts(model).sum() == 0
    model.train()
    model(idx)
    model(idx)
    counts = expert_counts(model)
    assert counts.shape == (2, 4) and counts.dtype == torch.int64
    assert counts.sum(1).tolist() == [2 * 2 * 8 * MOE.moe_top_k] * 2  # 2 forwards, N*k each
    reset_moe_stats(model)
    assert expert_counts(model).sum() == 0 and aux_loss_total(model) == 0


def test_update_bias_is_the_centred_sign_rule():
    moe = make_moe(E=4, bias_rate=0.1)
    moe.update_bias(torch.tensor([1, 2, 3, 10]))  # mean 4: signs +, +, +, - then centred
    torch.testing.assert_close(moe.expert_bias, torch.tensor([0.05, 0.05, 0.05, -0.15]))
    moe.update_bias(torch.tensor([5, 5, 5, 5]))  # balanced: no change
    torch.testing.assert_close(moe.expert_bias, torch.tensor([0.05, 0.05, 0.05, -0.15]))
    off = make_moe(E=4)  # rate 0: balancing off
    off.update_bias(torch.tensor([1, 2, 3, 10]))
    assert torch.all(off.expert_bias == 0)


def test_update_expert_biases_takes_the_stacked_counts_of_every_layer():
    model = make(preset_config("tiny", vocab_size=300, n_layer=2, n_experts=4, moe_bias_rate=0.5))
    model.train()
    model(torch.randint(0, 300, (2, 8)))
    counts = expert_counts(model)
    counts += 1  # what an all-reduce over the data-parallel ranks would do, in place
    update_expert_biases(model, counts)
    for row, moe in zip(counts, moe_layers(model).values(), strict=True):
        c = row.float()
        step = 0.5 * torch.sign(c.mean() - c)
        torch.testing.assert_close(moe.expert_bias, step - step.mean())
        assert moe.tokens_per_expert.sum() == row.sum() - 4  # the layer's own copy untouched


def two_by_two_case(coef=0.3):
    """E=2, k=1, C=4: a token e0 scores (3/4, 1/4), a token e1 scores (1/4, 3/4)."""
    moe = MoE(4, 8, n_experts=2, top_k=1, aux_coef=coef).train()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[math.log(3), 0, 0, 0], [0, math.log(3), 0, 0]]))
    e0, e1 = torch.eye(4)[0], torch.eye(4)[1]
    x = torch.stack([torch.stack([e0, e0]), torch.stack([e1, e0])])  # (B=2, T=2, C=4)
    return moe, x


def test_sequence_aux_loss_equals_hand_computed_value():
    # seq 0: both tokens pick expert 0: f = E/(kT) * (2, 0) = (2, 0), P = (3/4, 1/4) -> 1.5
    # seq 1: one token each:            f = (1, 1),                 P = (1/2, 1/2) -> 1.0
    moe, x = two_by_two_case(coef=0.3)
    scores = torch.softmax(x @ moe.router.weight.t(), -1)
    ids = scores.argmax(-1, keepdim=True)
    torch.testing.assert_close(sequence_aux_loss(scores, ids), torch.tensor(2.5))
    moe(x)  # default scale: coef / sequences in the batch
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.3 * 2.5 / 2))
    moe.reset_stats()
    set_aux_scale(moe, 0.01)  # what the trainer sets: coef / global sequences
    moe(x)
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.01 * 2.5))
    uniform = torch.full((3, 5, 4), 0.25)  # a uniform router scores 1 per sequence
    assert sequence_aux_loss(uniform, torch.randint(0, 4, (3, 5, 2))).item() == pytest.approx(3)


def test_aux_loss_gradient_reaches_the_router_through_the_autoscaler():
    moe, x = two_by_two_case(coef=0.3)
    x = x + 0.1 * torch.randn_like(x)
    moe.aux_scale = 0.7
    out = moe(x)  # forward value is the plain layer output
    moe.aux_coef = 0.0
    torch.testing.assert_close(out, moe(x), atol=0, rtol=0)
    out.square().sum().backward()  # the aux loss is not in this loss, yet gets its gradient
    got = moe.router.weight.grad.clone()
    moe.zero_grad()
    y = moe(x)  # reference: add 0.7 * aux to the loss by hand
    scores = torch.softmax(x @ moe.router.weight.t(), -1)
    aux = sequence_aux_loss(scores, scores.argmax(-1, keepdim=True))
    (y.square().sum() + 0.7 * aux).backward()
    torch.testing.assert_close(got, moe.router.weight.grad, atol=1e-7, rtol=1e-6)
    assert not torch.allclose(got, torch.autograd.grad(moe(x).square().sum(), moe.router.weight)[0])


def test_activation_checkpoint_recompute_counts_tokens_once():
    moe = make_moe(aux_coef=0.1).train()
    x = torch.randn(2, 6, 16, requires_grad=True)
    moe(x).sum().backward()
    plain = grads(moe, x), moe.tokens_per_expert.clone(), moe.aux_loss.clone()
    moe.zero_grad()
    moe.reset_stats()
    x.grad = None
    checkpoint(moe, x, use_reentrant=False).sum().backward()  # forward runs again in backward
    assert torch.equal(moe.tokens_per_expert, plain[1]) and torch.equal(moe.aux_loss, plain[2])
    for a, b in zip(grads(moe, x), plain[0], strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- pipeline split ------------------------------------------------------------------


def test_pipeline_stages_of_a_moe_model_compose_and_carry_aux_gradients():
    cfg = preset_config(
        "tiny",
        vocab_size=300,
        block_size=32,
        n_layer=4,
        n_experts=4,
        moe_every=2,
        moe_aux_coef=0.5,
        tie_embeddings=False,
    )
    full = make(cfg, seed=3).train()
    set_aux_scale(full, 0.25)
    idx = torch.randint(0, 300, (2, 10))
    weight = torch.randn(2, 10, 300)
    (full(idx) * weight).sum().backward()
    full_params = dict(full.named_parameters())
    parts, outs, ins = [], [], []
    h = idx
    for stage, layers in enumerate((range(0, 1), range(1, 3), range(3, 4))):
        part = build_stage_module(cfg, stage, 3, layers)
        part.to_empty(device="cpu")
        part.init_weights(3)  # per-name init: the pruned model gets the full model's values
        for name, p in part.named_parameters():
            assert torch.equal(p, full_params[name]), name
        part.train()
        set_aux_scale(part, 0.25)
        h = h.detach().requires_grad_(stage > 0)
        ins.append(h)
        h = part(h)
        parts.append(part)
        outs.append(h)
    torch.testing.assert_close(h, full(idx), atol=1e-6, rtol=0)
    (h * weight).sum().backward()  # then hand each stage its output gradient, as PP does
    for stage in (1, 0):
        outs[stage].backward(ins[stage + 1].grad)
    for part in parts:
        for name, p in part.named_parameters():
            torch.testing.assert_close(p.grad, full_params[name].grad, atol=1e-6, rtol=1e-5)
    assert sorted(moe_layers(parts[1])) == ["h.1.moe"] and expert_counts(parts[0]).numel() == 0
    total = sum(aux_loss_total(p) for p in parts)
    torch.testing.assert_close(total, aux_loss_total(full) / 2)  # full ran forward twice


def test_moe_py_has_no_distributed_import():
    text = Path(__file__).resolve().parents[2].joinpath("gpt3d/moe.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+torch\.distributed", text, re.M)
