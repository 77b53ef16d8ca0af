"""Token files on disk -> deterministic, resumable batches, sliced by data-parallel rank.

A prepared dataset directory (recipes/prepare.py, gpt3d/prepare.py) holds
    train.bin, val.bin   raw GPT-2 token ids, np.uint16, documents joined by <|endoftext|>
    meta.json            {"tokenizer", "vocab_size", "eot_id", "dtype", "train_tokens", ...}

Windows: window w is tokens [w*T, w*T + T + 1) of a split; x = its first T tokens, y = the
same shifted by one. n_windows = (n_tokens - 1) // T, so windows tile the file without overlap.

Global sample order: sample id k counts every sequence ever drawn (all ranks, all steps).
    epoch  = k // n_windows
    window = permutation_epoch[k % n_windows],  permutation_epoch from default_rng([seed, epoch])
Step s's global batch is samples [s*G, (s+1)*G); dp rank r takes the contiguous slice
[s*G + r*G/dp, s*G + (r+1)*G/dp). What a run sees is a pure function of (seed, G, step), never
of dp_size, so a checkpoint resumes exactly on any number of data-parallel ranks. Tensor and
pipeline peers build the loader with the same dp_rank and get identical batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gpt3d.errors import DataError

TOKEN_DTYPE = np.uint16
SPLITS = ("train", "val")
DATASET_META = "meta.json"  # written last by prepare.py
EVAL_SEED = 0  # eval order is fixed: every evaluation of a run sees the same val windows
PREPARE_HINT = (
    "run `python recipes/prepare.py --out DIR <text files or dirs>` "
    "(no arguments: the bundled Shakespeare corpus in recipes/data/shakespeare)"
)


def token_files(data_dir: str | Path, split: str) -> list[Path]:
    """The token files of one split of a prepared dataset, in order."""
    return [Path(data_dir) / f"{split}.bin"]


def count_tokens(path: str | Path, seq_len: int) -> int:
    """Number of tokens in a .bin file, after checking it holds at least one sequence."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file {path} does not exist; {PREPARE_HINT}")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"token file {path} is empty; {PREPARE_HINT}")
    if size % np.dtype(TOKEN_DTYPE).itemsize:
        raise DataError(f"token file {path} has an odd size, it is not uint16 ids; {PREPARE_HINT}")
    n_tokens = size // np.dtype(TOKEN_DTYPE).itemsize
    if n_tokens < seq_len + 1:
        raise DataError(
            f"token file {path} has {n_tokens} tokens, fewer than one sequence of seq_len + 1 = "
            f"{seq_len + 1}; use a smaller seq_len or more text (for val.bin: a larger "
            "--val-fraction in recipes/prepare.py)"
        )
    return n_tokens


class TokenDataset:
    """One split as non-overlapping (x, y) windows of length seq_len over a uint16 memmap."""

    def __init__(self, path: str | Path, seq_len: int):
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.path = Path(path)
        self.seq_len = seq_len
        self.n_tokens = count_tokens(self.path, seq_len)
        self.tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")  # (n_tokens,)
        self.n_windows = (self.n_tokens - 1) // seq_len

    def windows(self, w: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Window indices (B,) -> x, y int64 tensors (B, T)."""
        T = self.seq_len
        idx = np.asarray(w, dtype=np.int64)[:, None] * T + np.arange(T + 1)  # (B, T+1)
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))  # (B, T+1)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


class SampleOrder:
    """Global sample id -> window index; a pure function of (seed, id), one shuffle per epoch."""

    def __init__(self, n_windows: int, seed: int):
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise DataError(f"data seed must be a non-negative integer, got {seed!r}")
        self.n_windows = n_windows
        self.seed = int(seed)
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)  # cache: current epoch only

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._perm = epoch, rng.permutation(self.n_windows)
        return self._perm

    def windows(self, sample_ids: np.ndarray) -> np.ndarray:
        """Sample ids (B,) -> window indices (B,); a batch may straddle an epoch boundary."""
        epochs = sample_ids // self.n_windows
        out = np.empty_like(sample_ids)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[sample_ids[sel] % self.n_windows]
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
        (path,) = token_files(data_dir, split)
        self.dataset = TokenDataset(path, seq_len)
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


def read_dataset_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / DATASET_META
    if not path.is_file():
        raise DataError(
            f"{path} is missing; prepare writes it last, so the directory was not prepared or "
            f"preparation was interrupted: {PREPARE_HINT}"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}); {PREPARE_HINT}") from e
    if meta.get("dtype") != "uint16":
        raise DataError(f"{path} says dtype {meta.get('dtype')!r}; gpt3d reads uint16 ids")
    return meta


def check_token_ids(path: str | Path, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Raise on the first token id >= vocab_size, scanning the file chunk by chunk."""
    if vocab_size > np.iinfo(TOKEN_DTYPE).max:
        return  # every uint16 id fits
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r")  # (n_tokens,)
    for start in range(0, len(tokens), chunk):
        bad = np.flatnonzero(tokens[start : start + chunk] >= vocab_size)
        if bad.size:
            pos = start + int(bad[0])
            raise DataError(
                f"{path}: token id {int(tokens[pos])} at position {pos} is >= the model's "
                f"vocab_size {vocab_size}; the file was made with another tokenizer or is "
                f"corrupted: {PREPARE_HINT}"
            )


def validate_dataset(
    data_dir: str | Path, vocab_size: int, seq_len: int, check_ids: bool = True
) -> dict:
    """Check a prepared directory against the model before training; returns meta.json.
    check_ids also scans every token id (rank 0 does it; the other ranks read the same files)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} does not exist; {PREPARE_HINT}")
    meta = read_dataset_meta(data_dir)
    if meta.get("vocab_size") != vocab_size:
        raise DataError(
            f"{data_dir / DATASET_META} has vocab_size {meta.get('vocab_size')} but the model has "
            f"vocab_size {vocab_size}; they must match (pad the embedding with the model's "
            "pad_vocab_multiple, not vocab_size), or prepare the data with the model's tokenizer"
        )
    for split in SPLITS:
        (path,) = token_files(data_dir, split)
        n_tokens = count_tokens(path, seq_len)
        expected = meta.get(f"{split}_tokens")
        if expected is not None and expected != n_tokens:
            raise DataError(
                f"{path} has {n_tokens} tokens but {DATASET_META} says {expected}; the files come "
                f"from different runs: {PREPARE_HINT}"
            )
        if check_ids:
            check_token_ids(path, vocab_size)
    return meta
