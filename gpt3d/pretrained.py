"""checkpoint.init_from: start (fine-tune) from Hugging Face GPT-2 weights on any layout.

The model shape comes from the pretrained model's config.json; each rank then reads only the
tensors it holds, one at a time (gpt3d.hf.LazyHFWeights), after the model was built on meta
and sharded (Trainer(cfg, weights=...))."""

from __future__ import annotations

from gpt3d.config import Config, validate
from gpt3d.hf import LazyHFWeights, hf_config
from gpt3d.model import GPTConfig

_DIMS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def init_from_pretrained(cfg: Config) -> LazyHFWeights | None:
    """With checkpoint.init_from set: put the pretrained shape into cfg.model (an explicit
    setting that disagrees is a ValueError) and return the lazy weights; else None."""
    path = cfg.checkpoint.init_from
    if not path:
        return None
    m = cfg.model
    hf = hf_config(path, n_head=m.n_head or None, pad_vocab_multiple=m.pad_vocab_multiple)
    _check_no_conflict(cfg, hf, path)
    for key in _DIMS:
        setattr(m, key, getattr(hf, key))
    m.tie_embeddings, m.bias = hf.tie_embeddings, hf.bias
    validate(cfg)  # e.g. training.seq_len against the pretrained block_size
    return LazyHFWeights(path, hf)


def _check_no_conflict(cfg: Config, hf: GPTConfig, path: str) -> None:
    m = cfg.model
    bad = [f"model.{k}={getattr(m, k)} (pretrained: {getattr(hf, k)})"
           for k in _DIMS if getattr(m, k) and getattr(m, k) != getattr(hf, k)]  # fmt: skip
    if not m.tie_embeddings and hf.tie_embeddings:  # true is the default: only false conflicts
        bad.append("model.tie_embeddings=false (pretrained: tied)")
    if not m.bias:
        bad.append("model.bias=false (GPT-2 has biases)")
    if bad:
        raise ValueError(
            f"checkpoint.init_from={path} conflicts with the configured model shape: "
            f"{', '.join(bad)}; drop those [model] settings (the shape comes from the "
            "pretrained config) or pick a matching model"
        )


def describe(cfg: GPTConfig) -> str:
    tied = "tied" if cfg.tie_embeddings else "untied"
    return (f"{cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, block_size "
            f"{cfg.block_size}, vocab {cfg.vocab_size} ({tied} embeddings)")  # fmt: skip
