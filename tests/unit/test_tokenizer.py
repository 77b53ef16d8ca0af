"""The bundled GPT-2 tokenizer: known ids, round trips, hash check, no network."""

import shutil
import socket

import pytest

from gpt3d import tokenizer as tok


def test_known_ids():
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("\n") == [198]
    assert tok.encode("") == []


def test_vocab_and_eot():
    enc = tok.get_tokenizer()
    assert enc.n_vocab == tok.VOCAB_SIZE == 50257
    assert enc.eot_token == tok.EOT_ID == 50256
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    # Ordinary encode treats the special-token text as plain text.
    assert 50256 not in tok.encode("<|endoftext|>")
    assert tok.decode([50256]) == "<|endoftext|>"


def test_unicode_round_trip():
    text = "Ünïcödé — naïve café, 東京 🚀🎉, Ωμέγα, עברית, emoji 👩‍👩‍👧 and\ttabs\n\n  spaces "
    ids = tok.encode(text)
    assert all(0 <= i < tok.EOT_ID for i in ids)
    assert tok.decode(ids) == text


def test_pattern_matches_tiktoken():
    public = pytest.importorskip("tiktoken_ext.openai_public")
    assert public.r50k_pat_str == tok.GPT2_PAT_STR


def test_tampered_rank_file_is_rejected(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    shutil.copy(tok.RANKS_PATH, bad)
    with open(bad, "ab") as f:
        f.write(b"IQ== 50256\n")
    with pytest.raises(ValueError, match="sha256"):
        tok.load_ranks(bad)
    with pytest.raises(ValueError, match="missing"):
        tok.load_ranks(tmp_path / "nope.tiktoken")


def test_fresh_build_needs_no_network(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to open a socket")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    enc = tok.build_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert not (tmp_path / "cache").exists()
