"""Data preparation and the sharded, resumable loader (gpt3d/prepare.py, gpt3d/data.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt3d.data import ShardedLoader, TokenDataset, eval_batches, validate_dataset
from gpt3d.prepare import find_text_files, prepare, read_texts
from gpt3d.tokenizer import EOT, EOT_ID, decode

REPO = Path(__file__).resolve().parents[2]
DOCS = {
    "a.txt": "First document.\nIt has two lines.\n",
    "sub/b.txt": "Zweites Dokument — naïve café ☕\n",
    "sub/deeper/c.txt": "Third one, a little longer than the others, " * 20,
}
T = 8  # seq_len in loader tests


def write_docs(root: Path) -> Path:
    for name, text in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "skip.md").write_text("not a .txt file")
    return root


def read_bin(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def make_dataset(root: Path, n_train: int = 1001, n_val: int = 201, vocab: int = 50257) -> Path:
    """Synthetic prepared dir: token i = i % 50000, so a window is identified by x[0]."""
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        (np.arange(n) % 50000).astype(np.uint16).tofile(root / f"{split}.bin")
    meta = {
        "tokenizer": "gpt2",
        "vocab_size": vocab,
        "eot_id": EOT_ID,
        "dtype": "uint16",
        "train_tokens": n_train,
        "val_tokens": n_val,
    }
    (root / "meta.json").write_text(json.dumps(meta))
    return root


def ids_of(loader: ShardedLoader, steps: int) -> list[list[int]]:
    return [loader.next_batch()[2].tolist() for _ in range(steps)]


# ----------------------------------------------------------------------------- prepare


def test_prepare_tokens_split_round_trip(tmp_path):
    files = find_text_files([write_docs(tmp_path / "in")])
    assert [f.name for f in files] == ["a.txt", "b.txt", "c.txt"]  # sorted, recursive, *.txt
    meta = prepare(read_texts(files), tmp_path / "out", ["in"], split_by="tokens", log=lambda s: 0)
    train, val = read_bin(tmp_path / "out/train.bin"), read_bin(tmp_path / "out/val.bin")
    assert decode(np.concatenate([train, val]).tolist()) == EOT.join(DOCS.values())
    assert meta == json.loads((tmp_path / "out/meta.json").read_text())
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["documents"] == 3 and meta["vocab_size"] == 50257 and meta["eot_id"] == EOT_ID
    assert abs(len(val) - 0.1 * (len(train) + len(val))) <= 1
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin", "val.bin"]


def test_prepare_documents_split(tmp_path):
    files = find_text_files([write_docs(tmp_path / "in")])
    meta = prepare(read_texts(files), tmp_path / "out", ["in"], log=lambda s: 0)
    assert meta["split_by"] == "documents" and meta["val_documents"] >= 1
    docs = []
    for split in ("train", "val"):
        docs += decode(read_bin(tmp_path / f"out/{split}.bin").tolist()).split(EOT)
    assert sorted(docs) == sorted(DOCS.values())  # whole documents, none lost or cut


def test_prepare_single_document_splits_at_end(tmp_path):
    text = "word " * 500
    meta = prepare([text], tmp_path, ["x"], val_fraction=0.2, log=lambda s: 0)
    assert meta["split_by"] == "tokens" and meta["documents"] == 1
    tokens = np.concatenate([read_bin(tmp_path / "train.bin"), read_bin(tmp_path / "val.bin")])
    assert decode(tokens.tolist()) == text and meta["val_tokens"] == round(0.2 * len(tokens))


def test_prepare_crash_leaves_no_files(tmp_path):
    def texts():
        yield "fine"
        raise RuntimeError("disk on fire")

    make_dataset(tmp_path)  # an older, complete preparation
    with pytest.raises(RuntimeError):
        prepare(texts(), tmp_path, ["x"], log=lambda s: 0)
    assert sorted(os.listdir(tmp_path)) == ["meta.json", "train.bin", "val.bin"]  # no tmp files
    assert validate_dataset(tmp_path, 50257, T)["train_tokens"] == 1001  # old one untouched


def test_prepare_cli(tmp_path):
    (tmp_path / "doc.txt").write_text("To be, or not to be, that is the question. " * 10)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "recipes/prepare.py"), "--out", str(tmp_path / "out")]
    subprocess.run([*cmd, str(tmp_path / "doc.txt")], check=True, env=env, capture_output=True)
    meta = validate_dataset(tmp_path / "out", 50257, 4)
    assert meta["documents"] == 1 and meta["source"] == [str(tmp_path / "doc.txt")]


# ------------------------------------------------------------------------------ loader


def test_windows_are_shifted_pairs(tmp_path):
    ds = TokenDataset(make_dataset(tmp_path) / "train.bin", T)
    assert ds.n_windows == (1001 - 1) // T == 125
    x, y = ds.windows(np.array([0, 124]))
    assert x.shape == y.shape == (2, T) and x.dtype == torch.int64
    assert x[1].tolist() == list(range(124 * T, 125 * T))
    assert torch.equal(y[:, :-1], x[:, 1:]) and y[1, -1].item() == 1000


def test_same_seed_same_order_other_seed_differs(tmp_path):
    d = make_dataset(tmp_path)
    a = ids_of(ShardedLoader(d, "train", T, 16, seed=3), 3)
    b = ShardedLoader(d, "train", T, 16, seed=3)
    c = ShardedLoader(d, "train", T, 16, seed=4)
    xa = [ShardedLoader(d, "train", T, 16, seed=3).batch_for_step(s)[0] for s in range(3)]
    xb = [b.next_batch()[0] for _ in range(3)]
    assert a == [list(range(s * 16, (s + 1) * 16)) for s in range(3)]  # ids are global positions
    assert all(torch.equal(p, q) for p, q in zip(xa, xb, strict=True))
    assert not torch.equal(c.batch_for_step(0)[0], xa[0])


def test_dp_slices_partition_the_global_batch(tmp_path):
    d = make_dataset(tmp_path)
    for step in range(4):
        x1, _, ids1 = ShardedLoader(d, "train", T, 12, seed=0).batch_for_step(step)
        for dp in (2, 3, 4):
            parts = [
                ShardedLoader(d, "train", T, 12, 0, r, dp).batch_for_step(step) for r in range(dp)
            ]
            assert all(p[0].shape == (12 // dp, T) for p in parts)
            assert torch.equal(torch.cat([p[0] for p in parts]), x1)
            assert torch.equal(torch.cat([p[2] for p in parts]), ids1)  # disjoint, in order


def test_resume_with_other_dp_size_continues_exactly(tmp_path):
    d = make_dataset(tmp_path)
    reference = ids_of(ShardedLoader(d, "train", T, 8, seed=5), 6)
    first = [ShardedLoader(d, "train", T, 8, 5, r, 2) for r in range(2)]
    seen = [sum((lo.next_batch()[2].tolist() for lo in first), []) for _ in range(3)]
    state = first[0].state_dict()
    assert state == {"samples_consumed": 24, "seed": 5, "seq_len": T, "split": "train"}
    resumed = [ShardedLoader(d, "train", T, 8, 5, r, 4) for r in range(4)]
    for lo in resumed:
        lo.load_state_dict(state)
    seen += [sum((lo.next_batch()[2].tolist() for lo in resumed), []) for _ in range(3)]
    assert seen == reference


def test_epoch_rollover_covers_each_window_once(tmp_path):
    ds_loader = ShardedLoader(make_dataset(tmp_path), "train", T, 5, seed=1)  # 125 windows
    firsts = torch.cat([ds_loader.next_batch()[0][:, 0] for _ in range(75)])  # 3 epochs
    epochs = (firsts // T).reshape(3, 125)
    for e in range(3):
        assert sorted(epochs[e].tolist()) == list(range(125))
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_eval_batches_fixed_and_sliced(tmp_path):
    d = make_dataset(tmp_path)
    full = eval_batches(d, T, 6, eval_steps=3)
    assert len(full) == 3 and all(
        ids.tolist() == list(range(s * 6, s * 6 + 6)) for s, (_, _, ids) in enumerate(full)
    )
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, eval_batches(d, T, 6, 3), strict=True))
    halves = [eval_batches(d, T, 6, 3, dp_rank=r, dp_size=2) for r in range(2)]
    assert torch.equal(torch.cat([halves[0][1][0], halves[1][1][0]]), full[1][0])


def test_loader_argument_errors(tmp_path):
    d = make_dataset(tmp_path)
    with pytest.raises(ValueError, match="not divisible by the data-parallel size 4"):
        ShardedLoader(d, "train", T, 10, 0, 0, 4)
    with pytest.raises(ValueError, match="split must be one of"):
        ShardedLoader(d, "test", T, 8, 0)
    loader = ShardedLoader(d, "train", T, 8, 0)
    for key, value in (("seed", 1), ("seq_len", 16)):
        with pytest.raises(ValueError, match=f"saved with {key}={value}"):
            loader.load_state_dict({**loader.state_dict(), key: value})


# -------------------------------------------------------------------------- validation


def test_validate_accepts_prepared_dir(tmp_path):
    assert validate_dataset(make_dataset(tmp_path), 50257, T)["train_tokens"] == 1001


@pytest.mark.parametrize(
    "breakage, message",
    [
        (lambda d: d.rename(d.parent / "moved"), "data directory .* does not exist"),
        (lambda d: (d / "val.bin").unlink(), r"val.bin does not exist; run `python recipes"),
        (lambda d: (d / "train.bin").write_bytes(b""), "train.bin is empty"),
        (lambda d: (d / "val.bin").write_bytes(b"\x01\x00" * T), "fewer than one sequence"),
        (lambda d: (d / "meta.json").unlink(), "meta.json is missing"),
    ],
)
def test_validate_errors(tmp_path, breakage, message):
    d = make_dataset(tmp_path / "data")
    breakage(d)
    with pytest.raises(ValueError, match=message):
        validate_dataset(d, 50257, T)


def test_validate_vocab_mismatch_names_both(tmp_path):
    with pytest.raises(ValueError, match="vocab_size 50257 but the model has vocab_size 50304"):
        validate_dataset(make_dataset(tmp_path), 50304, T)


def test_validate_reports_first_bad_token(tmp_path):
    d = make_dataset(tmp_path, vocab=1000)
    with pytest.raises(ValueError, match="token id 1000 at position 1000 is >= the model's"):
        validate_dataset(d, 1000, T)
    tokens = np.zeros(300, np.uint16)
    tokens[[7, 250]] = [1200, 999]
    tokens.tofile(d / "train.bin")
    (d / "meta.json").write_text(json.dumps({"vocab_size": 1000, "dtype": "uint16"}))
    with pytest.raises(ValueError, match="token id 1200 at position 7"):
        validate_dataset(d, 1000, T)


def test_token_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match=r"missing.bin does not exist"):
        TokenDataset(tmp_path / "missing.bin", T)
    (tmp_path / "short.bin").write_bytes(b"\x00\x00" * T)  # T tokens < T + 1
    with pytest.raises(ValueError, match=r"short.bin has 8 tokens, fewer than one sequence"):
        TokenDataset(tmp_path / "short.bin", T)
