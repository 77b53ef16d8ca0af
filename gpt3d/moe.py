"""Mixture-of-Experts feed-forward layer, plain PyTorch. No torch.distributed here.

Dropless token-choice top-k routing (every token reaches its k experts; no capacity factor)
with DeepSeek-V3 load balancing: a selection-only bias per expert (aux-loss-free) and an
optional sequence-wise auxiliary loss. Names inside a MoE block (h.{i}.moe.*):

    router.weight       (E, C)     softmax router, no bias
    experts.w1          (E, C, H)  stacked expert input projections  (tanh-GELU MLPs, no biases)
    experts.w2          (E, H, C)  stacked expert output projections
    expert_bias         (E,)       fp32 buffer, persistent: checkpoints carry the balancing state
    tokens_per_expert   (E,)       int64 buffer, not persistent: routed rows since the last reset
    aux_loss            ()         fp32 buffer, not persistent: aux loss added since the last reset

Expert parallelism is applied from outside to `experts` alone (torchtitan's design): an input
hook all-to-alls (rows grouped by global expert, tokens per global expert) to the ranks that
hold the experts and returns (rows grouped by local expert, tokens per local expert); an
output hook sends the rows back in the order they came. w1/w2 then are DTensors sharded on
dim 0 and forward computes with their local shards.

The distributed code drives balancing through the helpers at the bottom: expert_counts ->
all-reduce over every rank that saw different tokens -> update_expert_biases -> reset_moe_stats.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("auto", "grouped_mm", "loop")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _local(p: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (expert parallel: this rank's experts), else the tensor."""
    return p.to_local() if hasattr(p, "to_local") else p


def _in_backward() -> bool:
    """True while autograd runs a backward pass: a forward now is an activation-checkpoint
    recompute, whose tokens were already counted (torch.utils.checkpoint asks the same)."""
    return torch._C._current_graph_task_id() != -1


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch._grouped_mm (torch 2.13, CPU and CUDA) takes fp32/bf16/fp16 operands of one dtype
    whose rows are multiples of 16 bytes; it rejects fp64 and unaligned widths."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    size = x.element_size()
    return w.dtype == x.dtype and all(n * size % 16 == 0 for n in w.shape[1:])


class _ContiguousGrad(torch.autograd.Function):
    """Identity; backward makes the gradient contiguous (_grouped_mm's backward rejects the
    stride-0 gradient that e.g. y.sum() sends)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped_mlp(x, w1, w2, counts):
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # (E,) end row of each expert
    h = F.gelu(torch._grouped_mm(x.contiguous(), w1, offs=offs), approximate="tanh")  # (R, H)
    return _ContiguousGrad.apply(torch._grouped_mm(h, w2, offs=offs))  # (R, C)


def _loop_mlp(x, w1, w2, counts):
    rows = x.split(counts.tolist())  # E groups of (R_e, C); .tolist() is a host sync
    outs = [F.gelu(xe @ w1[e], approximate="tanh") @ w2[e] for e, xe in enumerate(rows)]
    return torch.cat(outs)  # (R, C)


class GroupedExperts(nn.Module):
    """E GPT-2-style MLPs (tanh GELU) held as stacked weights. No biases: a grouped GEMM has
    no per-group bias, and DeepSeek/Mixtral/torchtitan experts go without."""

    def __init__(self, dim: int, hidden: int, n_experts: int, impl: str = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"moe_impl must be one of {IMPLS}, got {impl!r}")
        self.w1 = nn.Parameter(torch.randn(n_experts, dim, hidden) * 0.02)
        self.w2 = nn.Parameter(torch.randn(n_experts, hidden, dim) * 0.02)
        self.impl = impl  # "auto": grouped GEMM where supported (compiled: bf16 only), else loop

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x: (R, C) rows grouped by expert (expert 0's rows first), with no padding rows:
        R == tokens_per_expert.sum(); tokens_per_expert: (E_local,) rows of each expert.
        Returns (R, C), row r the output of the expert that row r belongs to."""
        w1, w2 = _local(self.w1), _local(self.w2)  # (E_local, C, H), (E_local, H, C)
        if self._grouped(x, w1, w2):
            return _grouped_mlp(x, w1, w2, tokens_per_expert)
        return _loop_mlp(x, w1, w2, tokens_per_expert)

    def _grouped(self, x, w1, w2) -> bool:
        ok = grouped_mm_supported(x, w1) and grouped_mm_supported(x, w2)
        if self.impl == "grouped_mm" and not ok:
            raise ValueError(
                f"moe_impl='grouped_mm' needs fp32/bf16/fp16 and widths whose rows are "
                f"multiples of 16 bytes (got {x.dtype}, w1 {tuple(w1.shape)}); use 'auto'"
            )
        if self.impl != "auto":
            return self.impl == "grouped_mm"
        # torch.compile traces _grouped_mm with a meta kernel that takes bf16 only.
        return ok and (x.dtype == torch.bfloat16 or not torch.compiler.is_compiling())


class AuxLossAutoScaler(torch.autograd.Function):
    """Megatron's trick: forward returns x unchanged; backward passes x's gradient through and
    also sends `scale` as the gradient of `aux`, so the aux loss joins the backward graph
    without changing what forward returns (a pipeline middle stage's aux loss included)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.aux_meta = (aux.shape, aux.dtype, aux.device)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shape, dtype, device = ctx.aux_meta
        return grad, torch.full(shape, ctx.scale, dtype=dtype, device=device), None


def sequence_aux_loss(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss without its coefficient, summed over sequences.

    scores: (B, T, E) routing probabilities (softmax: already normalised over experts);
    ids: (B, T, k) chosen experts. Per sequence: sum_i f_i * P_i with
    f_i = E / (k T) * #tokens choosing i and P_i = mean_t scores[t, i]. It is 1 when P is
    uniform or the choices are perfectly balanced."""
    B, T, k = ids.shape
    E = scores.shape[-1]
    ones = torch.ones(B, T * k, dtype=scores.dtype, device=scores.device)
    hits = torch.zeros(B, E, dtype=scores.dtype, device=scores.device)
    hits = hits.scatter_add_(1, ids.reshape(B, T * k), ones)  # (B, E) choices per sequence
    f = hits * (E / (k * T))  # (B, E), 1 per expert when balanced
    return (f * scores.mean(1)).sum()  # (B, E) -> ()


class MoE(nn.Module):
    """Router + grouped experts, in place of a block's MLP."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_experts: int,
        top_k: int,
        aux_coef: float = 0.0,
        bias_rate: float = 0.0,
        impl: str = "auto",
    ):
        super().__init__()
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.experts = GroupedExperts(dim, hidden, n_experts, impl)
        self.n_experts, self.top_k = n_experts, top_k
        self.aux_coef, self.bias_rate = aux_coef, bias_rate
        # Gradient scale of the summed aux loss. None: aux_coef / (sequences in this forward),
        # right for one process; the trainer sets aux_coef / (global sequences per step).
        self.aux_scale: float | None = None
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32))
        z = torch.zeros(n_experts, dtype=torch.int64)
        self.register_buffer("tokens_per_expert", z, persistent=False)
        self.register_buffer("aux_loss", torch.zeros((), dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        k = self.top_k
        xf = x.reshape(-1, C)  # (N, C) tokens, N = B*T
        acc = torch.promote_types(x.dtype, torch.float32)  # route and combine in >= fp32
        scores = F.softmax(self.router(xf).to(acc), dim=-1)  # (N, E) probabilities
        ids = torch.topk(scores + self.expert_bias, k, dim=-1).indices  # (N, k) expert ids
        weights = scores.gather(-1, ids)  # (N, k) combine weights: the bias never enters
        flat = ids.view(-1)  # (N*k,) expert of each (token, slot)
        counts = flat.new_zeros(self.n_experts).scatter_add_(0, flat, torch.ones_like(flat))  # (E,)
        order = torch.argsort(flat, stable=True)  # (N*k,) slots grouped by expert
        y = self.experts(xf[order // k], counts)  # (N*k, C) grouped by expert
        y = y[torch.argsort(order)].view(-1, k, C)  # (N, k, C) back in (token, slot) order
        out = (y.to(acc) * weights.unsqueeze(-1)).sum(1).to(x.dtype)  # (N, C)
        if self.training and not _in_backward():
            with torch.no_grad():
                self.tokens_per_expert += counts
        if self.training and self.aux_coef > 0:
            out = self._add_aux_loss(out, scores.view(B, T, -1), ids.view(B, T, k))
        return out.view(B, T, C)

    def _add_aux_loss(self, out, scores, ids):
        aux = sequence_aux_loss(scores, ids)  # () summed over this batch's sequences
        scale = self.aux_scale if self.aux_scale is not None else self.aux_coef / ids.shape[0]
        if not _in_backward():
            with torch.no_grad():
                self.aux_loss += aux.detach() * scale  # this forward's share of the loss
        return AuxLossAutoScaler.apply(out, aux, scale)

    @torch.no_grad()
    def update_bias(self, counts: torch.Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): expert_bias += rate * sign(mean - counts),
        centred so the biases keep summing to zero. counts: (E,) tokens per expert summed
        over every rank that routed different tokens (not over tp or pp peers)."""
        c = counts.to(self.expert_bias.device, torch.float32)
        step = self.bias_rate * torch.sign(c.mean() - c)
        self.expert_bias += step - step.mean()

    @torch.no_grad()
    def reset_stats(self) -> None:
        self.tokens_per_expert.zero_()
        self.aux_loss.zero_()


def moe_layers(model: nn.Module) -> dict[str, MoE]:
    """The MoE layers a model (or a pipeline stage of it) holds, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def set_aux_scale(model: nn.Module, scale: float | None) -> None:
    """Gradient scale of every layer's summed aux loss: aux_coef / global sequences per step."""
    for m in moe_layers(model).values():
        m.aux_scale = scale


def expert_counts(model: nn.Module) -> torch.Tensor:
    """(L, E) int64 tokens per expert of this process's L MoE layers since the last reset,
    stacked so one all-reduce covers them all (a copy: reducing it in place is safe).
    (0, 0) for a pipeline stage without MoE layers."""
    layers = moe_layers(model).values()
    if not layers:
        return torch.zeros(0, 0, dtype=torch.int64)
    return torch.stack([m.tokens_per_expert for m in layers])


def update_expert_biases(model: nn.Module, counts: torch.Tensor) -> None:
    """Apply update_bias with each layer's row of the (L, E) globally summed counts."""
    layers = list(moe_layers(model).values())
    assert counts.shape[0] == len(layers), "counts must come from expert_counts(model)"
    for m, row in zip(layers, counts, strict=True):
        m.update_bias(row)


def aux_loss_total(model: nn.Module) -> torch.Tensor:
    """() this process's aux-loss contribution since the last reset, over its MoE layers."""
    layers = moe_layers(model).values()
    return torch.stack([m.aux_loss for m in layers]).sum() if layers else torch.zeros(())


def reset_moe_stats(model: nn.Module) -> None:
    for m in moe_layers(model).values():
        m.reset_stats()


@torch.no_grad()
def reset_moe_state(model: nn.Module) -> None:
    """Zero every layer's balancing bias (a buffer, so weight init never touches it) and
    statistics: the state of a fresh run before any checkpoint is loaded (after to_empty)."""
    for m in moe_layers(model).values():
        m.expert_bias.zero_()
        m.reset_stats()


@contextlib.contextmanager
def frozen_moe_stats(model: nn.Module):
    """Forwards inside leave the token counts and aux-loss records as they were (a forward
    that is not training, e.g. a pipeline stage's shape inference)."""
    layers = list(moe_layers(model).values())
    saved = [(m.tokens_per_expert.clone(), m.aux_loss.clone()) for m in layers]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (tokens, aux) in zip(layers, saved, strict=True):
                m.tokens_per_expert.copy_(tokens)
                m.aux_loss.copy_(aux)
