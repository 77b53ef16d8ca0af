"""Honest peers for gpt3d's benchmarks: the fastest straightforward implementation a user
would pick instead, written here (not a copy of gpt3d's math, not a copy of nanoGPT's code).

NanoStyleGPT is GPT-2 the way nanoGPT writes it: one fused q/k/v Linear (c_attn), Linear
layers with biases (addmm), SDPA, the vocabulary padded to 50304 with *no* mask (the padded
logits simply take part in the softmax), F.cross_entropy on the full logits, a tied head.
NanoStyleLoop is nanoGPT's training step: forward with targets, backward,
clip_grad_norm_, AdamW with nanoGPT's decay groups (fused where the device has it),
zero_grad(set_to_none=True); bf16 through torch.autocast like nanoGPT's `ctx`.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F


class NanoStyleBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)  # q | k | v in one matmul
        self.attn_proj = nn.Linear(n_embd, n_embd)
        self.c_fc, self.mlp_proj = nn.Linear(n_embd, 4 * n_embd), nn.Linear(4 * n_embd, n_embd)
        self.n_head = n_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class NanoStyleGPT(nn.Module):
    def __init__(self, n_layer: int, n_head: int, n_embd: int, vocab: int, block_size: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, n_embd), nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(NanoStyleBlock(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, 50304)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    @torch.no_grad()
    def load_gpt3d(self, sd: dict[str, torch.Tensor]) -> None:
        """gpt3d's weights (same init): q/k/v concatenated into c_attn."""
        self.wte.weight.copy_(sd["wte.weight"])
        self.wpe.weight.copy_(sd["wpe.weight"])
        for i, b in enumerate(self.h):
            p = f"h.{i}."
            for x in ("weight", "bias"):
                getattr(b.c_attn, x).copy_(torch.cat([sd[f"{p}attn.{q}_proj.{x}"] for q in "qkv"]))
                getattr(b.attn_proj, x).copy_(sd[f"{p}attn.c_proj.{x}"])
                getattr(b.c_fc, x).copy_(sd[f"{p}mlp.c_fc.{x}"])
                getattr(b.mlp_proj, x).copy_(sd[f"{p}mlp.c_proj.{x}"])
                getattr(b.ln_1, x).copy_(sd[f"{p}ln_1.{x}"])
                getattr(b.ln_2, x).copy_(sd[f"{p}ln_2.{x}"])
        self.ln_f.weight.copy_(sd["ln_f.weight"])
        self.ln_f.bias.copy_(sd["ln_f.bias"])


class NanoStyleLoop:
    """nanoGPT's step on random batches (x, y) from `batches()`."""

    def __init__(self, model: NanoStyleGPT, batches, bf16: bool = False, lr: float = 1e-4):
        self.model, self.batches = model, batches
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
        fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
        self.opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)
        device = next(model.parameters()).device.type
        self.ctx = (
            torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        )

    def step(self) -> float:
        x, y = self.batches()
        with self.ctx:
            loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()
