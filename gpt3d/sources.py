"""Where recipes/prepare.py's text comes from, as a stream of pieces of bounded size:
local text files (one document per file) and Hugging Face datasets (one document per record,
local files or the hub through the same `datasets.load_dataset`, streamed).

A big file is read in chunks and cut only where GPT-2's pre-tokenizer has a boundary anyway,
so its tokens are exactly those of the whole file encoded at once (see safe_cut): memory stays
bounded by the chunk size (times the longest line that offers no cut), whatever the file size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from gpt3d.errors import DataError

CHUNK_BYTES = 1 << 20  # read files in pieces of about this size
_LF, _CR = 0x0A, 0x0D


@dataclass(frozen=True)
class Piece:
    """Part of a document. bytes: raw UTF-8 from a file, decoded (universal newlines) where
    it is tokenized; str: text as given."""

    text: bytes | str
    new_doc: bool  # the first piece of a document
    where: str = ""  # the file or record, for error messages


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


def _printable(byte: int) -> bool:
    return 0x21 <= byte <= 0x7E  # ASCII, not whitespace, never part of a multi-byte character


def safe_cut(buf: bytes, lo: int = 0) -> int:
    """The last offset where buf can be split without changing its GPT-2 tokens, 0 if none:
    just after a line break (\\n, \\r\\n or \\r) with a printable ASCII character on each side.

    Why it is safe: GPT-2's pattern (gpt3d/tokenizer.py) puts a line break only in whitespace
    pieces; with non-space characters on both sides that piece is the line break alone, in the
    whole text (matched by `\\s`) and at the end of the first part (`\\s++$`) alike. Pieces
    before it never look past it, the pattern has no look-behind, and BPE merges stay inside a
    piece; so both parts tokenize to the pieces of the whole. Only breaks at offsets >= lo
    are considered."""
    end = len(buf)
    while True:
        j = max(buf.rfind(b"\n", lo, end), buf.rfind(b"\r", lo, end))
        if j < 1:
            return 0
        before = j - 2 if buf[j] == _LF and buf[j - 1] == _CR else j - 1
        if j + 1 < len(buf) and _printable(buf[j + 1]) and before >= 0 and _printable(buf[before]):
            return j + 1
        end = j


def file_pieces(files: Sequence[Path], chunk_bytes: int = CHUNK_BYTES) -> Iterator[Piece]:
    """Each file as one document, in pieces of about chunk_bytes cut at safe_cut offsets."""
    for path in files:
        with open(path, "rb") as f:
            parts, size, first = [], 0, True
            while data := f.read(chunk_bytes):
                parts.append(data)
                size += len(data)
                if size < chunk_bytes:
                    continue
                buf = b"".join(parts)
                cut = safe_cut(buf, max(0, len(buf) - len(data) - 3))  # new bytes only
                parts, size = [buf[cut:]] if cut else [buf], len(buf) - cut
                if cut:
                    yield Piece(buf[:cut], first, str(path))
                    first = False
            rest = b"".join(parts)
            if rest or first:  # an empty file is an empty document
                yield Piece(rest, first, str(path))


def file_bytes(files: Sequence[Path]) -> int:
    return sum(p.stat().st_size for p in files)


# ------------------------------------------------------------------------ Hugging Face


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "--hf-dataset needs the optional `datasets` package: pip install 'gpt3d[hf]'"
        ) from e
    return datasets


def open_hf_dataset(
    name: str,
    split: str = "train",
    config: str | None = None,
    data_files: list[str] | None = None,
    streaming: bool = True,
):
    """One split of a dataset: a hub name ("HuggingFaceFW/fineweb"), a builder with local
    files ("parquet" / "json" + data_files), a local directory of such files, all through
    datasets.load_dataset; or a directory written by Dataset.save_to_disk (load_from_disk).
    streaming=True reads records lazily (hub: over HTTP, nothing cached first)."""
    datasets = _datasets()
    path = Path(name)
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{name} has splits {list(ds)}, not {split!r} (--hf-split)")
                ds = ds[split]
            return ds.to_iterable_dataset() if streaming else ds
        return datasets.load_dataset(
            name, config, split=split, data_files=data_files, streaming=streaming
        )
    except (FileNotFoundError, ConnectionError) as e:
        raise DataError(f"--hf-dataset {name}: {e}") from e


def hf_total(ds, split: str, limit: int | None) -> int | None:
    """Records the stream will yield, when known (for the progress bar's ETA)."""
    splits = getattr(getattr(ds, "info", None), "splits", None) or {}
    known = getattr(splits.get(split), "num_examples", None) if split in splits else None
    known = known or (len(ds) if hasattr(ds, "__len__") else None)
    return min(x for x in (known, limit) if x) if (known or limit) else None


def hf_pieces(ds, limit: int | None = None, text_field: str = "text") -> Iterator[Piece]:
    """One document per record: the record's `text_field` string."""
    for i, row in enumerate(itertools.islice(ds, limit)):
        if text_field not in row:
            raise DataError(
                f"record {i} has no field {text_field!r} (its fields: {sorted(row)}); pick one "
                "with --hf-text-field"
            )
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"record {i}: field {text_field!r} is {type(text).__name__}, not text")
        yield Piece(text, True, f"record {i}")
