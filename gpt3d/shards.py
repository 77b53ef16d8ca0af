"""Token files on disk: which files a split has, their two formats, and the checks run before
training (every rank: headers and sizes; rank 0 also token ids, bounded for big corpora).

A prepared dataset directory holds, for each split (train, val), one or more shard files read
in name order: every `*train*.bin` is a training shard and every `*val*.bin` a validation
shard. `train.bin` alone is the one-shard case; llm.c / modded-nanogpt name theirs
`fineweb_train_000001.bin`, `fineweb_val_000000.bin`. One format per dataset:

    raw   the file is the tokens: np.uint16 GPT-2 ids and nothing else (gpt3d's default)
    llmc  llm.c / modded-nanogpt: 256 little-endian int32 [magic 20240520, version 1,
          n_tokens, 0, ...] (1024 bytes), then n_tokens np.uint16 ids; size = 1024 + 2 n_tokens

meta.json (written last by gpt3d.prepare) names the format, the tokenizer and every shard with
its token count. A directory of llm.c shards without meta.json is read as GPT-2 tokens in llmc
format, so FineWeb shards made by those projects train here without conversion.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt3d.errors import DataError

TOKEN_DTYPE = np.uint16
SPLITS = ("train", "val")
FORMATS = ("raw", "llmc")
DATASET_META = "meta.json"  # written last by prepare.py
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_INTS = 20240520, 1, 256
LLMC_HEADER_BYTES = 4 * LLMC_HEADER_INTS
LLAMA3_MAGIC = 20240801  # llm.c's uint32 Llama-3 shards: a different tokenizer and dtype
GPT2_VOCAB, GPT2_EOT = 50257, 50256
# Token-id scan of rank 0 in preflight: every token of a split up to this many, else this many
# sampled across all shards (each shard's start, end and evenly spaced spans between).
ID_SCAN_TOKENS = 1 << 26
PREPARE_HINT = (
    "run `python recipes/prepare.py --out DIR <text files or dirs>` "
    "(no arguments: the bundled Shakespeare corpus in recipes/data/shakespeare)"
)


def token_files(data_dir: str | Path, split: str) -> list[Path]:
    """The token files of one split of a dataset directory, in name order: every *{split}*.bin
    (hidden files, e.g. prepare's temporaries, excluded)."""
    found = Path(data_dir).glob(f"*{split}*.bin")
    return sorted(p for p in found if p.is_file() and not p.name.startswith("."))


def llmc_header(n_tokens: int) -> bytes:
    """The 1024-byte llm.c header of a shard holding n_tokens GPT-2 ids."""
    if not 0 < n_tokens < 2**31:
        raise DataError(f"an llm.c shard holds 1 to 2**31 - 1 tokens (int32 count), not {n_tokens}")
    header = np.zeros(LLMC_HEADER_INTS, dtype="<i4")
    header[:3] = LLMC_MAGIC, LLMC_VERSION, n_tokens
    return header.tobytes()


def write_shard(path: str | Path, tokens: np.ndarray, fmt: str = "raw") -> Path:
    """Write one shard file of uint16 ids in `fmt` (tests and small tools; prepare streams)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(TOKEN_DTYPE).max):
        raise DataError("token ids must fit uint16 (0..65535)")
    with open(path, "wb") as f:
        if fmt == "llmc":
            f.write(llmc_header(tokens.size))
        f.write(tokens.astype("<u2").tobytes())
    return Path(path)


def _header(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read(LLMC_HEADER_BYTES)
    return np.frombuffer(data[: len(data) // 4 * 4], dtype="<i4")  # (<= 256,)


def _is_llmc(path: Path) -> bool:
    header = _header(path)
    return header.size >= 1 and int(header[0]) == LLMC_MAGIC


@dataclass(frozen=True)
class Shard:
    """One token file: `n_tokens` uint16 ids starting `offset` bytes into `path`."""

    path: Path
    n_tokens: int
    offset: int = 0

    def tokens(self) -> np.memmap:
        """The ids as a read-only memmap (n_tokens,); maps nothing until indexed."""
        return np.memmap(
            self.path, dtype=TOKEN_DTYPE, mode="r", offset=self.offset, shape=(self.n_tokens,)
        )


def open_shard(path: str | Path, fmt: str) -> Shard:
    """Check a shard's size (and header for llmc) without reading its tokens."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file {path} does not exist; {PREPARE_HINT}")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"token file {path} is empty; {PREPARE_HINT}")
    if fmt == "llmc":
        return _open_llmc(path, size)
    if size % 2:
        raise DataError(f"token file {path} has an odd size, it is not uint16 ids; {PREPARE_HINT}")
    header = [int(v) for v in _header(path)[:3]]
    if len(header) == 3 and header[0] == LLMC_MAGIC and LLMC_HEADER_BYTES + 2 * header[2] == size:
        raise DataError(
            f"{path} is an llm.c shard (header magic {LLMC_MAGIC}) but the dataset's "
            f'{DATASET_META} says format \'raw\'; set "format": "llmc" there or remove it'
        )
    return Shard(path, size // 2)


def _open_llmc(path: Path, size: int) -> Shard:
    what = f"{path} is not a valid llm.c token shard"
    if size < LLMC_HEADER_BYTES:
        raise DataError(f"{what}: {size} bytes, shorter than the {LLMC_HEADER_BYTES}-byte header")
    magic, version, n_tokens = (int(v) for v in _header(path)[:3])
    if magic == LLAMA3_MAGIC:
        raise DataError(
            f"{path} holds llm.c's Llama-3 tokens (magic {LLAMA3_MAGIC}, uint32); gpt3d reads "
            f"GPT-2 uint16 shards (magic {LLMC_MAGIC}): re-tokenize with recipes/prepare.py"
        )
    if magic != LLMC_MAGIC:
        raise DataError(
            f"{what}: header magic {magic}, expected {LLMC_MAGIC}; the header is corrupted or "
            "the file is in another format"
        )
    if version != LLMC_VERSION:
        raise DataError(
            f"{what}: header version {version}; gpt3d reads version {LLMC_VERSION} "
            "(GPT-2 uint16 tokens)"
        )
    if n_tokens <= 0 or LLMC_HEADER_BYTES + 2 * n_tokens != size:
        raise DataError(
            f"{what}: the header says {n_tokens} tokens ({LLMC_HEADER_BYTES + 2 * n_tokens} "
            f"bytes) but the file has {size} bytes; it is truncated or its header is corrupted"
        )
    return Shard(path, n_tokens, LLMC_HEADER_BYTES)


# ---------------------------------------------------------------------------- meta.json


def read_dataset_meta(data_dir: str | Path) -> dict:
    """meta.json with its "format" filled in; for a directory of llm.c shards without one,
    the GPT-2 description those shards carry implicitly."""
    data_dir = Path(data_dir)
    path = data_dir / DATASET_META
    if not path.is_file():
        if any(_is_llmc(p) for p in token_files(data_dir, "train")):
            return {
                "tokenizer": "gpt2",
                "vocab_size": GPT2_VOCAB,
                "eot_id": GPT2_EOT,
                "dtype": "uint16",
                "format": "llmc",
                "source": "llm.c shards (no meta.json)",
            }
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
    meta.setdefault("format", "raw")  # datasets prepared before shards existed
    if meta["format"] not in FORMATS:
        raise DataError(f"{path} says format {meta['format']!r}; expected one of {FORMATS}")
    return meta


def open_split(data_dir: str | Path, split: str, fmt: str) -> list[Shard]:
    """Every shard of a split, checked (headers and sizes only)."""
    paths = token_files(data_dir, split)
    if not paths:
        raise DataError(
            f"no {split} token files in {data_dir} ({split}.bin, or shards named "
            f"*{split}*.bin); {PREPARE_HINT}"
        )
    return [open_shard(p, fmt) for p in paths]


def n_windows(shards: list[Shard], seq_len: int) -> np.ndarray:
    """Windows of seq_len + 1 tokens per shard (B,): windows never cross a shard's end."""
    return np.array([max(0, (s.n_tokens - 1) // seq_len) for s in shards], dtype=np.int64)


# ---------------------------------------------------------------------------- validation


def validate_dataset(
    data_dir: str | Path, vocab_size: int, seq_len: int, check_ids: bool = True
) -> dict:
    """Check a dataset directory against the model before training; returns its meta.json.
    Every rank reads headers and sizes; check_ids (rank 0) also scans token ids, all of them
    up to ID_SCAN_TOKENS per split and a spread sample beyond."""
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
    both = set(token_files(data_dir, "train")) & set(token_files(data_dir, "val"))
    if both:
        raise DataError(
            f"{sorted(both)[0]} matches both *train*.bin and *val*.bin; rename it so its split "
            "is unambiguous"
        )
    for split in SPLITS:
        shards = open_split(data_dir, split, meta["format"])
        check_windows(shards, seq_len, split, data_dir)
        _check_against_meta(shards, meta, split, data_dir)
        if check_ids:
            check_token_ids(shards, vocab_size)
    return meta


def _check_against_meta(shards: list[Shard], meta: dict, split: str, data_dir: Path) -> None:
    """The files on disk are the ones meta.json describes (same names, same token counts)."""
    listed = meta.get("shards", {}).get(split)
    found = {s.path.name: s.n_tokens for s in shards}
    if listed is not None:
        listed = dict(listed)
        for name in sorted(set(found) ^ set(listed)):
            where = "is not listed in" if name in found else "is listed in"
            missing = "" if name in found else " but missing"
            raise DataError(
                f"{data_dir / name} {where} {DATASET_META}{missing}; the files come from "
                f"different preparations: {PREPARE_HINT}"
            )
        for name, n in found.items():
            if n != listed[name]:
                raise DataError(
                    f"{data_dir / name} has {n} tokens but {DATASET_META} says {listed[name]}; "
                    f"the files come from different runs: {PREPARE_HINT}"
                )
    expected = meta.get(f"{split}_tokens")
    if expected is not None and expected != sum(found.values()):
        what = shards[0].path if len(shards) == 1 else f"the {split} shards of {data_dir}"
        raise DataError(
            f"{what} hold {sum(found.values())} tokens but {DATASET_META} says {expected}; the "
            f"files come from different runs: {PREPARE_HINT}"
        )


def check_windows(shards: list[Shard], seq_len: int, split: str, data_dir: Path) -> None:
    if n_windows(shards, seq_len).sum() > 0:
        return
    hint = (
        "use a smaller seq_len or more text (for val: a larger --val-fraction in "
        "recipes/prepare.py)"
    )
    if len(shards) == 1:
        raise DataError(
            f"token file {shards[0].path} has {shards[0].n_tokens} tokens, fewer than one "
            f"sequence of seq_len + 1 = {seq_len + 1}; {hint}"
        )
    raise DataError(
        f"no {split} shard in {data_dir} holds one sequence of seq_len + 1 = {seq_len + 1} "
        f"tokens (largest: {max(s.n_tokens for s in shards)}); {hint}"
    )


def scan_spans(n_tokens: int, quota: int, pieces: int = 8) -> list[tuple[int, int]]:
    """[start, end) spans of a shard to scan: all of it if n_tokens <= quota, else `pieces`
    evenly spaced spans totalling ~quota tokens, the first at the start, the last at the end."""
    if n_tokens <= quota:
        return [(0, n_tokens)]
    width = max(1, quota // pieces)
    starts = np.linspace(0, n_tokens - width, pieces).astype(np.int64)
    return [(int(a), int(a) + width) for a in starts]


def check_token_ids(
    shards: list[Shard], vocab_size: int, budget: int = ID_SCAN_TOKENS, chunk: int = 1 << 24
) -> None:
    """Raise on the first token id >= vocab_size. Scans every token when the split holds at
    most `budget`; beyond, about `budget` tokens spread over every shard."""
    if vocab_size > np.iinfo(TOKEN_DTYPE).max:
        return  # every uint16 id fits
    total = sum(s.n_tokens for s in shards)
    quota = total if total <= budget else max(budget // len(shards), 1 << 16)
    for shard in shards:
        tokens = shard.tokens()  # (n_tokens,)
        for a, b in scan_spans(shard.n_tokens, quota):
            for start in range(a, b, chunk):
                bad = np.flatnonzero(tokens[start : min(b, start + chunk)] >= vocab_size)
                if bad.size:
                    pos = start + int(bad[0])
                    raise DataError(
                        f"{shard.path}: token id {int(tokens[pos])} at position {pos} is >= the "
                        f"model's vocab_size {vocab_size}; the file was made with another "
                        f"tokenizer or is corrupted: {PREPARE_HINT}"
                    )
