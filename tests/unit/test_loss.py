"""gpt3d's cross-entropy (gpt3d/loss.py) against torch's F.cross_entropy on the real
vocabulary columns: loss and gradient, fp32 and bf16, padded vocabularies, no grad (eval),
and the in-place gradient never leaking into what autograd saved."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt3d.loss import GlobalMeanLoss, token_loss_sum


def reference(logits: torch.Tensor, targets: torch.Tensor, vocab: int):
    """Summed torch cross-entropy over the first `vocab` columns, and d/d logits."""
    x = logits.detach().clone().requires_grad_()
    loss = F.cross_entropy(x[..., :vocab].float().flatten(0, 1), targets.flatten(), reduction="sum")
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("padded", [0, 47])
@pytest.mark.parametrize("rows", [3, 200])  # one chunk / many chunks (B * T = 600)
def test_fp32_equals_torch_cross_entropy(padded, rows, monkeypatch):
    monkeypatch.setattr("gpt3d.loss._rows_per_chunk", lambda x: rows)
    g = torch.Generator().manual_seed(0)
    V = 300
    logits = torch.randn(4, 150, V + padded, generator=g) * 3
    targets = torch.randint(0, V, (4, 150), generator=g)
    ref_loss, ref_grad = reference(logits, targets, V)
    x = logits.clone().requires_grad_()
    loss = token_loss_sum(x * 1.0, targets, V)  # x * 1: a non-leaf, as lm_head's output is
    loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(x.grad, ref_grad, rtol=0, atol=1e-6)
    assert not x.grad[..., V:].any()  # padded columns: no mass, no gradient


def test_bf16_logits_loss_in_fp32_gradient_close():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 64, 512, generator=g) * 2).bfloat16()
    targets = torch.randint(0, 500, (2, 64), generator=g)
    ref_loss, ref_grad = reference(logits, targets, 500)
    x = logits.clone().requires_grad_()
    loss = token_loss_sum(x * 1.0, targets, 500)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)  # both from bf16 logits
    torch.testing.assert_close(x.grad.float(), ref_grad.float(), rtol=0, atol=1e-2)


def test_no_grad_leaves_logits_untouched_and_scales_by_global_tokens():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 8, 70, generator=g)
    targets = torch.randint(0, 64, (2, 8), generator=g)
    before = logits.clone()
    with torch.no_grad():
        loss = GlobalMeanLoss(global_tokens=64, vocab_size=64)(logits, targets)
    assert torch.equal(logits, before)
    ref, _ = reference(logits, targets, 64)
    torch.testing.assert_close(loss, ref / 64, rtol=1e-6, atol=0)


def test_backward_scales_by_the_upstream_gradient():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 10, 32, generator=g)
    targets = torch.randint(0, 32, (1, 10), generator=g)
    _, ref_grad = reference(logits, targets, 32)
    x = logits.clone().requires_grad_()
    (3.0 * token_loss_sum(x * 1.0, targets, 32)).backward()
    torch.testing.assert_close(x.grad, 3.0 * ref_grad, rtol=0, atol=1e-6)


def test_a_saved_logits_tensor_is_an_error_not_a_silent_corruption():
    """The gradient is written over the logits: if autograd saved them for something else,
    backward must refuse (version counter), never compute with overwritten values."""
    w = torch.randn(1, 4, 16, requires_grad=True)
    logits = w * 1.0
    also_used = torch.sin(logits)  # sin saves its input: the logits themselves
    loss = token_loss_sum(logits, torch.zeros(1, 4, dtype=torch.long), 16) + also_used.sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
