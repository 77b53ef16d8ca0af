"""Preparing token shards from text (gpt3d/prepare.py, gpt3d/sources.py, recipes/prepare.py):
whole-document splits, streaming in pieces that tokenize exactly like the whole text, worker
processes, shard files in both formats, crash safety, the progress bar. Hugging Face datasets:
tests/unit/test_prepare_hf.py."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt3d.data import ShardedLoader, validate_dataset
from gpt3d.prepare import prepare
from gpt3d.progress import Progress
from gpt3d.shards import LLMC_MAGIC
from gpt3d.sources import file_pieces, find_text_files, safe_cut
from gpt3d.tokenizer import EOT, EOT_ID, decode, get_tokenizer

REPO = Path(__file__).resolve().parents[2]
DOCS = {
    "a.txt": "First document.\nIt has two lines.\n",
    "sub/b.txt": "Zweites Dokument — naïve café ☕\n",
    "sub/deeper/c.txt": "Third one, a little longer than the others, " * 20,
}
QUIET = {"log": lambda s: None}


def write_docs(root: Path) -> Path:
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "skip.md").write_text("not a .txt file")
    return root


def read_bin(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def tricky_text(n_lines: int, seed: int = 0) -> str:
    """Lines that stress the pre-tokenizer at line breaks: trailing spaces, blank lines, CRLF
    and lone CR, digits, contractions, punctuation, non-ASCII letters."""
    rng = np.random.default_rng(seed)
    words = ["the", "King's", "1234", "  ", "naïve", "ünd", "—", "?!", "don't", "x", "\t", "42nd"]
    ends = ["\n", "\n", "\r\n", "\r", " \n", "\n\n", "  \n", "\n \n"]
    lines = [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(n_lines)]
    return "".join(line + str(rng.choice(ends)) for line in lines)


# ---------------------------------------------------------------------- splits and format


def test_prepare_tokens_split_round_trip(tmp_path):
    files = find_text_files([write_docs(tmp_path / "in")])
    assert [f.name for f in files] == ["a.txt", "b.txt", "c.txt"]  # sorted, recursive, *.txt
    meta = prepare(file_pieces(files), tmp_path / "out", ["in"], split_by="tokens", **QUIET)
    train, val = read_bin(tmp_path / "out/train.bin"), read_bin(tmp_path / "out/val.bin")
    assert decode(np.concatenate([train, val]).tolist()) == EOT.join(DOCS.values())
    assert meta == json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["documents"] == 3 and meta["vocab_size"] == 50257 and meta["eot_id"] == EOT_ID
    assert meta["shards"] == {"train": [["train.bin", len(train)]], "val": [["val.bin", len(val)]]}
    assert abs(len(val) - 0.1 * (len(train) + len(val))) <= 1
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_documents_split(tmp_path):
    files = find_text_files([write_docs(tmp_path / "in")])
    meta = prepare(file_pieces(files), tmp_path / "out", ["in"], **QUIET)
    assert meta["split_by"] == "documents" and meta["val_documents"] >= 1
    docs = []
    for split in ("train", "val"):
        docs += decode(read_bin(tmp_path / f"out/{split}.bin").tolist()).split(EOT)
    assert sorted(docs) == sorted(DOCS.values())  # whole documents, none lost or cut


def test_prepare_single_document_splits_at_end(tmp_path):
    text = "word " * 500
    meta = prepare([text], tmp_path, ["x"], val_fraction=0.2, **QUIET)
    assert meta["split_by"] == "tokens" and meta["documents"] == 1
    tokens = np.concatenate([read_bin(tmp_path / "train.bin"), read_bin(tmp_path / "val.bin")])
    assert decode(tokens.tolist()) == text and meta["val_tokens"] == round(0.2 * len(tokens))


def test_prepare_crash_leaves_no_files(tmp_path):
    def texts():
        yield "fine"
        raise RuntimeError("disk on fire")

    from tests.unit.test_data import make_dataset

    make_dataset(tmp_path)  # an older, complete preparation
    with pytest.raises(RuntimeError):
        prepare(texts(), tmp_path, ["x"], **QUIET)
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "train.bin", "val.bin"]  # no tmp files
    assert validate_dataset(tmp_path, 50257, 8)["train_tokens"] == 1001  # old one untouched


def test_not_utf8_names_the_file(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 .* iconv"):
        prepare(file_pieces([tmp_path / "latin1.txt"]), tmp_path / "out", ["x"], **QUIET)


# ------------------------------------------------------------------------------ streaming


def test_safe_cuts_never_change_the_tokens():
    """Cutting at every offset safe_cut finds (a property over random tricky texts)."""
    enc = get_tokenizer()
    cuts = 0
    for seed in range(30):
        raw = tricky_text(40, seed).encode()
        whole = enc.encode_ordinary(raw.decode().replace("\r\n", "\n").replace("\r", "\n"))
        parts, rest = [], raw
        while cut := safe_cut(rest[: len(rest) - 1]):  # leave at least one byte after a cut
            parts.append(rest[cut:])
            rest = rest[:cut]
        parts.append(rest)
        cuts += len(parts) - 1
        pieces = [p.decode().replace("\r\n", "\n").replace("\r", "\n") for p in reversed(parts)]
        assert sum((enc.encode_ordinary(p) for p in pieces), []) == whole
    assert cuts > 100  # the texts offered plenty of cuts


def test_a_file_streams_in_bounded_pieces_with_the_tokens_of_the_whole(tmp_path):
    text = tricky_text(6000)
    (tmp_path / "big.txt").write_bytes(text.encode())
    pieces = list(file_pieces([tmp_path / "big.txt"], chunk_bytes=256))
    # memory is bounded by the chunk size, not the file size (a cut every few lines)
    assert len(text) > 400 * 256 and max(len(p.text) for p in pieces) < 4 * 256
    assert [p.new_doc for p in pieces] == [True] + [False] * (len(pieces) - 1)
    prepare(pieces, tmp_path / "out", ["big"], split_by="tokens", **QUIET)
    got = np.concatenate([read_bin(tmp_path / f"out/{s}.bin") for s in ("train", "val")])
    universal = text.replace("\r\n", "\n").replace("\r", "\n")  # Python's text-mode reading
    assert got.tolist() == get_tokenizer().encode_ordinary(universal)


def test_worker_processes_give_the_same_shards(tmp_path):
    """2 tokenizing processes (real spawned workers) write byte-identical files."""
    for i in range(6):
        (tmp_path / "in" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.txt").write_text(tricky_text(400, seed=i))
    files = find_text_files([tmp_path / "in"])
    for workers in (1, 2):
        pieces = file_pieces(files, chunk_bytes=2048)
        prepare(pieces, tmp_path / f"w{workers}", ["in"], workers=workers, **QUIET)
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


# --------------------------------------------------------------------------------- shards


def test_shards_of_a_given_size_in_both_formats(tmp_path):
    files = find_text_files([write_docs(tmp_path / "in")])
    prepare(file_pieces(files), tmp_path / "one", ["in"], split_by="tokens", **QUIET)
    whole = read_bin(tmp_path / "one" / "train.bin")
    for fmt in ("raw", "llmc"):
        out = tmp_path / fmt
        meta = prepare(
            file_pieces(files), out, ["in"], split_by="tokens", shard_tokens=40, fmt=fmt, **QUIET
        )
        names = [n for n, _ in meta["shards"]["train"]]
        assert names == [f"train_{i:06d}.bin" for i in range(len(names))] and len(names) >= 3
        assert [k for _, k in meta["shards"]["train"]][:-1] == [40] * (len(names) - 1)
        assert meta["shards"]["val"] == [["val.bin", meta["val_tokens"]]]
        parts = []
        for name in names:
            data = (out / name).read_bytes()
            if fmt == "llmc":
                header = np.frombuffer(data[:1024], dtype="<i4")
                assert header[:3].tolist() == [LLMC_MAGIC, 1, (len(data) - 1024) // 2]
                assert not header[3:].any()
                data = data[1024:]
            parts.append(np.frombuffer(data, dtype=np.uint16))
        assert np.array_equal(np.concatenate(parts), whole)
        assert validate_dataset(out, 50257, 8)["format"] == fmt
    raw, llmc = (ShardedLoader(tmp_path / f, "train", 8, 4, 0) for f in ("raw", "llmc"))
    for step in range(3):
        assert all(
            torch.equal(a, b)
            for a, b in zip(raw.batch_for_step(step), llmc.batch_for_step(step), strict=True)
        )


def test_preparing_again_replaces_every_shard(tmp_path):
    files, out = find_text_files([write_docs(tmp_path / "in")]), tmp_path / "out"
    prepare(file_pieces(files), out, ["in"], split_by="tokens", shard_tokens=40, **QUIET)
    assert len(list(out.glob("train_*.bin"))) >= 3
    prepare(file_pieces(files), out, ["in"], split_by="tokens", **QUIET)
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    assert validate_dataset(out, 50257, 8)["shards"]["train"][0][0] == "train.bin"


# ------------------------------------------------------------------------ progress and CLI


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_with_rate_and_eta():
    clock, term = FakeClock(), Terminal()
    bar = Progress(total=10 * 2**20, unit="MB", stream=term, clock=clock)
    for _ in range(4):
        clock.now += 1.0
        bar.update(2**20, items=1, tokens=250_000)  # 1 MB/s
    bar.close()
    frames = term.getvalue().split("\r")[1:]
    assert len(frames) == 5 and term.getvalue().endswith("\n")
    assert frames[0].startswith("prepare  10% [##..................] | 1.0/10.0 MB | 1.00 MB/s")
    assert "0.2M tokens | 0:01, eta 0:09" in frames[0]
    assert "40% [########............] | 4.0/10.0 MB" in frames[3] and "eta 0:06" in frames[3]
    log = io.StringIO()  # not a terminal: a plain line every `every_s`
    bar = Progress(total=None, unit="docs", stream=log, every_s=10.0, clock=clock)
    for _ in range(25):
        clock.now += 1.0
        bar.update(1000, items=2)
    assert len(log.getvalue().splitlines()) == 2 and "\r" not in log.getvalue()
    assert log.getvalue().splitlines()[0].startswith("prepare | 20 docs | ")


def test_prepare_cli(tmp_path):
    (tmp_path / "doc.txt").write_text("To be, or not to be, that is the question. " * 10)
    cmd = [sys.executable, str(REPO / "recipes/prepare.py"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(
        [*cmd, "--format", "llmc", str(tmp_path / "doc.txt")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "100% [####################]" in proc.stderr and "MB/s" in proc.stderr
    meta = validate_dataset(tmp_path / "out", 50257, 4)
    assert meta["documents"] == 1 and meta["source"] == [str(tmp_path / "doc.txt")]
    assert meta["format"] == "llmc"
    bad = subprocess.run([*cmd, str(tmp_path / "nope.txt")], capture_output=True, text=True)
    assert bad.returncode == 2 and "prepare: error: input" in bad.stderr
    assert "Traceback" not in bad.stderr
