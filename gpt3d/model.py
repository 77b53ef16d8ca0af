"""GPT-2, plain PyTorch. No torch.distributed here: parallelism is applied from outside.

Parameter names are the contract with plan files, the pipeline split, checkpoints and the
Hugging Face mapping (gpt3d/hf.py):

    wte.weight, wpe.weight,
    h.{i}.ln_1.{weight,bias}, h.{i}.attn.{q_proj,k_proj,v_proj,c_proj}.{weight,bias},
    h.{i}.ln_2.{weight,bias}, h.{i}.mlp.{c_fc,c_proj}.{weight,bias},
    ln_f.{weight,bias}, lm_head.weight   (tied to wte.weight unless tie_embeddings=False)

A Mixture-of-Experts block (n_experts > 0, see GPTConfig.is_moe_layer) has h.{i}.moe in place
of h.{i}.mlp: h.{i}.moe.router.weight, h.{i}.moe.experts.{w1,w2} and the persistent buffer
h.{i}.moe.expert_bias (gpt3d/moe.py).

Blocks live in a ModuleDict keyed "0".."n_layer-1"; a pipeline stage deletes the blocks it
does not own and sets wte/wpe/drop or ln_f/lm_head to None, and forward() still works.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt3d.moe import IMPLS, MoE

GPT2_VOCAB_SIZE = 50257


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = GPT2_VOCAB_SIZE  # real tokens; targets are always < vocab_size
    pad_vocab_multiple: int = 1  # pad embedding rows to a multiple (nanoGPT: 64 -> 50304)
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    ln_eps: float = 1e-5
    # Mixture of Experts (gpt3d/moe.py). n_experts = 0: every block has the dense MLP.
    n_experts: int = 0  # routed experts per MoE block
    moe_top_k: int = 2  # experts each token is sent to (dropless: always all k)
    moe_every: int = 1  # block i is MoE iff i % moe_every == moe_every - 1 (1: every block)
    moe_hidden: int = 0  # expert hidden width; 0: 4 * n_embd // moe_top_k (dense MLP's FLOPs)
    moe_aux_coef: float = 0.0  # sequence-wise balance loss coefficient (DeepSeek-V3 alpha); 0 off
    moe_bias_rate: float = 0.0  # aux-loss-free balancing bias step (DeepSeek-V3 gamma); 0 off
    moe_impl: str = "auto"  # expert matmuls: "grouped_mm", "loop", or "auto" (grouped if supported)

    def is_moe_layer(self, i: int) -> bool:
        """Block i holds a MoE: the last block of every group of moe_every (moe_every=2:
        blocks 1, 3, 5, ...; the first block stays dense)."""
        return self.n_experts > 0 and i % self.moe_every == self.moe_every - 1

    @property
    def expert_hidden(self) -> int:
        return self.moe_hidden or 4 * self.n_embd // self.moe_top_k

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


_MOE = dict(n_experts=8, moe_top_k=2, moe_aux_coef=1e-4, moe_bias_rate=1e-3)

PRESETS: dict[str, GPTConfig] = {
    # OpenAI's GPT-2 family (vocab 50257, context 1024).
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # Small shapes for CPU runs and tests (GPT-2 tokenizer, so vocab stays 50257).
    "mini": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=128),
    # Mixture of Experts, 8 experts top-2 in every block, DeepSeek-V3 balancing settings.
    "moe-mini": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=256, **_MOE),
    "gpt2-moe": GPTConfig(n_layer=12, n_head=12, n_embd=768, **_MOE),
}


def preset_config(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None})


def describe(cfg: GPTConfig) -> str:
    """One line for logs: 'n layers, n heads, n_embd C, block_size T, vocab V (tied ...)'."""
    tied = "tied" if cfg.tie_embeddings else "untied"
    moe = f", {cfg.n_experts} experts top-{cfg.moe_top_k}" if cfg.n_experts else ""
    return (
        f"{cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, block_size "
        f"{cfg.block_size}, vocab {cfg.vocab_size} ({tied} embeddings){moe}"
    )


def count_params_formula(cfg: GPTConfig, active: bool = False) -> int:
    """Parameter count from the shape alone (used to check the module tree). active=True:
    the parameters one token uses (a MoE block's router and top-k experts only)."""
    C, V, b = cfg.n_embd, cfg.padded_vocab_size, int(cfg.bias)
    ln_attn = (2 * C + 2 * b * C) + 4 * (C * C + b * C)  # two LayerNorms, q/k/v/c_proj
    mlp = (4 * C * C + b * 4 * C) + (4 * C * C + b * C)
    E, k = cfg.n_experts, cfg.moe_top_k
    moe = E * C + (k if active else E) * 2 * C * cfg.expert_hidden  # router, w1 + w2
    blocks = sum(ln_attn + (moe if cfg.is_moe_layer(i) else mlp) for i in range(cfg.n_layer))
    head = 0 if cfg.tie_embeddings else V * C
    return V * C + cfg.block_size * C + blocks + (C + b * C) + head


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        C = cfg.n_embd
        # Separate q/k/v so column-parallel sharding splits whole heads (a fused c_attn would not).
        self.q_proj = nn.Linear(C, C, bias=cfg.bias)
        self.k_proj = nn.Linear(C, C, bias=cfg.bias)
        self.v_proj = nn.Linear(C, C, bias=cfg.bias)
        self.c_proj = nn.Linear(C, C, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # (B, T, C_local) -> (B, nh_local, T, hd); nh_local = n_head / tp under tensor parallel.
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, nh_local, T, hd) -> (B, T, C_local)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(self.gelu(self.c_fc(x))))


def make_moe(cfg: GPTConfig) -> MoE:
    return MoE(
        cfg.n_embd,
        cfg.expert_hidden,
        cfg.n_experts,
        cfg.moe_top_k,
        cfg.moe_aux_coef,
        cfg.moe_bias_rate,
        cfg.moe_impl,
    )


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps, bias=cfg.bias)
        # Exactly one of mlp / moe: the names say which kind of block this is.
        moe = cfg.is_moe_layer(layer)
        self.mlp: MLP | None = None if moe else MLP(cfg)
        self.moe: MoE | None = make_moe(cfg) if moe else None
        self.moe_drop = nn.Dropout(cfg.dropout) if moe else None  # MLP drops inside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        if self.moe is not None:
            return x + self.moe_drop(self.moe(self.ln_2(x)))
        return x + self.mlp(self.ln_2(x))


def check_moe_config(cfg: GPTConfig) -> None:
    """ValueError for MoE settings the layer cannot run."""
    if cfg.n_experts < 0 or cfg.moe_every < 1 or cfg.moe_hidden < 0:
        raise ValueError(
            "n_experts and moe_hidden must be >= 0 and moe_every >= 1, got "
            f"{cfg.n_experts}, {cfg.moe_hidden}, {cfg.moe_every}"
        )
    if cfg.n_experts and not 1 <= cfg.moe_top_k <= cfg.n_experts:
        raise ValueError(f"moe_top_k ({cfg.moe_top_k}) must be in 1..n_experts ({cfg.n_experts})")
    if cfg.moe_aux_coef < 0 or cfg.moe_bias_rate < 0:
        raise ValueError("moe_aux_coef and moe_bias_rate must be >= 0 (0 turns them off)")
    if cfg.moe_impl not in IMPLS:
        raise ValueError(f"moe_impl must be one of {IMPLS}, got {cfg.moe_impl!r}")


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
        check_moe_config(cfg)
        self.config = cfg
        V = cfg.padded_vocab_size
        self.wte: nn.Embedding | None = nn.Embedding(V, cfg.n_embd)
        self.wpe: nn.Embedding | None = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop: nn.Dropout | None = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layer)})
        self.ln_f: nn.LayerNorm | None = nn.LayerNorm(cfg.n_embd, eps=cfg.ln_eps, bias=cfg.bias)
        self.lm_head: nn.Linear | None = nn.Linear(cfg.n_embd, V, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (needed after building on the meta device): the
        MoE layers' token counts and aux-loss record."""
        for block in self.h.values():
            if block.moe is not None:
                block.moe.reset_stats()

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) token ids, or (B, T, C) hidden states when this stage has no embeddings.
        Returns (B, T, padded_vocab) logits, or (B, T, C) hidden states without an lm_head.
        Columns >= vocab_size of a padded vocabulary are not tokens: use logits[..., :V]
        (gpt3d's loss and sampling only ever look at those; the padded rows stay zero)."""
        x = idx
        if self.wte is not None:
            pos = torch.arange(idx.size(1), device=idx.device)  # (T,)
            x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C)
        for block in self.h.values():
            x = block(x)
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.lm_head is not None:
            x = self.lm_head(x)  # (B, T, padded_vocab)
        return x

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 init, deterministic per parameter name: any subset of the model (a pipeline
        stage) gets exactly the values the whole model would."""
        for name, p in self.named_parameters():
            p.copy_(init_value(self.config, name, p.shape, seed).to(p.device, p.dtype))
        for block in self.h.values():
            if block.moe is not None:
                block.moe.expert_bias.zero_()  # persistent state: starts unbiased
        self.reset_buffers()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


INIT_BLOCK_ELEMENTS = 1 << 16  # init is drawn in blocks of whole rows, 256 KiB of fp32 each


def init_value(cfg: GPTConfig, name: str, shape: torch.Size, seed: int, region=None):
    """Initial value of parameter `name` (full shape `shape`) as a CPU fp32 tensor, or only
    the part `region` (a tuple of slices, one per dim: a rank's shard) of it.

    Values never depend on the layout: each parameter is drawn in fixed blocks of whole rows
    (dim 0), each block from its own generator seeded with (seed, name, block), so a shard
    gets exactly the values the whole model would while drawing only the blocks its rows
    overlap and holding one block at a time; a pipeline stage gets the whole model's values
    too. lm_head.weight reuses wte's stream when tied (the two pipeline-stage copies of a
    tied embedding start equal)."""
    region = tuple(region) if region is not None else tuple(slice(0, n) for n in shape)
    out_shape = region_shape(shape, region)
    if name.endswith(".bias"):
        return torch.zeros(out_shape)
    if ".ln_" in f".{name}":
        return torch.ones(out_shape)
    if name == "lm_head.weight" and cfg.tie_embeddings:
        name = "wte.weight"
    std = 0.02
    # Residual output projections (GPT-2 paper), the experts' w2 included. The MoE router and
    # experts' w1 keep 0.02 like the dense c_fc.
    if name.endswith(("c_proj.weight", "experts.w2")):
        std = 0.02 / math.sqrt(2 * cfg.n_layer)
    out = _normal_rows(name, shape, region, out_shape, seed) * std
    if name in ("wte.weight", "lm_head.weight"):  # padded vocab rows start (and stay) zero
        first = region[0].indices(shape[0])[0]
        out[max(0, cfg.vocab_size - first) :] = 0.0
    return out


def region_shape(shape, region: tuple) -> list[int]:
    """Shape of tensor[region] for a tensor of `shape` (region: one slice per dim)."""
    return [len(range(*r.indices(n))) for r, n in zip(region, shape, strict=True)]


def _normal_rows(name: str, shape, region: tuple, out_shape: list, seed: int) -> torch.Tensor:
    """N(0, 1) values of `region` of a (shape) tensor drawn block by block over dim 0."""
    rows_per_block = max(1, INIT_BLOCK_ELEMENTS // max(math.prod(shape[1:]), 1))
    lo, hi, _ = region[0].indices(shape[0])
    out = torch.empty(out_shape)
    for block in range(lo // rows_per_block, (hi - 1) // rows_per_block + 1 if hi > lo else 0):
        b0, b1 = block * rows_per_block, min((block + 1) * rows_per_block, shape[0])
        key = zlib.crc32(f"{name}#{block}".encode())
        gen = torch.Generator().manual_seed((seed * 1_000_003 + key) % 2**63)
        values = torch.randn([b1 - b0, *shape[1:]], generator=gen)  # (rows of block, ...)
        a, z = max(lo, b0), min(hi, b1)
        out[a - lo : z - lo] = values[(slice(a - b0, z - b0), *region[1:])]
    return out
