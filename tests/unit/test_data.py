"""The sharded, resumable loader and the token files it reads (gpt3d/data.py, gpt3d/shards.py):
one or many shards per split, gpt3d's raw format and llm.c's header format, the checks run
before training. Preparation is tests/unit/test_prepare.py."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt3d.data import (
    SampleOrder,
    ShardedLoader,
    TokenDataset,
    eval_batches,
    feistel_permute,
    token_files,
    validate_dataset,
)
from gpt3d.shards import LLMC_HEADER_BYTES, open_shard, scan_spans, write_shard
from gpt3d.tokenizer import EOT_ID

T = 8  # seq_len in loader tests


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


def make_shards(
    root: Path,
    train: list[int],
    val: list[int] = (201,),
    fmt: str = "raw",
    vocab: int = 50257,
    meta: bool = True,
) -> Path:
    """A dataset of shards `{split}_00000k.bin` holding train[k] / val[k] tokens, llm.c-like
    names. Token values encode (shard, position): 1000 * shard + position % 1000."""
    root.mkdir(parents=True, exist_ok=True)
    for split, sizes in (("train", train), ("val", val)):
        for k, n in enumerate(sizes):
            write_shard(root / f"corpus_{split}_{k:06d}.bin", 1000 * k + np.arange(n) % 1000, fmt)
    if meta:
        m = {"tokenizer": "gpt2", "vocab_size": vocab, "dtype": "uint16", "format": fmt}
        (root / "meta.json").write_text(json.dumps(m))
    return root


def ids_of(loader: ShardedLoader, steps: int) -> list[list[int]]:
    return [loader.next_batch()[2].tolist() for _ in range(steps)]


# ------------------------------------------------------------------------------ loader


def test_windows_are_shifted_pairs(tmp_path):
    ds = TokenDataset.open(make_dataset(tmp_path), "train", T)
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
        (lambda d: (d / "val.bin").unlink(), r"no val token files in .*val.bin.*; run `python"),
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
        open_shard(tmp_path / "missing.bin", "raw")
    d = make_dataset(tmp_path / "d")
    (d / "train.bin").write_bytes(b"\x00\x00" * T)  # T tokens < T + 1
    with pytest.raises(ValueError, match=r"train.bin has 8 tokens, fewer than one sequence"):
        TokenDataset.open(d, "train", T)
    make_shards(tmp_path / "s", [T, 5])  # two shards, neither holds T + 1 tokens
    with pytest.raises(ValueError, match=r"no train shard .* holds one sequence .*largest: 8"):
        TokenDataset.open(tmp_path / "s", "train", T)


# ------------------------------------------------------------------------------ shards


def test_token_files_are_the_splits_shards_in_name_order(tmp_path):
    for name in ("fineweb_train_000002.bin", "fineweb_train_000001.bin", "fineweb_val_000000.bin"):
        write_shard(tmp_path / name, np.arange(20))
    (tmp_path / ".fineweb_train_000003.bin.tmp-7").write_bytes(b"\0\0")  # prepare's temporary
    (tmp_path / "notes_train.txt").write_text("not a token file")
    assert [p.name for p in token_files(tmp_path, "train")] == [
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
    ]
    assert [p.name for p in token_files(tmp_path, "val")] == ["fineweb_val_000000.bin"]
    assert [p.name for p in token_files(make_dataset(tmp_path / "one"), "train")] == ["train.bin"]


def test_windows_stay_inside_shards_and_are_numbered_in_shard_order(tmp_path):
    sizes = [5 * T + 1, 3 * T + 4, T, 7 * T + 1]  # 5, 3, 0 and 7 windows
    ds = TokenDataset.open(make_shards(tmp_path, sizes), "train", T)
    assert ds.n_windows == 15 and ds.starts.tolist() == [0, 5, 8, 8, 15]
    x, y = ds.windows(np.arange(15))
    expected = [(0, w) for w in range(5)] + [(1, w) for w in range(3)] + [(3, w) for w in range(7)]
    for g, (shard, w) in enumerate(expected):  # token = 1000 * shard + position
        assert x[g].tolist() == [1000 * shard + w * T + i for i in range(T)]
        assert y[g].tolist() == [1000 * shard + w * T + i + 1 for i in range(T)]


def test_an_epoch_of_a_sharded_split_draws_every_window_once(tmp_path):
    d = make_shards(tmp_path, [5 * T + 1, 3 * T + 4, 7 * T + 1])  # 15 windows
    loader = ShardedLoader(d, "train", T, 5, seed=2)
    firsts = torch.cat([loader.next_batch()[0][:, 0] for _ in range(6)])  # 2 epochs
    for epoch in firsts.reshape(2, 15):
        assert sorted(epoch.tolist()) == sorted(
            [w * T for w in range(5)]
            + [1000 + w * T for w in range(3)]
            + [2000 + w * T for w in range(7)]
        )


def test_one_shard_order_is_the_per_epoch_numpy_shuffle(tmp_path):
    """The documented order (and the one every run before shards used): window of sample k
    = default_rng([seed, k // n]).permutation(n)[k % n]."""
    n = 125
    loader = ShardedLoader(make_dataset(tmp_path), "train", T, 50, seed=9)
    got = torch.cat([loader.next_batch()[0][:, 0] for _ in range(5)]) // T  # 250 samples
    want = [np.random.default_rng([9, k // n]).permutation(n)[k % n] for k in range(250)]
    assert got.tolist() == want


def test_sharded_resume_on_other_dp_sizes_continues_exactly(tmp_path):
    d = make_shards(tmp_path, [9 * T + 1, 2 * T + 1, 13 * T + 1])
    reference = ShardedLoader(d, "train", T, 4, seed=3)
    ref = [reference.next_batch() for _ in range(16)]  # 64 samples, > 2 epochs of 24
    first = [ShardedLoader(d, "train", T, 4, 3, r, 2) for r in range(2)]
    got = [[lo.next_batch() for lo in first] for _ in range(7)]
    resumed = [ShardedLoader(d, "train", T, 4, 3, r, 4) for r in range(4)]
    for lo in resumed:
        lo.load_state_dict(first[0].state_dict())
    got += [[lo.next_batch() for lo in resumed] for _ in range(9)]
    for (x, y, ids), parts in zip(ref, got, strict=True):
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([p[2] for p in parts]), ids)


def test_llmc_and_raw_shards_of_the_same_tokens_give_the_same_batches(tmp_path):
    sizes = [6 * T + 3, 4 * T + 1]
    raw = ShardedLoader(make_shards(tmp_path / "raw", sizes), "train", T, 6, seed=1)
    llmc = ShardedLoader(make_shards(tmp_path / "llmc", sizes, fmt="llmc"), "train", T, 6, 1)
    for step in range(4):
        a, b = raw.batch_for_step(step), llmc.batch_for_step(step)
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    shard = llmc.dataset.shards[0]
    assert shard.offset == LLMC_HEADER_BYTES and shard.n_tokens == 6 * T + 3


def test_llmc_shards_without_meta_json_are_gpt2_tokens(tmp_path):
    """A directory of llm.c / modded-nanogpt shards trains as it is: no meta.json needed."""
    d = make_shards(tmp_path, [300, 200], [100], fmt="llmc", meta=False)
    meta = validate_dataset(d, 50257, T)
    assert (meta["format"], meta["vocab_size"], meta["eot_id"]) == ("llmc", 50257, 50256)
    with pytest.raises(ValueError, match="vocab_size 50257 but the model has vocab_size 512"):
        validate_dataset(d, 512, T)
    assert ShardedLoader(d, "train", T, 4, 0).dataset.n_windows == (299 // T) + (199 // T)


def header(magic=20240520, version=1, n=100) -> bytes:
    h = np.zeros(256, dtype="<i4")
    h[:3] = magic, version, n
    return h.tobytes()


@pytest.mark.parametrize(
    "content, message",
    [
        (header(magic=12345) + b"\0\0" * 100, "header magic 12345, expected 20240520"),
        (header(version=2) + b"\0\0" * 100, "header version 2"),
        (header(n=100) + b"\0\0" * 60, "header says 100 tokens .* file has 1144 bytes"),
        (header(n=-5) + b"\0\0" * 60, "header says -5 tokens"),
        (header(magic=20240801, version=7) + b"\0" * 400, "Llama-3 tokens"),
        (b"\xc8\xd4\x34\x01" + b"\0" * 96, "100 bytes, shorter than the 1024-byte header"),
    ],
)
def test_damaged_llmc_shard_is_one_clear_error(tmp_path, content, message):
    d = make_shards(tmp_path, [300, 300], fmt="llmc", meta=False)
    (d / "corpus_train_000001.bin").write_bytes(content)
    with pytest.raises(ValueError, match=f"corpus_train_000001.bin .*{message}"):
        validate_dataset(d, 50257, T)


def test_meta_json_must_describe_the_files_on_disk(tmp_path):
    d = make_shards(tmp_path, [300, 200], [100])
    meta = json.loads((d / "meta.json").read_text())
    meta["shards"] = {
        "train": [["corpus_train_000000.bin", 300], ["corpus_train_000001.bin", 200]],
        "val": [["corpus_val_000000.bin", 100]],
    }
    (d / "meta.json").write_text(json.dumps(meta))
    assert validate_dataset(d, 50257, T)["format"] == "raw"
    write_shard(d / "corpus_train_000002.bin", np.arange(50))  # a stale shard of another run
    with pytest.raises(ValueError, match="corpus_train_000002.bin is not listed in meta.json"):
        validate_dataset(d, 50257, T)
    (d / "corpus_train_000002.bin").unlink()
    (d / "corpus_train_000001.bin").unlink()
    with pytest.raises(ValueError, match="corpus_train_000001.bin is listed in meta.json but miss"):
        validate_dataset(d, 50257, T)
    write_shard(d / "corpus_train_000001.bin", np.arange(150))
    with pytest.raises(ValueError, match="000001.bin has 150 tokens but meta.json says 200"):
        validate_dataset(d, 50257, T)
    write_shard(d / "corpus_train_000001.bin", np.arange(200), fmt="llmc")
    with pytest.raises(ValueError, match="is an llm.c shard .* says format 'raw'"):
        validate_dataset(d, 50257, T)


def test_a_file_in_both_splits_is_refused(tmp_path):
    d = make_shards(tmp_path, [300])
    write_shard(d / "train_val_mix.bin", np.arange(300))
    with pytest.raises(ValueError, match="train_val_mix.bin matches both"):
        validate_dataset(d, 50257, T)


def test_token_id_scan_is_bounded_and_covers_every_shard(tmp_path):
    """Rank 0's id scan reads every token up to the budget, beyond it a sample of about the
    budget that includes each shard's first and last tokens."""
    assert scan_spans(1000, 1000) == [(0, 1000)]
    spans = scan_spans(10**9, 1 << 20)
    assert spans[0][0] == 0 and spans[-1][1] == 10**9
    assert sum(b - a for a, b in spans) <= 1 << 20
    d = make_shards(tmp_path, [4000, 4000, 4000], vocab=3000)
    from gpt3d.shards import check_token_ids, open_split

    shards = open_split(d, "train", "raw")
    check_token_ids(shards, 3000, budget=600)  # ids 0..2999 only in the sampled spans
    tokens = np.fromfile(d / "corpus_train_000002.bin", dtype=np.uint16)
    tokens[-1] = 3000  # the last token of the last shard: always scanned
    tokens.tofile(d / "corpus_train_000002.bin")
    with pytest.raises(ValueError, match=r"000002.bin: token id 3000 at position 3999"):
        check_token_ids(open_split(d, "train", "raw"), 3000, budget=600)


# ------------------------------------------------------------------- order at corpus scale


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_order_is_a_bijection(n):
    keys = np.random.default_rng(0).integers(0, 2**64, size=6, dtype=np.uint64)
    perm = feistel_permute(np.arange(n), n, keys)
    assert sorted(perm.tolist()) == list(range(n))
    # a pure function of the position: any subset or chunking gives the same values
    pos = np.random.default_rng(1).integers(0, n, size=50)
    assert feistel_permute(pos, n, keys).tolist() == perm[pos].tolist()


def test_large_splits_use_the_feistel_order_keyed_by_seed_and_epoch(tmp_path):
    exact, big = SampleOrder(1000, 5), SampleOrder(1000, 5, exact_limit=100)
    assert exact.exact and not big.exact
    epochs = [big.windows(np.arange(e * 1000, (e + 1) * 1000)) for e in range(3)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(1000))  # each window once per epoch
    assert epochs[0].tolist() != epochs[1].tolist()
    other_seed = SampleOrder(1000, 6, exact_limit=100).windows(np.arange(1000))
    assert other_seed.tolist() != epochs[0].tolist()
    straddling = big.windows(np.arange(990, 1010))  # a batch across an epoch boundary
    assert straddling.tolist() == epochs[0][990:].tolist() + epochs[1][:10].tolist()
    assert np.mean(np.abs(np.diff(epochs[0]))) > 200  # shuffled, not near-identity
