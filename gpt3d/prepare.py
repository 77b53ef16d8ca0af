"""Text documents -> train.bin, val.bin (np.uint16 GPT-2 ids) and meta.json. See gpt3d/data.py.

Each input file (or dataset record) is one document; within a split, documents are joined with
<|endoftext|> (id 50256) as separator. Val is either whole documents (chosen by a seeded
shuffle until they reach val_fraction of the tokens, keeping at least one document for train)
or the last val_fraction of the joined token stream (the only option for a single document).

Memory stays small for big inputs: documents are tokenized one by one into a temporary joined
file, then copied into the split files. Outputs are written to temporary names and renamed into
place only once everything is tokenized; meta.json is removed before the renames and
written last, so a crash leaves either the previous preparation intact or no meta.json (which
gpt3d.data.validate_dataset rejects) and never a meta.json describing other .bin files.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from gpt3d.data import DATASET_META, TOKEN_DTYPE
from gpt3d.errors import DataError
from gpt3d.tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer

SPLIT_BY = ("auto", "documents", "tokens")


def find_text_files(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, directories expanded to their *.txt files (recursive, sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*.txt") if p.is_file())
            if not found:
                raise DataError(f"directory {item} has no *.txt files; pass text files or dirs")
            files += found
        elif item.is_file():
            files.append(item)
        else:
            raise DataError(f"input {item} does not exist; pass text files or directories")
    if not files:
        raise DataError("no inputs: pass text files or directories (or --hf-dataset NAME)")
    return files


def read_texts(files: Iterable[Path]) -> Iterator[str]:
    """One document per file; universal newlines turn CRLF / CR into LF."""
    for path in files:
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 ({e}); convert it, e.g. with iconv") from e


def hf_texts(
    name: str, split: str, limit: int | None, text_field: str = "text", config: str | None = None
) -> Iterator[str]:
    """Stream documents from a Hugging Face dataset (needs the optional `datasets` package)."""
    try:
        import datasets
    except ImportError as e:
        raise DataError("--hf-dataset needs the `datasets` package: pip install datasets") from e
    rows = datasets.load_dataset(name, config, split=split, streaming=True)
    return (row[text_field] for row in itertools.islice(rows, limit))


def tokenize_joined(
    texts: Iterable[str], path: Path, progress_mb: float, log: Callable[[str], None]
) -> list[int]:
    """Write documents joined by EOT to `path`; return each document's token count."""
    enc = get_tokenizer()
    lengths: list[int] = []
    step = progress_mb * 2**20  # bytes of text between progress lines
    n_bytes, next_report, t0 = 0, step, time.perf_counter()
    with open(path, "wb") as f:
        for text in texts:
            ids = enc.encode_ordinary(text)
            if lengths:
                f.write(np.array([EOT_ID], dtype=TOKEN_DTYPE).tobytes())
            f.write(np.asarray(ids, dtype=TOKEN_DTYPE).tobytes())
            lengths.append(len(ids))
            n_bytes += len(text.encode("utf-8"))
            if n_bytes >= next_report:
                next_report = (n_bytes // step + 1) * step
                mb, s = n_bytes / 2**20, time.perf_counter() - t0
                log(
                    f"prepare: {mb:,.0f} MB text, {len(lengths):,} docs, "
                    f"{(sum(lengths) + len(lengths) - 1) / 1e6:,.1f}M tokens, {mb / s:.1f} MB/s"
                )
    if sum(lengths) == 0:
        raise DataError(f"the inputs hold no text ({len(lengths)} documents, 0 tokens)")
    return lengths


def choose_val_documents(lengths: Sequence[int], val_fraction: float, seed: int) -> np.ndarray:
    """Bool mask (n_docs,): documents in a seeded shuffle go to val until their tokens reach
    val_fraction of all document tokens; at least one document stays in train."""
    target = val_fraction * sum(lengths)
    is_val = np.zeros(len(lengths), dtype=bool)
    val_tokens = 0
    for i in np.random.default_rng(seed).permutation(len(lengths))[: len(lengths) - 1]:
        if val_tokens >= target:
            break
        is_val[i], val_tokens = True, val_tokens + lengths[i]
    return is_val


def write_documents(joined: np.ndarray, starts: np.ndarray, ends: np.ndarray, path: Path) -> int:
    """Copy spans [starts[i], ends[i]) of the joined stream into `path`, EOT-separated;
    return the number of tokens written."""
    eot = np.array([EOT_ID], dtype=TOKEN_DTYPE)
    with open(path, "wb") as f:
        for j, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            if j:
                eot.tofile(f)
            joined[a:b].tofile(f)
    return int((ends - starts).sum()) + max(len(starts) - 1, 0)


def split_files(
    joined_path: Path,
    lengths: list[int],
    split_by: str,
    val_fraction: float,
    seed: int,
    train_path: Path,
    val_path: Path,
) -> tuple[int, int, int]:
    """joined stream -> train/val files; returns (train_tokens, val_tokens, val_documents)."""
    joined = np.memmap(joined_path, dtype=TOKEN_DTYPE, mode="r")  # (n_tokens,)
    n = len(joined)
    if split_by == "tokens":  # one span each: the stream cut at n - n_val
        cut = n - max(1, round(val_fraction * n))
        starts, ends, is_val = np.array([0, cut]), np.array([cut, n]), np.array([False, True])
    else:  # document i is joined[starts[i] : ends[i]]; one EOT between neighbours
        ends = np.cumsum(np.asarray(lengths, dtype=np.int64) + 1) - 1  # (n_docs,)
        starts = ends - np.asarray(lengths, dtype=np.int64)
        is_val = choose_val_documents(lengths, val_fraction, seed)
    n_train = write_documents(joined, starts[~is_val], ends[~is_val], train_path)
    n_val = write_documents(joined, starts[is_val], ends[is_val], val_path)
    n_val_docs = int(is_val.sum()) if split_by == "documents" else 0
    del joined
    return n_train, n_val, n_val_docs


def prepare(
    texts: Iterable[str],
    out_dir: str | Path,
    source: list[str],
    val_fraction: float = 0.1,
    split_by: str = "auto",
    seed: int = 1337,
    progress_mb: float = 64.0,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenize documents into out_dir/{train.bin, val.bin, meta.json}; returns the meta."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if split_by not in SPLIT_BY:
        raise DataError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = {k: out / f".{k}.tmp-{os.getpid()}" for k in ("joined", "train", "val", "meta")}
    try:
        lengths = tokenize_joined(texts, tmp["joined"], progress_mb, log)
        if split_by == "auto":
            split_by = "documents" if len(lengths) > 1 else "tokens"
        if split_by == "documents" and len(lengths) < 2:
            raise DataError("split_by='documents' needs >= 2 documents; use split_by='tokens'")
        n_train, n_val, n_val_docs = split_files(
            tmp["joined"], lengths, split_by, val_fraction, seed, tmp["train"], tmp["val"]
        )
        if n_train == 0 or n_val == 0:
            raise DataError(f"too little text: {n_train} train and {n_val} val tokens")
        meta = {
            "tokenizer": "gpt2",
            "vocab_size": VOCAB_SIZE,
            "eot_id": EOT_ID,
            "dtype": "uint16",
            "train_tokens": n_train,
            "val_tokens": n_val,
            "documents": len(lengths),
            "val_documents": n_val_docs,
            "split_by": split_by,
            "val_fraction": val_fraction,
            "seed": seed,
            "source": source,
        }
        tmp["meta"].write_text(json.dumps(meta, indent=2) + "\n")
        (out / DATASET_META).unlink(missing_ok=True)  # no meta.json while .bin files change
        os.replace(tmp["train"], out / "train.bin")
        os.replace(tmp["val"], out / "val.bin")
        os.replace(tmp["meta"], out / DATASET_META)
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)
    log(
        f"prepare: {len(lengths)} documents -> {out}: train {n_train:,} tokens, "
        f"val {n_val:,} tokens ({split_by} split, {n_val_docs} val documents)"
    )
    return meta
