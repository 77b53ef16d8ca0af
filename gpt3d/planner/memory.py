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
B x T x V/tp each); FSDP without pp: two blocks (current + prefetched; on CPU only the
current) unsharded in the param dtype plus one block's unsharded gradient, and the root
(embeddings, head) the whole step; FSDP with pp: the stage's parameters stay unsharded and
its gradients accumulate unsharded in fp32 for the whole step (reshard_after_forward=False,
no gradient sync until the last microbatch), unless parallel.fsdp_reshard_per_microbatch:
then as without pp; DDP (FSDP-based replicate) in bf16: a bf16 copy of every parameter;
bf16 without data parallel: autocast's cache of bf16 weight casts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpt3d.model import GPTConfig
from gpt3d.parallel.compression import BUCKET_BYTES
from gpt3d.planner.layout import Layout, Workload, ddp_wrapper
from gpt3d.planner.schedules import local_stages, pending_weight_grads, residency

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
    moe_block: float = 0.0  # a Mixture-of-Experts block: attention, router, experts / tp
    moe_block_tensors: int = 0

    @classmethod
    def of(cls, cfg: GPTConfig, tp: int) -> ParamCounts:
        C, b, E = cfg.n_embd, int(cfg.bias), cfg.n_experts
        attn = (4 * C * C + b * 3 * C) / tp + 2 * (C + b * C) + b * C  # + ln_1, ln_2, c_proj.b
        mlp = (8 * C * C + b * 4 * C) / tp + b * C  # c_fc w+b, c_proj w; c_proj.b replicated
        # router (E, C) replicated over tp; experts w1 (E, C, H), w2 (E, H, C): hidden over
        # tp, experts over ep (FSDP then divides them by efsdp: ep x efsdp = dp_shard)
        moe = attn + E * C + 2 * E * C * cfg.expert_hidden / tp
        return cls(attn + mlp, 8 * (1 + b), cfg.padded_vocab_size * C / tp, cfg.block_size * C,
                   C + b * C, 1 + b, moe if E else 0.0, 6 * (1 + b) + 3)  # fmt: skip

    def block_of(self, cfg: GPTConfig, i: int) -> tuple[float, int]:
        """(elements, tensors) of block i."""
        if cfg.is_moe_layer(i):
            return self.moe_block, self.moe_block_tensors
        return self.block, self.block_tensors


def stage_params(cfg: GPTConfig, counts: ParamCounts, lay: Layout, stage: int, layers: range):
    """(elements, tensors, non-block elements) of one stage on one tp rank."""
    first, last = stage == 0, stage == lay.n_stages - 1
    blocks = [counts.block_of(cfg, i) for i in layers]
    numel, tensors = sum(n for n, _ in blocks), sum(t for _, t in blocks)
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
    """Bytes per token of one microbatch, saved for backward."""

    layer: float  # one block, everything it saves
    layer_ckpt: float  # one checkpointed block: its input
    embed: float  # stage 0: token ids (int64) (+ dropout mask)
    head: float  # last stage: ln_f input and stats, lm_head input, the logits (their gradient)
    moe_layer: float = 0.0  # a MoE block (balanced routing: k rows per token)

    @classmethod
    def of(cls, w: Workload, lay: Layout) -> ActTerms:
        cfg, tp = w.model, lay.tp
        a = DTYPE_BYTES[w.dtype]
        res = 4 if autocast(w, lay) else a  # under autocast the residual stream stays fp32
        sp = tp if lay.sequence_parallel else 1  # what the sequence split divides
        C, V, H = cfg.n_embd, cfg.padded_vocab_size, cfg.n_head
        drop = 2 * C / sp if cfg.dropout > 0 else 0.0  # bool masks after attn and MLP
        stats = 2 * 2 * 4 / sp + 4 * H / tp  # LayerNorm mean/rstd, attention logsumexp
        layer = C * (2 * res / sp + 2 * a + 12 * a / tp) + stats + drop
        embed = 8 + (C / sp if cfg.dropout > 0 else 0.0)
        head = C * (res / sp + a) + 8 / sp + a * V / tp  # gpt3d.loss keeps the logits' bytes
        # MoE in place of the MLP: fp32 router scores (E), expert ids and orders (int64),
        # per routed row its gathered input and fp32 output (C), hidden and GELU out (H / tp)
        k, E, Hx = cfg.moe_top_k, cfg.n_experts, cfg.expert_hidden
        moe = layer - 8 * a * C / tp + 2 * 4 * E + 28 * k + k * C * (a + 4) + 2 * k * Hx * a / tp
        return cls(layer, C * res / sp, embed, head, moe if E else 0.0)

    def block(self, cfg: GPTConfig, i: int, ckpt: bool) -> float:
        if ckpt:
            return self.layer_ckpt
        return self.moe_layer if cfg.is_moe_layer(i) else self.layer


def autocast(w: Workload, lay: Layout) -> bool:
    """bf16 without data parallelism runs under torch.autocast (FSDP casts otherwise)."""
    return w.dtype == "bfloat16" and lay.dp == 1


def checkpointed(lay: Layout, layers: range, ac_every: int) -> int:
    return sum(is_checkpointed(lay, i, ac_every) for i in layers)


def is_checkpointed(lay: Layout, i: int, ac_every: int) -> bool:
    """gpt3d checkpoints every block (full) or blocks i with i % ac_every == 0 (selective)."""
    return lay.ac == "full" or lay.ac == "selective" and i % ac_every == 0


def estimate_memory(w: Workload, lay: Layout) -> MemoryBreakdown:
    """The fullest rank's breakdown (max total over pipeline ranks)."""
    return max(memory_by_rank(w, lay), key=lambda mb: mb.total)


def memory_by_rank(w: Workload, lay: Layout) -> list[MemoryBreakdown]:
    """One breakdown per pipeline rank (tp and dp peers of a pp rank hold the same)."""
    from gpt3d.parallel.pipeline import layer_split

    counts, terms = ParamCounts.of(w.model, lay.tp), ActTerms.of(w, lay)
    splits = layer_split(w.model.n_layer, lay.n_stages)
    states = residency(lay.schedule, lay.pp, lay.stages_per_rank, lay.microbatches)
    pending = pending_weight_grads(lay.schedule, lay.pp, lay.stages_per_rank, lay.microbatches)
    return [
        rank_memory(w, lay, r, splits, states[r], counts, terms, pending[r]) for r in range(lay.pp)
    ]


def rank_memory(w, lay, rank, splits, states, counts, terms, pending=0) -> MemoryBreakdown:
    """pending: microbatch-stages waiting for their weight gradient (split backward) at
    once; each keeps gradients about the size of its blocks' saved tensors."""
    stages = local_stages(lay.schedule, rank, lay.pp, lay.stages_per_rank) if lay.pp > 1 else [0]
    tokens = lay.microbatch_size(w.global_batch) * w.seq_len
    numel = tensors = root = 0.0
    alive, blocks_mb, last_ckpt = [], [], False
    for s in stages:
        n, t, r = stage_params(w.model, counts, lay, s, splits[s])
        numel, tensors, root = numel + n, tensors + t, root + r
        ckpt = [is_checkpointed(lay, i, w.ac_every) for i in splits[s]]
        last_ckpt = last_ckpt or bool(ckpt and ckpt[-1])
        blocks = sum(terms.block(w.model, i, c) for i, c in zip(splits[s], ckpt, strict=True))
        blocks_mb.append(tokens * blocks)
        head = terms.head * (s == lay.n_stages - 1)
        alive.append(tokens * (blocks + head + terms.embed * (s == 0)))
    saved = float((states @ np.array(alive)).max())
    casts = 2 * (numel - root + head_rows(w, lay, stages)) if autocast(w, lay) else 0.0
    has_last = lay.n_stages - 1 in stages
    unsharded = numel  # what FSDP gathers: all but a table kept by vocabulary rows
    if lay.table_by_rows(w):
        table = counts.wte * table_tensors(w.model, lay, stages)
        root, unsharded = root - table, numel - table
        if has_last:  # the head's saved tensors are alive at the saved-tensor peak
            saved += table_rows_saved(w, lay, tokens)
    extra = transients(w, lay, tokens, unsharded, counts.block, root, has_last, 0 in stages)
    extra += pending * sum(blocks_mb) / len(blocks_mb)
    recompute = tokens * (terms.layer - terms.layer_ckpt) if last_ckpt else 0.0
    shard = lay.dp_shard if lay.dp_mode == "fsdp" else 1
    return MemoryBreakdown(
        params=4 * numel / shard,
        grads=4 * numel / shard,
        optimizer=8 * numel / shard + 4 * tensors,
        activations=saved + casts,
        temporaries=max(extra, recompute),
        pp_rank=rank,
        detail={
            "saved": saved,
            "autocast_casts": casts,
            "transients": extra,
            "recompute": recompute,
            "params_per_tp_rank": numel,
            "fsdp_unsharded": fsdp_unsharded(w, lay, unsharded, counts.block, root),
        },
    )


def fsdp_unsharded(w: Workload, lay: Layout, numel: float, block: float, root: float) -> float:
    """Bytes FSDP holds unsharded by construction (0 without it): one FSDP unit's parameters
    in the param dtype and its fp32 gradient, the larger of a block and the root; under pp
    the whole stage (numel), kept unsharded all step unless resharded per microbatch. What
    any FSDP needs beyond the sharded state, whatever its buffers (benchmarks/bench_memory
    adds it to the arithmetic)."""
    if not (lay.dp > 1 and lay.dp_mode == "fsdp"):
        return 0.0
    return (DTYPE_BYTES[w.dtype] + 4) * (numel if lay.fsdp_whole_stage else max(block, root))


def table_tensors(cfg: GPTConfig, lay: Layout, stages: list[int]) -> int:
    """Embedding tables (wte, a separate or pipeline-copied lm_head) the stages hold."""
    first, last = 0 in stages, lay.n_stages - 1 in stages
    return int(first) + int(last and (not cfg.tie_embeddings or lay.pp > 1))


def table_rows_saved(w: Workload, lay: Layout, tokens: int) -> float:
    """What the head saves beyond ActTerms.head when the table stays sharded by vocabulary
    rows (gpt3d.parallel.vocab_over_dp): every dp_shard rank's hidden states instead of this
    rank's, and in bf16 the cast of the local rows (FSDP's unsharded copy otherwise)."""
    a, C = DTYPE_BYTES[w.dtype], w.model.n_embd
    cast = a * w.model.padded_vocab_size * C / (lay.dp_shard * lay.tp) if a < 4 else 0.0
    return (lay.dp_shard - 1) * tokens * C * a + cast


def head_rows(w: Workload, lay: Layout, stages: list[int]) -> float:
    """Elements of the lm_head weight a stage list multiplies with (autocast casts it)."""
    last = lay.n_stages - 1 in stages
    return w.model.padded_vocab_size * w.model.n_embd / lay.tp if last else 0.0


def transients(w, lay, tokens, numel, block, root, last: bool, first: bool) -> float:
    """Bytes the live-byte peak holds beyond the state and the saved-tensor peak, fitted to
    the fake estimator (gpt3d/planner/fake.py; tests/unit/test_planner_fake.py bounds the
    error). Without pp the larger of the moments below, with pp their sum (a pipeline stage
    keeps its unsharded state all step):
      head      the lm_head's weight gradient in the compute dtype, its input gradient,
                gpt3d.loss's fp32 chunk buffers; FSDP without pp (or resharded per
                microbatch): the unsharded root (without the table when it stays
                sharded by vocabulary rows: then the lm_head's weight gradient and the
                logits cover V / (dp_shard·tp) columns of every dp_shard rank's tokens,
                and the gathered hidden states' gradient is dp_shard times the size)
      embedding tp > 1, first stage: the vocab-parallel embedding's backward builds its
                rows' gradient (V/tp x C) per microbatch before adding it to the
                accumulated one (gpt3d.parallel.vocab_parallel); with the table by
                vocabulary rows (any tp) the same for V / (dp_shard·tp) rows, plus its
                fp32 cast when the rows were cast to the compute dtype
      wrapper   FSDP without pp (or resharded per microbatch): the current block (and on
                CUDA the prefetched one) unsharded plus one block's fp32 gradient; FSDP with pp: the
                stage unsharded all step with its fp32 gradients; DDP (FSDP-based
                replicate): bf16 copies of every parameter, fp32: a second gradient
                buffer; DDP on CPU in fp32 (gpt3d's all-reduce): one flat bucket (32 MiB, or
                the largest tensor alone)."""
    p = DTYPE_BYTES[w.dtype]  # compute / FSDP param dtype
    fsdp = lay.dp > 1 and lay.dp_mode == "fsdp"
    V, C = w.model.padded_vocab_size, w.model.n_embd
    head, by_rows = 0.0, lay.table_by_rows(w)
    if last:
        # the logits' columns per rank and the tokens they cover: with the table by
        # vocabulary rows every dp_shard rank's tokens against V / (dp_shard·tp) columns
        cols = V / (lay.tp * (lay.dp_shard if by_rows else 1))
        n = tokens * (lay.dp_shard if by_rows else 1)
        rows = min(n, max(16, LOSS_CHUNK[w.device] // max(1, int(cols))))
        head = (p * C + rows * 4 * (2 if p < 4 else 1)) * cols + 4 * n * C
        head += p * root if fsdp and not lay.fsdp_whole_stage else 0.0
    embed = p * V * C / lay.tp if first and lay.tp > 1 else 0.0
    if first and by_rows:  # the local rows' gradient, and its fp32 cast under autocast
        embed = (p + (4 if p < 4 else 0)) * V * C / (lay.tp * lay.dp_shard)
    if lay.dp == 1:
        wrapper = 0.0
    elif lay.dp_mode == "ddp" and not ddp_wrapper(w, lay):  # GradSync's flat fp32 buckets
        wrapper = 4 * min(numel, max(BUCKET_BYTES / 4, V * C / lay.tp))
    elif lay.dp_mode == "ddp":
        wrapper = p * numel if p < 4 else 4 * numel
    elif lay.fsdp_whole_stage:
        wrapper = numel * (p + 4)
    else:  # FSDP without pp, or resharded per microbatch
        wrapper = block * ((1 + PREFETCHED[w.device]) * p + 4)
    if lay.pp == 1:  # the embedding's backward comes last, when activations are freed
        return max(head, wrapper)
    return head + embed + wrapper


# blocks FSDP's backward unshards ahead of the current one (gpt3d.parallel.data_parallel turns
# the prefetch off on CPU, where gloo's all-gather cannot overlap the compute)
PREFETCHED = {"cpu": 0, "cuda": 1}

# gpt3d.loss works on the logits in chunks of this many fp32 elements (its _rows_per_chunk)
LOSS_CHUNK = {"cpu": 1 << 20, "cuda": 1 << 26}
