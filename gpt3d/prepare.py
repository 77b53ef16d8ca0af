"""Text documents -> token shards (GPT-2 ids) + meta.json. Files and formats: gpt3d/shards.py.

Each input file (or dataset record) is one document; within a split, documents are joined with
<|endoftext|> (id 50256) as separator. Val is either whole documents (chosen by a seeded
shuffle until they reach val_fraction of the tokens, keeping at least one document for train)
or the last val_fraction of the joined token stream (the only option for a single document).

At corpus scale: pieces of about 1 MiB (gpt3d/sources.py) are tokenized by `workers` processes,
at most 2 * workers batches ahead of the writer, in input order, into one temporary joined
file; memory stays bounded whatever the input size (8 bytes per document are kept, for the
val choice). The joined file is then copied, in bounded blocks, into each split's shards of
at most shard_tokens tokens: `{split}.bin` when one is enough, else `{split}_000000.bin`, ...
in gpt3d's raw format or llm.c's. Disk: about twice the output while it runs.

Outputs are written to temporary names and renamed into place only once everything is
tokenized; meta.json is removed before the renames (with any stale shard of an earlier
preparation) and written last, so a crash leaves either the previous preparation intact or no
meta.json (which gpt3d.data.validate_dataset rejects), never a meta.json describing other
files.
"""

from __future__ import annotations

import json
import os
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from gpt3d.errors import DataError
from gpt3d.progress import Progress
from gpt3d.shards import DATASET_META, FORMATS, SPLITS, TOKEN_DTYPE, llmc_header, token_files
from gpt3d.sources import Piece
from gpt3d.tokenizer import EOT_ID, VOCAB_SIZE, get_tokenizer

SPLIT_BY = ("auto", "documents", "tokens")
SHARD_TOKENS = 100_000_000  # llm.c's shard size (200 MB of uint16)
BATCH_BYTES = 1 << 20  # text handed to a worker at once
EOT = np.array([EOT_ID], dtype=TOKEN_DTYPE)


# ---------------------------------------------------------------------- parallel tokenization


def encode_batch(batch: list[tuple[bytes | str, str]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Worker: [(text, where)] -> (ids of all pieces (N,) uint16, ids per piece (P,), bytes)."""
    enc = get_tokenizer()
    arrays, n_bytes = [], 0
    for text, where in batch:
        if isinstance(text, bytes):
            n_bytes += len(text)
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{where} is not UTF-8 ({e}); convert it, e.g. with iconv"
                ) from None
            text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines
        else:
            n_bytes += len(text.encode("utf-8"))
        arrays.append(np.asarray(enc.encode_ordinary(text), dtype=TOKEN_DTYPE))
    counts = np.array([a.size for a in arrays], dtype=np.int64)
    return np.concatenate(arrays), counts, n_bytes


def _batches(pieces: Iterable[Piece], batch_bytes: int) -> Iterator[list[Piece]]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenized(
    pieces: Iterable[Piece], workers: int, batch_bytes: int = BATCH_BYTES
) -> Iterator[tuple[list[bool], np.ndarray, np.ndarray, int]]:
    """(new_doc flags, ids, ids per piece, input bytes) per batch, in input order. With
    workers > 1, that many processes tokenize at most 2 * workers batches ahead."""
    batches = _batches(pieces, batch_bytes)
    if workers <= 1:
        for b in batches:
            yield [p.new_doc for p in b], *encode_batch([(p.text, p.where) for p in b])
        return
    ctx = get_context("spawn")  # safe in any parent (threads, torch); workers import no torch
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=get_tokenizer)
    pending: deque = deque()
    try:
        for b in batches:
            job = pool.submit(encode_batch, [(p.text, p.where) for p in b])
            pending.append(([p.new_doc for p in b], job))
            if len(pending) >= 2 * workers:
                flags, job = pending.popleft()
                yield flags, *job.result()
        while pending:
            flags, job = pending.popleft()
            yield flags, *job.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def tokenize_joined(
    pieces: Iterable[Piece], path: Path, workers: int, progress: Progress | None
) -> np.ndarray:
    """Write the documents joined by EOT to `path`; return each document's token count."""
    lengths = array("q")  # (n_docs,) 8 bytes per document
    with open(path, "wb") as f:
        for flags, ids, counts, n_bytes in tokenized(pieces, workers):
            out, offset = [], 0
            for new_doc, n in zip(flags, counts.tolist(), strict=True):
                if new_doc:
                    if lengths:
                        out.append(EOT)
                    lengths.append(0)
                assert lengths, "the first piece must start a document"
                out.append(ids[offset : offset + n])
                lengths[-1] += n
                offset += n
            np.concatenate(out).tofile(f)
            if progress:
                progress.update(n_bytes, sum(flags), ids.size)
    lengths = np.frombuffer(lengths, dtype=np.int64) if lengths else np.zeros(0, np.int64)
    if lengths.sum() == 0:
        raise DataError(f"the inputs hold no text ({len(lengths)} documents, 0 tokens)")
    return lengths


# ---------------------------------------------------------------------- train / val split


def choose_val_documents(lengths: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Bool mask (n_docs,): documents in a seeded shuffle go to val until their tokens reach
    val_fraction of all document tokens; at least one document stays in train."""
    target = val_fraction * int(np.sum(lengths))
    is_val = np.zeros(len(lengths), dtype=bool)
    val_tokens = 0
    for i in np.random.default_rng(seed).permutation(len(lengths))[: len(lengths) - 1]:
        if val_tokens >= target:
            break
        is_val[i], val_tokens = True, val_tokens + int(lengths[i])
    return is_val


def split_runs(
    lengths: np.ndarray, split_by: str, val_fraction: float, seed: int
) -> tuple[dict, int]:
    """({split: [(start, end)]} spans of the joined stream, val documents): a split's output is
    its spans joined by EOT; consecutive documents of one split form one span (EOTs between
    them included)."""
    n = int(lengths.sum()) + len(lengths) - 1  # tokens in the joined stream
    if split_by == "tokens":  # the stream cut at n - n_val
        cut = n - max(1, round(val_fraction * n))
        starts, ends, is_val = np.array([0, cut]), np.array([cut, n]), np.array([False, True])
    else:  # document i is joined[starts[i] : ends[i]]; one EOT between neighbours
        ends = np.cumsum(lengths + 1) - 1  # (n_docs,)
        starts = ends - lengths
        is_val = choose_val_documents(lengths, val_fraction, seed)
    first = np.concatenate([[0], np.flatnonzero(np.diff(is_val.astype(np.int8))) + 1])
    last = np.concatenate([first[1:] - 1, [len(is_val) - 1]])  # runs [first, last] of one split
    runs: dict = {split: [] for split in SPLITS}
    for a, b, val in zip(starts[first], ends[last], is_val[first], strict=True):
        runs["val" if val else "train"].append((int(a), int(b)))
    return runs, int(is_val.sum()) if split_by == "documents" else 0


def run_tokens(runs: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in runs) + max(len(runs) - 1, 0)


class ShardWriter:
    """One split's tokens -> files of at most shard_tokens tokens (0: one file): `{split}.bin`
    when one is enough, else `{split}_000000.bin`, ...; written under temporary names."""

    def __init__(self, out: Path, split: str, total: int, shard_tokens: int, fmt: str, tag: str):
        per = shard_tokens or total
        sizes = [per] * (total // per) + ([total % per] if total % per else [])
        names = (
            [f"{split}.bin"]
            if len(sizes) == 1
            else [f"{split}_{i:06d}.bin" for i in range(len(sizes))]
        )
        self.files = [
            (out / f".{n}.tmp-{tag}", out / n, k) for n, k in zip(names, sizes, strict=True)
        ]
        self.fmt, self._next, self._left, self._f = fmt, 0, 0, None

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            if self._left == 0:
                self._open_next()
            take = ids[: self._left]
            take.astype("<u2", copy=False).tofile(self._f)
            self._left -= take.size
            ids = ids[take.size :]

    def _open_next(self) -> None:
        self.close()
        tmp, _, n = self.files[self._next]
        self._f = open(tmp, "wb")  # noqa: SIM115  (closed by close(), also on errors)
        self._left, self._next = n, self._next + 1
        if self.fmt == "llmc":
            self._f.write(llmc_header(n))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def copy_runs(joined: Path, runs: list[tuple[int, int]], writer: ShardWriter, block=1 << 22):
    """The spans of the joined file, EOT between them, into the writer (bounded memory)."""
    with open(joined, "rb") as src:
        for j, (a, b) in enumerate(runs):
            if j:
                writer.write(EOT)
            src.seek(2 * a)
            for lo in range(a, b, block):
                writer.write(np.frombuffer(src.read(2 * min(block, b - lo)), dtype=TOKEN_DTYPE))
    writer.close()


# ---------------------------------------------------------------------- the whole preparation


def _install(out: Path, writers: dict[str, ShardWriter], meta_tmp: Path) -> None:
    """Rename everything into place; meta.json last, stale shards of older runs removed."""
    (out / DATASET_META).unlink(missing_ok=True)  # no meta.json while token files change
    new = {final for w in writers.values() for _, final, _ in w.files}
    for split in SPLITS:
        for old in token_files(out, split):
            if old not in new:
                old.unlink()
    for w in writers.values():
        for tmp, final, _ in w.files:
            os.replace(tmp, final)
    os.replace(meta_tmp, out / DATASET_META)


def prepare(
    documents: Iterable[str | Piece],
    out_dir: str | Path,
    source: list[str],
    val_fraction: float = 0.1,
    split_by: str = "auto",
    seed: int = 1337,
    workers: int = 1,
    shard_tokens: int = SHARD_TOKENS,
    fmt: str = "raw",
    progress: Progress | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Tokenize documents (whole strings, or Pieces from gpt3d.sources) into out_dir's shards
    and meta.json; returns the meta. workers: tokenizing processes (1 = this process)."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if split_by not in SPLIT_BY:
        raise DataError(f"split_by must be one of {SPLIT_BY}, got {split_by!r}")
    if fmt not in FORMATS or shard_tokens < 0:
        raise DataError(
            f"need format in {FORMATS} and shard_tokens >= 0, got {fmt!r}, {shard_tokens}"
        )
    pieces = (d if isinstance(d, Piece) else Piece(d, True) for d in documents)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag, t0 = str(os.getpid()), time.perf_counter()
    joined, meta_tmp = out / f".joined.tmp-{tag}", out / f".meta.tmp-{tag}"
    writers: dict[str, ShardWriter] = {}
    try:
        lengths = tokenize_joined(pieces, joined, workers, progress)
        if progress:
            progress.close()
        if split_by == "auto":
            split_by = "documents" if len(lengths) > 1 else "tokens"
        if split_by == "documents" and len(lengths) < 2:
            raise DataError("split_by='documents' needs >= 2 documents; use split_by='tokens'")
        runs, n_val_docs = split_runs(lengths, split_by, val_fraction, seed)
        n = {split: run_tokens(runs[split]) for split in SPLITS}
        if n["train"] == 0 or n["val"] == 0:
            raise DataError(f"too little text: {n['train']} train and {n['val']} val tokens")
        for split in SPLITS:
            writers[split] = ShardWriter(out, split, n[split], shard_tokens, fmt, tag)
            copy_runs(joined, runs[split], writers[split])
        meta = {
            "tokenizer": "gpt2",
            "vocab_size": VOCAB_SIZE,
            "eot_id": EOT_ID,
            "dtype": "uint16",
            "format": fmt,
            "train_tokens": n["train"],
            "val_tokens": n["val"],
            "documents": len(lengths),
            "val_documents": n_val_docs,
            "split_by": split_by,
            "val_fraction": val_fraction,
            "seed": seed,
            "shard_tokens": shard_tokens,
            "shards": {s: [[f.name, k] for _, f, k in writers[s].files] for s in SPLITS},
            "source": source,
        }
        meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        _install(out, writers, meta_tmp)
    finally:
        for w in writers.values():
            w.close()
        for path in [joined, meta_tmp, *(t for w in writers.values() for t, _, _ in w.files)]:
            path.unlink(missing_ok=True)
    shards = {s: len(writers[s].files) for s in SPLITS}
    log(
        f"prepare: {len(lengths)} documents -> {out}: train {n['train']:,} tokens "
        f"({shards['train']} shard(s)), val {n['val']:,} tokens ({shards['val']}), {fmt} "
        f"format, {split_by} split, {n_val_docs} val documents; {time.perf_counter() - t0:.1f}s"
    )
    return meta
