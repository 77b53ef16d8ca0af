"""Token shards -> deterministic, resumable batches, sliced by data-parallel rank.

The files and their formats (one or many shards per split, gpt3d's raw uint16 or llm.c's
header format) are gpt3d/shards.py's; token_files(data_dir, split) names a split's files.

Windows: a shard of n tokens holds (n - 1) // T windows; window w of a shard is its tokens
[w*T, w*T + T + 1), x = the first T, y = the same shifted by one. Windows tile each shard
without overlap and never cross a shard's end. A split's windows are numbered globally,
shard after shard in name order: global window g lies in the shard s with
starts[s] <= g < starts[s + 1] (starts = cumulative window counts).

Global sample order: sample id k counts every sequence ever drawn (all ranks, all steps).
    epoch  = k // n_windows
    window = permutation_epoch(k % n_windows)
permutation_epoch is numpy's shuffle from default_rng([seed, epoch]) up to EXACT_SHUFFLE_WINDOWS
windows (4 bytes per window, made on the first draw of the epoch), and above that a keyed
Feistel bijection of [0, n_windows) (no memory, no start-up cost; keys from the same rng).
Step s's global batch is samples [s*G, (s+1)*G); dp rank r takes the contiguous slice
[s*G + r*G/dp, s*G + (r+1)*G/dp). What a run sees is a pure function of (dataset, seed, G,
step), never of dp_size or the number of shards a rank has opened, so a checkpoint resumes
exactly on any layout. Tensor and pipeline peers build the loader with the same dp_rank and
get identical batches.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from gpt3d.errors import DataError
from gpt3d.shards import (  # noqa: F401  (re-exported: the dataset API lives in gpt3d.data)
    DATASET_META,
    PREPARE_HINT,
    SPLITS,
    TOKEN_DTYPE,
    Shard,
    check_windows,
    n_windows,
    open_split,
    read_dataset_meta,
    token_files,
    validate_dataset,
)

EVAL_SEED = 0  # eval order is fixed: every evaluation of a run sees the same val windows
EXACT_SHUFFLE_WINDOWS = 1 << 24  # above this, the Feistel permutation (O(1) memory)
FEISTEL_ROUNDS = 6


class TokenDataset:
    """One split as non-overlapping (x, y) windows of length seq_len over its shards."""

    def __init__(self, shards: list[Shard], seq_len: int):
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.shards, self.seq_len = list(shards), seq_len
        self.starts = np.concatenate([[0], np.cumsum(n_windows(self.shards, seq_len))])
        self.n_windows = int(self.starts[-1])  # (n_shards + 1,) starts; windows in all shards
        self.n_tokens = sum(s.n_tokens for s in self.shards)
        self._tokens: dict[int, np.memmap] = {}  # shard index -> memmap, opened on first use

    @classmethod
    def open(cls, data_dir: str | Path, split: str, seq_len: int) -> TokenDataset:
        """The split's shards, header- and size-checked, in the dataset's format."""
        shards = open_split(data_dir, split, read_dataset_meta(data_dir)["format"])
        check_windows(shards, seq_len, split, Path(data_dir))
        return cls(shards, seq_len)

    def _shard_tokens(self, s: int) -> np.memmap:
        if s not in self._tokens:
            self._tokens[s] = self.shards[s].tokens()
        return self._tokens[s]

    def windows(self, w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Global window indices (B,) -> x, y int64 tensors (B, T)."""
        T = self.seq_len
        w = np.asarray(w, dtype=np.int64)
        assert w.size == 0 or 0 <= w.min() <= w.max() < self.n_windows, "window out of range"
        shard = np.searchsorted(self.starts, w, side="right") - 1  # (B,) last start <= w
        chunk = np.empty((len(w), T + 1), dtype=np.int64)  # (B, T+1)
        for s in np.unique(shard):
            sel = shard == s
            idx = (w[sel] - self.starts[s])[:, None] * T + np.arange(T + 1)  # (b, T+1)
            chunk[sel] = self._shard_tokens(int(s))[idx]
        chunk = torch.from_numpy(chunk)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-mixing bijection of uint64 values (wraps mod 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def feistel_permute(x: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """A keyed bijection of [0, n), applied to x (B,) int64: a balanced Feistel network on
    the smallest even bit width covering n, cycle-walking until each value lands in [0, n)
    (the domain is < 4n, so a few passes on average)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    out = np.asarray(x, dtype=np.uint64).copy()
    todo = np.ones(out.shape, dtype=bool)  # every value takes at least one pass
    while todo.any():
        left, right = out[todo] >> shift, out[todo] & mask
        for k in keys:
            left, right = right, left ^ (_mix64(right ^ k) & mask)
        out[todo] = (left << shift) | right
        todo[todo] = out[todo] >= np.uint64(n)
    return out.astype(np.int64)


class SampleOrder:
    """Global sample id -> window index; a pure function of (seed, id), one shuffle per epoch."""

    def __init__(self, n_windows: int, seed: int, exact_limit: int = EXACT_SHUFFLE_WINDOWS):
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise DataError(f"data seed must be a non-negative integer, got {seed!r}")
        self.n_windows, self.seed, self.exact = n_windows, int(seed), n_windows <= exact_limit
        self._epoch, self._perm = -1, np.empty(0, dtype=np.uint32)  # cache: current epoch only

    def permutation(self, epoch: int) -> np.ndarray:
        """The exact shuffle of an epoch (n_windows,) uint32; same order as permutation(n)."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch = epoch
            self._perm = rng.permutation(np.arange(self.n_windows, dtype=np.uint32))
        return self._perm

    def _keys(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        return rng.integers(0, 2**64, size=FEISTEL_ROUNDS, dtype=np.uint64)

    def windows(self, sample_ids: np.ndarray) -> np.ndarray:
        """Sample ids (B,) -> window indices (B,); a batch may straddle an epoch boundary."""
        epochs = sample_ids // self.n_windows
        out = np.empty_like(sample_ids)
        for e in np.unique(epochs):
            sel = epochs == e
            pos = sample_ids[sel] % self.n_windows
            if self.exact:
                out[sel] = self.permutation(int(e))[pos]
            else:
                out[sel] = feistel_permute(pos, self.n_windows, self._keys(int(e)))
        return out


class ShardedLoader:
    """Batches of one split for one data-parallel rank, with resumable global position."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}")
        _check_dp(global_batch_size, dp_rank, dp_size)
        self.dataset = TokenDataset.open(data_dir, split, seq_len)
        self.order = SampleOrder(self.dataset.n_windows, seed)
        self.split, self.seq_len, self.seed = split, seq_len, int(seed)
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.local_batch_size = global_batch_size // dp_size
        self.samples_consumed = 0  # global: every rank advances it by G per step

    def batch_at(self, first_sample: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The global batch [first_sample, first_sample + G), this rank's slice:
        x, y (G/dp, T) int64 and sample_ids (G/dp,) int64."""
        lo = first_sample + self.dp_rank * self.local_batch_size
        ids = np.arange(lo, lo + self.local_batch_size, dtype=np.int64)  # (G/dp,)
        x, y = self.dataset.windows(self.order.windows(ids))  # (G/dp, T) each
        return x, y, torch.from_numpy(ids)

    def batch_for_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step `step`'s batch for a run that has used global batch size G from step 0."""
        return self.batch_at(step * self.global_batch_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = self.batch_at(self.samples_consumed)
        self.samples_consumed += self.global_batch_size
        return batch

    def state_dict(self) -> dict:
        return {
            "samples_consumed": self.samples_consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "split": self.split,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at a global sample position; dp_size and G may differ from the saving run."""
        for key in ("seed", "seq_len", "split"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"data loader state was saved with {key}={state[key]!r} but this loader has "
                    f"{key}={getattr(self, key)!r}; resuming would change the sample order. Use "
                    f"the same {key} as the checkpointed run, or start without loading its data "
                    "state."
                )
        consumed = int(state["samples_consumed"])
        if consumed < 0:
            raise DataError(f"samples_consumed must be >= 0, got {consumed}")
        self.samples_consumed = consumed


def _check_dp(global_batch_size: int, dp_rank: int, dp_size: int) -> None:
    if global_batch_size < 1 or dp_size < 1:
        raise DataError(
            f"need global_batch_size >= 1 and dp_size >= 1, got {global_batch_size}, {dp_size}"
        )
    if global_batch_size % dp_size:
        raise DataError(
            f"global_batch_size {global_batch_size} is not divisible by the data-parallel size "
            f"{dp_size}; pick a global batch size that is a multiple of {dp_size}"
        )
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} is outside [0, dp_size={dp_size})")


def eval_batches(
    data_dir: str | Path,
    seq_len: int,
    global_batch_size: int,
    eval_steps: int,
    dp_rank: int = 0,
    dp_size: int = 1,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The same `eval_steps` val batches every call: samples [0, eval_steps*G) of the val order
    under EVAL_SEED, sliced by dp rank like training batches. Windows repeat (next epoch's
    shuffle) if eval_steps * G exceeds the number of val windows."""
    if eval_steps < 1:
        raise DataError(f"eval_steps must be >= 1, got {eval_steps}")
    loader = ShardedLoader(data_dir, "val", seq_len, global_batch_size, EVAL_SEED, dp_rank, dp_size)
    return [loader.batch_for_step(s) for s in range(eval_steps)]
