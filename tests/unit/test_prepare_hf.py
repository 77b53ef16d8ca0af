"""recipes/prepare.py --hf-dataset on data built on disk, offline: parquet files through the
`parquet` builder, a directory of JSON lines, a Dataset.save_to_disk directory, streamed and
downloaded. Hub datasets take the same datasets.load_dataset call (docs/data.md)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt3d.errors import DataError
from gpt3d.sources import _datasets, hf_pieces, open_hf_dataset
from gpt3d.tokenizer import EOT_ID, get_tokenizer

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.slow  # a few CLI launches, each importing datasets (~3 s)

REPO = Path(__file__).resolve().parents[2]
DOCS = [f"Document {i}: " + "naïve words, here. " * (i % 7 + 1) for i in range(60)]


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    ds = datasets.Dataset.from_dict({"id": list(range(len(DOCS))), "text": DOCS})
    ds.save_to_disk(str(root / "saved"))
    (root / "pq").mkdir()
    ds.select(range(30)).to_parquet(str(root / "pq" / "part-0.parquet"))
    ds.select(range(30, 60)).to_parquet(str(root / "pq" / "part-1.parquet"))
    (root / "js").mkdir()
    ds.to_json(str(root / "js" / "data.jsonl"))
    return root


def prepare_cli(root: Path, out: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"
    )
    cmd = [sys.executable, str(REPO / "recipes/prepare.py"), "--out", str(root / out), *args]
    return subprocess.run(
        [*cmd, "--split-by", "tokens", "--quiet"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def tokens_of(out: Path) -> list[int]:
    return np.concatenate(
        [np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")]
    ).tolist()


def expected(docs: list[str]) -> list[int]:
    enc = get_tokenizer()
    ids = []
    for i, doc in enumerate(docs):
        ids += ([EOT_ID] if i else []) + enc.encode_ordinary(doc)
    return ids


def test_parquet_files_stream_through_load_dataset(local):
    proc = prepare_cli(
        local, "pq_out", "--hf-dataset", "parquet", "--hf-data-files", "pq/*.parquet"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tokens_of(local / "pq_out") == expected(DOCS)
    assert "60 documents" in proc.stdout


def test_json_directory_with_a_record_limit(local):
    proc = prepare_cli(local, "js_out", "--hf-dataset", str(local / "js"), "--hf-limit", "20")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tokens_of(local / "js_out") == expected(DOCS[:20])


@pytest.mark.parametrize("mode", [[], ["--hf-download"]])
def test_save_to_disk_directory_streamed_or_loaded(local, mode):
    out = f"saved_out{len(mode)}"
    proc = prepare_cli(local, out, "--hf-dataset", str(local / "saved"), *mode)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tokens_of(local / out) == expected(DOCS)


def test_bad_field_and_missing_package_are_clear_errors(local, monkeypatch):
    ds = open_hf_dataset(str(local / "saved"), streaming=True)
    with pytest.raises(DataError, match=r"no field 'body' \(its fields: \['id', 'text'\]\)"):
        next(hf_pieces(ds, text_field="body"))
    with pytest.raises(DataError, match=r"field 'id' is int, not text"):
        next(hf_pieces(ds, text_field="id"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"pip install 'gpt3d\[hf\]'"):
        _datasets()
