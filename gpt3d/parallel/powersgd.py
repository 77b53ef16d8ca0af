"""PowerSGD (Vogels, Karimireddy, Jaggi 2019): a rank-r all-reduce of gradient matrices with
warm start and error feedback, over one process group (gpt3d: the dp_replicate axis).

For every gradient matrix M_k (rank k's local gradient, viewed as rows x cols) the group
wants the sum S = sum_k M_k. One step of power iteration with the previous step's Q (warm
start) gives a rank-r approximation of S, sending r * (rows + cols) numbers instead of
rows * cols:

    M_k <- M_k + E_k                    error feedback: what earlier steps failed to send
    P   = all_reduce(M_k @ Q)           (rows, r) = S @ Q
    P   = orthonormal columns of P      (QR; identical on every rank, same input)
    Q   = all_reduce(M_k^T @ P)         (cols, r) = S^T @ P, kept as the next step's Q
    S~  = P @ Q^T                       = P P^T S, the projection of S onto span(P)
    E_k <- M_k - S~ / n                 so that sum_k E_k = S - S~: the error of the sum

Over steps the approximations plus the errors still held add up to the exact gradient sum:
sum_s S~_s + sum_k E_k = sum_s S_s (tests/distributed/test_compression.py measures it).
All matrices of a step share one all-reduce for P and one for Q (fp32). Vectors (biases,
LayerNorms) and matrices too small to gain (r * (rows + cols) * 2 > rows * cols, torch's
min_compression_rate 2) are left to the caller's uncompressed all-reduce.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import Tensor

MIN_COMPRESSION = 2.0  # compress only where it at least halves the numbers sent


def as_matrix(t: Tensor) -> Tensor:
    """(d0, d1, ...) -> (d0, d1 * ...): a view, the first dim as rows."""
    return t.view(t.shape[0], -1)


class PowerSGD:
    """Rank-r compressed all-reduce with per-matrix state, keyed by parameter name: the error
    E (the matrix's shape) and the warm-start Q (cols, r), both fp32."""

    def __init__(self, rank: int, seed: int):
        self.rank, self.seed = rank, seed
        self.error: dict[str, Tensor] = {}
        self.q: dict[str, Tensor] = {}

    def compressible(self, t: Tensor) -> bool:
        if t.dim() < 2 or t.numel() == 0:
            return False
        rows, cols = t.shape[0], t.numel() // t.shape[0]
        return self.rank * (rows + cols) * MIN_COMPRESSION <= rows * cols

    def init_state(self, named: list[tuple[str, Tensor]]) -> None:
        """Zero errors and a random Q per matrix. Q depends only on (seed, name, shape), so
        every rank of the group starts from the same Q (a requirement: P sums M_k @ Q)."""
        for name, t in named:
            if name in self.q:
                continue
            cols = t.numel() // t.shape[0]
            g = torch.Generator().manual_seed(self.seed + zlib.crc32(name.encode()))
            q = torch.randn(cols, self.rank, generator=g, dtype=torch.float32)
            self.q[name] = q.to(t.device)
            self.error[name] = torch.zeros(as_matrix(t).shape, device=t.device)

    @torch.no_grad()
    def all_reduce(self, named: list[tuple[str, Tensor]], group) -> None:
        """Replace each matrix, in place, by the rank-r approximation of its sum over group."""
        if not named:
            return
        self.init_state(named)
        n = dist.get_world_size(group)
        mats = [as_matrix(t) for _, t in named]
        errors = [self.error[name] for name, _ in named]
        for m, e in zip(mats, errors, strict=True):
            m.add_(e.to(m.dtype))  # error feedback
        names = [name for name, _ in named]
        ps = _all_reduce_cat(
            [m.float() @ self.q[n] for m, n in zip(mats, names, strict=True)], group
        )
        ps = [torch.linalg.qr(p, mode="reduced").Q for p in ps]
        qs = _all_reduce_cat([m.float().T @ p for m, p in zip(mats, ps, strict=True)], group)
        for name, m, e, p, q in zip(names, mats, errors, ps, qs, strict=True):
            approx = p @ q.T  # (rows, cols): the approximate sum over the group
            e.copy_(m.float() - approx / n)
            m.copy_(approx)
            self.q[name].copy_(q)  # warm start

    # ---- checkpoint state (plain tensors; valid on the same layout only) -----------------
    def state_dict(self) -> dict[str, Tensor]:
        state = {f"{name}.q": q for name, q in self.q.items()}
        state.update({f"{name}.error": e for name, e in self.error.items()})
        return state


def _all_reduce_cat(tensors: list[Tensor], group) -> list[Tensor]:
    """SUM all-reduce of several tensors as one flat buffer; returns them, reduced."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out
