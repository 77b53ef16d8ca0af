"""Autoregressive sampling from a plain GPT (nanoGPT's loop: no KV cache, context cropped to
block_size), and loading a plain model from a DCP checkpoint or a Hugging Face export."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gpt3d.model import GPT


def load_plain_model(path: str | os.PathLike, checksums: bool = True) -> GPT:
    """A plain GPT in eval mode from a DCP checkpoint directory (step-N, any layout; its
    checksums checked unless checksums=False), a Hugging Face GPT-2 directory / .safetensors
    file or a MoE export (recipes/export.py)."""
    from gpt3d.checkpoint_dir import CHECKPOINT_META, TMP_SUFFIX, load_model_state_dict
    from gpt3d.hf import load_hf
    from gpt3d.moe_hf import is_moe_export, load_moe_hf

    path = Path(path)
    if (path / CHECKPOINT_META).is_file() or path.name.endswith(TMP_SUFFIX):  # DCP (.tmp: an error)
        cfg, sd = load_model_state_dict(path, checksums)
    elif is_moe_export(path):  # recipes/export.py of a Mixture-of-Experts model
        cfg, sd = load_moe_hf(path)
    else:
        cfg, sd = load_hf(path)
    model = GPT(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval()


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(B, T) prompt ids -> (B, T + max_new_tokens). temperature 0 = greedy; top_k keeps the
    k most likely tokens. Padded vocab rows are never sampled."""
    cfg = model.config
    for _ in range(max_new_tokens):
        logits = model(idx[:, -cfg.block_size :])[:, -1, : cfg.vocab_size]  # (B, V)
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
        else:
            logits = logits.float() / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, cfg.vocab_size)).values[:, -1:]  # (B, 1)
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
        idx = torch.cat([idx, nxt], dim=1)
    return idx
