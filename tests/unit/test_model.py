"""The plain GPT-2: shapes, parameter counts, causality, init, meta build, pruning."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt3d.model import GPT, PRESETS, count_params_formula, init_value, preset_config
from gpt3d.parallel.pipeline import build_stage_module

TINY = preset_config("tiny", vocab_size=300, block_size=32)


def make(cfg=TINY, seed=0) -> GPT:
    model = GPT(cfg)
    model.init_weights(seed)
    return model


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_shape_formula(name):
    for tie in (True, False):
        cfg = preset_config(name, tie_embeddings=tie)
        with torch.device("meta"):
            model = GPT(cfg)
        assert model.num_params() == count_params_formula(cfg)


def test_gpt2_preset_has_openai_parameter_count():
    with torch.device("meta"):
        assert GPT(PRESETS["gpt2"]).num_params() == 124_439_808


def test_formula_is_independent_arithmetic():
    # 12 layers x (12 C^2 + 13 C) + embeddings + final LayerNorm, written out for gpt2
    C, L, V, P = 768, 12, 50257, 1024
    assert (
        count_params_formula(PRESETS["gpt2"]) == V * C + P * C + L * (12 * C * C + 13 * C) + 2 * C
    )


def test_padded_vocab_rows_never_receive_mass_or_gradient():
    from gpt3d.loss import GlobalMeanLoss

    cfg = preset_config("tiny", vocab_size=300, pad_vocab_multiple=64, block_size=32)
    model = make(cfg)
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    assert model.wte.weight[300:].abs().sum() == 0  # padded rows start at zero
    with torch.no_grad():
        real = model(x)[..., :300]  # (B, T, V): the distribution is over real tokens only
    logits = model(x)
    assert logits.shape == (2, 16, 320)
    loss = GlobalMeanLoss(32, 300)(logits, y)
    torch.testing.assert_close(loss, F.cross_entropy(real.flatten(0, 1), y.flatten()))
    loss.backward()
    assert model.wte.weight.grad[300:].abs().sum() == 0 and model.wte.weight.grad[:300].any()


def test_causal_future_tokens_never_change_past_logits():
    model = make()
    idx = torch.randint(0, 300, (1, 20))
    changed = idx.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 300
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], atol=0, rtol=0)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_init_is_deterministic_per_seed_and_gpt2_shaped():
    a, b, c = make(seed=1), make(seed=1), make(seed=2)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(p, q), name
        if p.dim() == 2:
            assert not torch.equal(p, r), name
    assert a.lm_head.weight is a.wte.weight  # tied by default
    std = a.h["0"].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * TINY.n_layer) ** 0.5) < 3e-3  # residual projection scaling
    assert abs(a.h["0"].mlp.c_fc.weight.std().item() - 0.02) < 2e-3
    assert torch.all(a.h["0"].ln_1.weight == 1) and torch.all(a.h["0"].attn.q_proj.bias == 0)


def test_meta_build_then_materialise_equals_eager_init():
    with torch.device("meta"):
        model = GPT(TINY)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.lm_head.weight = model.wte.weight
    model.init_weights(0)
    ref = make(seed=0)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_untied_lm_head_copy_starts_equal_to_wte():
    # a pipeline's last stage holds the tied embedding as lm_head.weight
    assert torch.equal(
        init_value(TINY, "lm_head.weight", (300, 64), 5),
        init_value(TINY, "wte.weight", (300, 64), 5),
    )


def test_pipeline_stages_compose_to_the_full_model():
    cfg = preset_config("tiny", n_layer=4, vocab_size=300, block_size=32)
    full = make(cfg, seed=3)
    idx = torch.randint(0, 300, (2, 10))
    h = idx
    for stage, layers in enumerate((range(0, 1), range(1, 3), range(3, 4))):
        part = build_stage_module(cfg, stage, 3, layers)
        part.to_empty(device="cpu")
        part.init_weights(3)  # per-name init: the slice gets the full model's values
        assert list(part.h.keys()) == [str(i) for i in layers]  # names unchanged
        h = part(h)
    torch.testing.assert_close(h, full(idx), atol=1e-6, rtol=0)


def test_gelu_is_gpt2_tanh_form_and_layernorm_eps():
    model = make()
    assert model.h["0"].mlp.gelu.approximate == "tanh"
    assert model.ln_f.eps == 1e-5


def test_no_bias_and_dropout_options():
    cfg = preset_config("tiny", vocab_size=300, block_size=32, bias=False, dropout=0.1)
    model = make(cfg)
    assert model.h["0"].attn.q_proj.bias is None and model.ln_f.bias is None
    model.eval()
    idx = torch.randint(0, 300, (1, 8))
    torch.testing.assert_close(model(idx), model(idx))  # no dropout in eval
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_model_py_has_no_distributed_import():
    text = Path(__file__).resolve().parents[2].joinpath("gpt3d/model.py").read_text()
    assert not re.search(r"^\s*(import|from)\s+torch\.distributed", text, re.M)


@pytest.mark.parametrize("block", [1 << 20, 50])  # one block / regions crossing many blocks
@pytest.mark.parametrize(
    "name, shape, region",
    [
        ("wte.weight", (300, 24), (slice(0, 75), slice(0, 24))),  # vocab-parallel rows
        ("wte.weight", (300, 24), (slice(270, 320), slice(0, 24))),  # rows incl. padding
        ("h.0.mlp.c_fc.weight", (96, 24), (slice(48, 96), slice(0, 24))),  # colwise shard
        ("h.0.mlp.c_proj.weight", (24, 96), (slice(0, 24), slice(32, 64))),  # rowwise shard
        ("h.1.attn.q_proj.weight", (24, 24), (slice(5, 6), slice(3, 9))),  # FSDP x TP piece
        ("h.1.ln_1.weight", (24,), (slice(8, 16),)),
    ],
)
def test_init_of_a_shard_equals_the_shard_of_the_full_init(name, shape, region, block, monkeypatch):
    """Layout independence of the initial weights: a rank drawing only its region gets the
    whole tensor's values there, wherever the region cuts the blocks."""
    import gpt3d.model as model_lib

    monkeypatch.setattr(model_lib, "INIT_BLOCK_ELEMENTS", block)
    cfg = preset_config("tiny", vocab_size=250, n_embd=24, pad_vocab_multiple=1)
    full = init_value(cfg, name, shape, seed=7)
    assert torch.equal(init_value(cfg, name, shape, 7, region), full[region])
    assert full.std() > 0 or ".ln_" in name  # drawn, not a constant
    if name == "wte.weight":
        assert not full[250:].any() and full[:250].all()  # padded rows start at zero
