"""gpt3d <-> Hugging Face GPT-2: logits parity both ways, exact round trips, clear errors.

transformers is used offline only: models are built from GPT2Config, never downloaded."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpt3d.errors import UserError
from gpt3d.hf import gpt_config_from_hf, hf_config_dict, load_hf, save_hf, to_hf_state_dict
from gpt3d.model import GPT, GPTConfig, preset_config

transformers = pytest.importorskip("transformers")
GPT2Config, GPT2LMHeadModel = transformers.GPT2Config, transformers.GPT2LMHeadModel

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100)


def _gpt3d_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    model = GPT(cfg)
    model.init_weights(seed)
    with torch.no_grad():  # init leaves biases 0 and LN at 1: perturb so the mapping shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in f".{name}":
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _ids(cfg: GPTConfig, T: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(cfg.vocab_size, (2, T or cfg.block_size), generator=g)


def _write_hf(directory, hf_sd: dict, cfg: GPTConfig):
    """model.safetensors (exactly these tensors) + config.json, as a HF directory."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(hf_sd, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    return directory


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_config_dict_round_trip():
    cfg = replace(TINY, dropout=0.1, ln_eps=1e-6, tie_embeddings=False, pad_vocab_multiple=64)
    d = hf_config_dict(cfg)
    assert d["vocab_size"] == 100 and d["n_positions"] == 16 and d["model_type"] == "gpt2"
    assert gpt_config_from_hf(d, pad_vocab_multiple=64) == cfg
    hf = GPT2Config(**d)  # transformers accepts every key
    assert (hf.n_embd, hf.tie_word_embeddings, hf.layer_norm_epsilon) == (32, False, 1e-6)


def test_hf_to_gpt3d_logits(tmp_path):
    torch.manual_seed(0)
    hf_cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=100)
    hf = GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # HF init has zero biases and unit LN: perturb so the mapping shows
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    cfg, sd = load_hf(tmp_path)
    assert cfg == replace(TINY, dropout=0.1)
    model = GPT(cfg).eval()
    model.load_state_dict(sd, strict=True)
    ids = _ids(cfg)
    torch.testing.assert_close(model(ids), _hf_logits(hf, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "tie,pad",
    [(True, 1), (False, 1), (True, 64), (False, 64)],
    ids=["tied", "untied", "tied-pad", "untied-pad"],
)
def test_gpt3d_to_hf_logits(tmp_path, tie, pad):
    cfg = replace(TINY, tie_embeddings=tie, pad_vocab_multiple=pad)
    model = _gpt3d_model(cfg)
    save_hf(tmp_path, model.state_dict(), cfg)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in set(f.keys())) == (not tie)  # like save_pretrained
        assert f.get_slice("transformer.wte.weight").get_shape() == [100, 32]
    hf, info = GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing/unexpected/mismatched keys
    hf.eval()
    ids = _ids(cfg)
    with torch.no_grad():
        ours = model(ids)[..., : cfg.vocab_size]
    torch.testing.assert_close(_hf_logits(hf, ids), ours, atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob(".*tmp"))  # temp files were renamed away


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_exact(tmp_path, tie):
    cfg = replace(TINY, tie_embeddings=tie, pad_vocab_multiple=64)
    sd = _gpt3d_model(cfg).state_dict()
    hf_sd = to_hf_state_dict(sd, cfg)
    assert "transformer.h.0.attn.c_attn.weight" in hf_sd
    assert hf_sd["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D (in, out)
    assert hf_sd["transformer.h.0.mlp.c_fc.weight"].shape == (32, 128)
    assert not any("attn.bias" in k and "c_" not in k for k in hf_sd)  # no mask buffers
    ptrs = [t.untyped_storage().data_ptr() for t in hf_sd.values()]
    assert len(set(ptrs)) == len(ptrs) and all(t.is_contiguous() for t in hf_sd.values())
    back_cfg, back = load_hf(_write_hf(tmp_path, hf_sd, cfg), pad_vocab_multiple=64)
    assert back_cfg == replace(cfg, dropout=0.0) and back.keys() == sd.keys()
    V = cfg.vocab_size
    for k in sd:  # padded vocab rows are dropped on export and come back as zeros
        if k in ("wte.weight", "lm_head.weight"):
            assert torch.equal(back[k][:V], sd[k][:V]) and not back[k][V:].any(), k
        else:
            assert torch.equal(back[k], sd[k]), k
    if tie:
        assert back["lm_head.weight"] is back["wte.weight"]


def test_openai_layout_without_prefix_and_buffers(tmp_path):
    """OpenAI's gpt2 file: no "transformer." prefix, mask buffers present, no lm_head."""
    sd = _gpt3d_model(TINY).state_dict()
    hf_sd = {k.removeprefix("transformer."): v for k, v in to_hf_state_dict(sd, TINY).items()}
    for i in range(TINY.n_layer):
        hf_sd[f"h.{i}.attn.bias"] = torch.ones(1, 1, 16, 16).tril()
        hf_sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    _, back = load_hf(_write_hf(tmp_path, hf_sd, TINY))
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_single_file_infers_config(tmp_path):
    cfg = replace(TINY, tie_embeddings=False)
    sd = _gpt3d_model(cfg).state_dict()
    save_hf(tmp_path / "d", sd, cfg)
    f = tmp_path / "model.safetensors"
    f.write_bytes((tmp_path / "d" / "model.safetensors").read_bytes())  # no config.json beside
    with pytest.raises(UserError, match="n_head"):
        load_hf(f)
    got_cfg, got = load_hf(f, n_head=2)
    assert got_cfg == cfg
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    # n_head from a config.json beside the file
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    assert load_hf(f)[0] == cfg


@pytest.mark.parametrize(
    "change, cfg_change, match",
    [
        (
            {"transformer.h.1.mlp.c_fc.weight": torch.zeros(128, 32)},
            {},
            r"h\.1\.mlp\.c_fc\.weight.*expected \(32, 128\), found \(128, 32\)",
        ),
        ({"transformer.ln_f.bias": None}, {}, r"missing key 'ln_f\.bias'"),
        ({}, {"tie_embeddings": False}, "missing key 'lm_head.weight'"),  # untied needs it
        ({"h.2.ln_1.weight": torch.ones(32)}, {}, r"unexpected key 'h\.2\.ln_1\.weight'"),
    ],
)
def test_errors_wrong_shape_and_missing_key(tmp_path, change, cfg_change, match):
    hf_sd = to_hf_state_dict(_gpt3d_model(TINY).state_dict(), TINY)
    hf_sd = {k: v for k, v in (hf_sd | change).items() if v is not None}
    _write_hf(tmp_path, hf_sd, replace(TINY, **cfg_change))
    with pytest.raises(UserError, match=match):
        load_hf(tmp_path)


def test_export_of_a_hf_dict_is_refused():
    hf_sd = to_hf_state_dict(_gpt3d_model(TINY).state_dict(), TINY)
    with pytest.raises(UserError, match="(?s)not a gpt3d state dict.*unexpected key 'transformer"):
        to_hf_state_dict(hf_sd, TINY)  # HF dict passed where a gpt3d one is expected


def test_errors_non_gpt2_files_and_configs(tmp_path):
    f = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(3, 3)}, f)
    with pytest.raises(UserError, match="not a GPT-2 checkpoint"):
        load_hf(f, n_head=2)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_hf(junk, n_head=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no model.safetensors"):
        load_hf(tmp_path / "empty")
    with pytest.raises(UserError, match="not a GPT-2 config"):
        gpt_config_from_hf({"model_type": "llama", "n_layer": 2})
    with pytest.raises(UserError, match="lacks required keys"):
        gpt_config_from_hf({"model_type": "gpt2", "n_layer": 2})
    with pytest.raises(UserError, match="activation_function"):
        gpt_config_from_hf(hf_config_dict(TINY) | {"activation_function": "relu"})


def test_bias_false_cannot_export(tmp_path):
    cfg = replace(TINY, bias=False)
    sd = GPT(cfg).state_dict()
    with pytest.raises(UserError, match="bias=False"):
        to_hf_state_dict(sd, cfg)
    with pytest.raises(UserError, match="bias=False"):
        save_hf(tmp_path, sd, cfg)
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.slow
def test_gpt2_124m_shape_round_trip(tmp_path):
    """The real gpt2 shape (random weights, padded vocab as nanoGPT trains it) through
    save_hf -> from_pretrained, and back through load_hf."""
    cfg = preset_config("gpt2", pad_vocab_multiple=64)
    model = GPT(cfg).eval()
    model.init_weights(0)
    save_hf(tmp_path, model.state_dict(), cfg)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = _ids(cfg, T=8)
    with torch.no_grad():
        ours = model(ids)[..., : cfg.vocab_size]
    torch.testing.assert_close(_hf_logits(hf, ids), ours, atol=1e-4, rtol=1e-4)
    cfg2, sd2 = load_hf(tmp_path, pad_vocab_multiple=64)
    assert cfg2 == cfg
    assert torch.equal(sd2["h.11.attn.v_proj.weight"], model.h["11"].attn.v_proj.weight)
