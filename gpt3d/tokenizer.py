"""GPT-2 BPE tokenizer (tiktoken's r50k_base), built offline from the bundled rank file.

tiktoken.get_encoding("gpt2") downloads its rank file on first use; here the same file ships in
gpt3d/assets/gpt2.tiktoken (see gpt3d/assets/NOTICE), is checked against its sha256 and handed
to tiktoken.Encoding directly, so no network (and no tiktoken cache directory) is ever touched.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path

import tiktoken

from gpt3d.errors import DataError

RANKS_PATH = Path(__file__).parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# Same regex tiktoken uses for gpt2 / r50k_base (tiktoken_ext.openai_public.r50k_pat_str).
GPT2_PAT_STR = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
EOT = "<|endoftext|>"
EOT_ID = 50256
N_MERGEABLE = 50256  # byte-level BPE ranks 0..50255
VOCAB_SIZE = 50257  # mergeable ranks + <|endoftext|>


def load_ranks(path: str | Path = RANKS_PATH) -> dict[bytes, int]:
    """Read a .tiktoken rank file ("<base64 token> <rank>" per line) after checking its hash."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"GPT-2 rank file {path} is missing; reinstall gpt3d or restore "
            "gpt3d/assets/gpt2.tiktoken from git."
        )
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise DataError(
            f"GPT-2 rank file {path} has sha256 {digest}, expected {RANKS_SHA256}; the file is "
            "corrupted or not r50k_base. Restore gpt3d/assets/gpt2.tiktoken from git."
        )
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    assert len(ranks) == N_MERGEABLE, len(ranks)
    return ranks


def build_tokenizer(path: str | Path = RANKS_PATH) -> tiktoken.Encoding:
    """A fresh, uncached GPT-2 Encoding from the rank file at `path`."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=load_ranks(path),
        special_tokens={EOT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The process-wide GPT-2 tokenizer (built once from the bundled rank file)."""
    return build_tokenizer()


def encode(text: str) -> list[int]:
    """Ordinary encode: special-token text such as "<|endoftext|>" is encoded as plain text."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids: Iterable[int]) -> str:
    """Token ids -> text (invalid UTF-8 byte sequences become U+FFFD)."""
    return get_tokenizer().decode(list(ids))
