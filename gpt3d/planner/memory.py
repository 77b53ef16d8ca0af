"""Analytic memory of one rank: parameters, gradients, AdamW state, activations, temporaries.

MemoryBreakdown is the contract every estimator returns (this analytic one; the fake-tensor
one over gpt3d's real build path comes next), so the search and the report do not care
which produced it.

Model state. gpt3d keeps fp32 master weights, fp32 gradients (FSDP reduce_dtype fp32) and
fp32 AdamW exp_avg + exp_avg_sq, plus one fp32 `step` scalar per parameter tensor (fused
AdamW). Sharding, as gpt3d builds it:
  tp        q/k/v/c_fc (weight and bias), attn/mlp c_proj weights, wte and lm_head rows;
            LayerNorms, the two row-parallel biases and the position table are replicated
  pp        a stage holds its blocks (gpt3d.parallel.pipeline.layer_split); stage 0 wte + wpe,
            the last stage ln_f + lm_head. A tied lm_head is its own copy when pp > 1, so the
            V schedules' rank 0 (first and last stage) holds both copies
  dp_shard  FSDP / HSDP divide everything; DDP divides nothing
Activations, bytes per token of one microbatch for one block (Korthikanti et al. 2022,
"Reducing Activation Recomputation", sec. 4: sbh(34 + 5as/h) in 16-bit without tp). gpt3d's
SDPA (flash / memory-efficient) keeps no s x s matrix, so 5as/h becomes the attention output
plus a logsumexp; without dropout the masks (2 of the 34 bytes) are gone. What is saved, in
units of C: LN inputs x, x1 (2, residual-stream dtype), LN outputs as the matmuls save them
(2), q, k, v and the attention output (4), c_fc output and GELU output (4 + 4): 16 C.
  tp            the 12 C of q/k/v/attention/MLP are split; the 4 C around LayerNorms are not
  + SP          the LayerNorm inputs (2 C) are split too; the all-gathered LN outputs that
                the column-parallel matmuls save are not (torch DTensor saves the gathered
                tensor, unlike Megatron's re-gather)
  AC full       a block keeps only its input; one block is recomputed at a time in backward
  AC selective  gpt3d checkpoints blocks i with i % ac_every == 0 (whole blocks)
Checked against benchmarks/results/bench_memory*.json (saved-tensor peaks, fp32): exact to
< 1 % for 1 process, FSDP, DDP, tp2, tp2+SP, tp4, GPipe and 1F1B (tests/unit/test_planner.py).
Temporaries: the last stage's logits path (log-probs gradient and logits gradient, fp32,
B x T x V/tp each); FSDP without pp: two blocks (current + prefetched) unsharded in the param
dtype plus their unsharded gradients, and the root (embeddings, head) the whole step; FSDP
with pp: the stage's parameters stay unsharded and its gradients accumulate unsharded in fp32
for the whole step (reshard_after_forward=False, no gradient sync until the last microbatch);
DDP (FSDP-based replicate) in bf16: a bf16 copy of every parameter; bf16 without data
parallel: autocast's cache of bf16 weight casts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpt3d.model import GPTConfig
from gpt3d.planner.layout import Layout, Workload
from gpt3d.planner.schedules import HEAD_RETAINED, W_RETAINED, local_stages, residency

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class MemoryBreakdown:
    """Peak bytes one rank holds, by kind."""

    params: float
    grads: float
    optimizer: float
    activations: float  # tensors saved for backward at the rank's peak
    temporaries: float  # transient buffers at that peak (logits/CE, unsharded params/grads)
    pp_rank: int = 0  # which pipeline rank this is (the fullest one)
    detail: dict = field(default_factory=dict)  # named sub-terms, bytes

    @property
    def model_state(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_state + self.activations + self.temporaries


@dataclass(frozen=True)
class ParamCounts:
    """Elements per tp rank of each kind of piece, and parameter tensors per piece."""

    block: float  # one transformer block
    block_tensors: int
    wte: float  # also lm_head when it is a separate tensor
    wpe: float
    ln_f: float
    ln_f_tensors: int

    @classmethod
    def of(cls, cfg: GPTConfig, tp: int) -> ParamCounts:
        if getattr(cfg, "n_experts", 0):
            raise ValueError("the planner does not model Mixture-of-Experts blocks yet")
        C, b = cfg.n_embd, int(cfg.bias)
        sharded = 12 * C * C + b * (3 * C + 4 * C)  # q/k/v w+b, c_proj w, c_fc w+b, c_proj w
        replicated = 2 * (C + b * C) + b * 2 * C  # ln_1, ln_2, row-parallel biases
        return cls(
            sharded / tp + replicated,
            8 * (1 + b),
            cfg.padded_vocab_size * C / tp,
            cfg.block_size * C,
            C + b * C,
            1 + b,
        )


def stage_params(cfg: GPTConfig, counts: ParamCounts, lay: Layout, stage: int, n_layers: int):
    """(elements, tensors, non-block elements) of one stage on one tp rank."""
    first, last = stage == 0, stage == lay.n_stages - 1
    numel, tensors = n_layers * counts.block, n_layers * counts.block_tensors
    root = 0.0
    if first:
        root += counts.wte + counts.wpe
        tensors += 2
    if last:
        root += counts.ln_f
        tensors += counts.ln_f_tensors
        if not cfg.tie_embeddings or lay.pp > 1:  # a separate lm_head (or the tied copy)
            root += counts.wte
            tensors += 1
    return numel + root, tensors, root


@dataclass(frozen=True)
class ActTerms:
    """Bytes per token of one microbatch."""

    layer: float  # one block, everything it saves
    layer_ckpt: float  # one checkpointed block: its input
    embed: float  # stage 0: token ids (int64) (+ dropout mask)
    head: float  # last stage: ln_f input, lm_head input, log-probs (fp32)
    logits_temp: float  # last stage, transient: log-probs gradient + logits gradient (fp32)

    @classmethod
    def of(cls, w: Workload, lay: Layout) -> ActTerms:
        cfg, tp = w.model, lay.tp
        a = DTYPE_BYTES[w.dtype]
        autocast = w.dtype == "bfloat16" and lay.dp == 1  # residual stream stays fp32
        res = 4 if autocast else a
        sp = tp if lay.sequence_parallel else 1  # what the sequence split divides
        C, V, H = cfg.n_embd, cfg.padded_vocab_size, cfg.n_head
        drop = 2 * C / sp if cfg.dropout > 0 else 0.0  # bool masks after attn and MLP
        stats = 2 * 2 * 4 / sp + 4 * H / tp  # LayerNorm mean/rstd, attention logsumexp
        layer = C * (2 * res / sp + 2 * a + 12 * a / tp) + stats + drop
        embed = 8 + (C / sp if cfg.dropout > 0 else 0.0)
        head = C * (res / sp + a) + 8 / sp + 4 * V / tp
        return cls(layer, C * res / sp, embed, head, 8 * V / tp)


def checkpointed(lay: Layout, layers: range, ac_every: int) -> int:
    if lay.ac == "full":
        return len(layers)
    if lay.ac == "selective":
        return sum(1 for i in layers if i % ac_every == 0)
    return 0


def estimate_memory(w: Workload, lay: Layout) -> MemoryBreakdown:
    """The fullest rank's breakdown (max total over pipeline ranks)."""
    return max(memory_by_rank(w, lay), key=lambda mb: mb.total)


def memory_by_rank(w: Workload, lay: Layout) -> list[MemoryBreakdown]:
    """One breakdown per pipeline rank (tp and dp peers of a pp rank hold the same)."""
    from gpt3d.parallel.pipeline import layer_split

    counts, terms = ParamCounts.of(w.model, lay.tp), ActTerms.of(w, lay)
    splits = layer_split(w.model.n_layer, lay.n_stages)
    states = residency(lay.schedule, lay.pp, lay.stages_per_rank, lay.microbatches)
    return [rank_memory(w, lay, r, splits, states[r], counts, terms) for r in range(lay.pp)]


def rank_memory(w, lay, rank, splits, states, counts, terms) -> MemoryBreakdown:
    stages = local_stages(lay.schedule, rank, lay.pp, lay.stages_per_rank) if lay.pp > 1 else [0]
    tokens = lay.microbatch_size(w.global_batch) * w.seq_len
    numel = tensors = root = 0.0
    alive, retained, ckpt_any = [], [], False
    for s in stages:
        n, t, r = stage_params(w.model, counts, lay, s, len(splits[s]))
        numel, tensors, root = numel + n, tensors + t, root + r
        k = checkpointed(lay, splits[s], w.ac_every)
        ckpt_any = ckpt_any or k > 0
        blocks = (len(splits[s]) - k) * terms.layer + k * terms.layer_ckpt
        head = terms.head * (s == lay.n_stages - 1)
        alive.append(tokens * (blocks + head + terms.embed * (s == 0)))
        retained.append(tokens * (W_RETAINED * blocks + HEAD_RETAINED * head))
    saved = float((states @ np.array(alive + retained)).max())
    recompute = tokens * (terms.layer - terms.layer_ckpt) if ckpt_any else 0.0
    has_last = lay.n_stages - 1 in stages
    logits = tokens * terms.logits_temp if has_last else 0.0
    buffers = dp_buffers(w, lay, numel, counts.block, root)
    shard = lay.dp_shard if lay.dp_mode == "fsdp" else 1
    return MemoryBreakdown(
        params=4 * numel / shard,
        grads=4 * numel / shard,
        optimizer=8 * numel / shard + 4 * tensors,
        activations=saved + recompute,
        temporaries=logits + buffers,
        pp_rank=rank,
        detail={
            "saved": saved,
            "recompute": recompute,
            "logits": logits,
            "unsharded_buffers": buffers,
            "params_per_tp_rank": numel,
        },
    )


def dp_buffers(w: Workload, lay: Layout, numel: float, block: float, root: float) -> float:
    """Transient unsharded parameters / gradients of the data-parallel wrapper (or autocast)."""
    bf16 = w.dtype == "bfloat16"
    p = DTYPE_BYTES[w.dtype]  # FSDP's param dtype: what all-gathers produce
    g = p + (4 if bf16 else 0)  # unsharded grad, plus its fp32 copy for the reduction
    if lay.dp == 1:
        return 2 * numel if bf16 else 0.0  # autocast weight-cast cache
    if lay.dp_mode == "ddp":
        return (p * numel if bf16 else 0.0) + 2 * block * g
    if lay.pp > 1:
        return numel * (p + 4)  # stage unsharded all step + fp32 accumulated grads
    return (2 * block + root) * (p + g)
