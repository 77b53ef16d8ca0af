"""The learning-rate schedule and AdamW's decay groups, checked directly (parity tests cannot
see them: both sides of a parity comparison use the same schedule and groups)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from gpt3d.model import GPT, GPTConfig
from gpt3d.optim import build_optimizer, lr_at

LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 4, 20


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, LR * 1 / 5),  # linear warmup: (step + 1) / (warmup + 1) of lr
        (3, LR * 4 / 5),
        (WARMUP, LR),  # the cosine starts at lr
        (12, MIN_LR + 0.5 * (1 + math.cos(math.pi * 8 / 16)) * (LR - MIN_LR)),  # half way
        (DECAY, MIN_LR),
        (DECAY + 100, MIN_LR),  # after the decay: min_lr for good
    ],
)
def test_lr_schedule_values(step, expected):
    assert lr_at(step, LR, MIN_LR, WARMUP, DECAY) == pytest.approx(expected, rel=1e-12)


def test_lr_schedule_shape():
    lrs = [lr_at(s, LR, MIN_LR, WARMUP, DECAY) for s in range(DECAY + 5)]
    assert all(a < b for a, b in pairwise(lrs[: WARMUP + 1]))  # rising warmup
    assert all(a >= b for a, b in pairwise(lrs[WARMUP:]))  # then never rising
    assert max(lrs) == LR and min(lrs) == MIN_LR
    assert lr_at(0, LR, MIN_LR, 0, DECAY) == LR  # no warmup: straight to the peak


def test_decay_groups_are_matrices_only():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    params = list(dict.fromkeys(model.parameters()))  # tied wte/lm_head once
    opt = build_optimizer(params, 1e-3, 0.1, (0.9, 0.95), fused=True)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if not g["weight_decay"] for p in g["params"]}
    assert all(g["weight_decay"] in (0.0, 0.1) for g in opt.param_groups)
    assert decayed == {n for n, p in model.named_parameters() if p.dim() >= 2} - {"lm_head.weight"}
    assert "wte.weight" in decayed and "h.0.attn.q_proj.weight" in decayed
    assert all(n.endswith("bias") or ".ln_" in f".{n}" for n in plain)
    assert len(decayed) + len(plain) == len(params)  # every parameter exactly once
    assert opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.95)


def test_foreach_when_fused_is_off():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    opt = build_optimizer([p], 1e-3, 0.1, (0.9, 0.95), fused=False)
    assert opt.defaults["foreach"] and not opt.defaults.get("fused")
