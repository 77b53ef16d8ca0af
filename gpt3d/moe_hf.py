"""Mixture-of-Experts export: a safetensors file in Mixtral's naming, and back.

GPT-2 has no MoE layout, so a MoE model (n_experts > 0) is written the way Mixtral
(transformers' MixtralForCausalLM) names its tensors: every 2-D weight an nn.Linear
(out, in) matrix, attention as separate q/k/v/o projections, one matrix per expert.
gpt3d's extras (GPT-2's biases, LayerNorm biases, learned positions, a dense MLP in non-MoE
blocks, the balancing bias) take the names the same families use for them:

    model.embed_tokens.weight                                  (V, C)   wte, real vocab rows
    model.embed_positions.weight                               (T, C)   wpe
    model.layers.{i}.input_layernorm.{weight,bias}             (C,)     ln_1
    model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}    (C, C)   attn.{q,k,v,c}_proj
    model.layers.{i}.post_attention_layernorm.{weight,bias}    (C,)     ln_2
    model.layers.{i}.block_sparse_moe.gate.weight              (E, C)   moe.router (softmax)
    model.layers.{i}.block_sparse_moe.gate.e_score_correction_bias  (E,)  moe.expert_bias
                                                               (DeepSeek-V3's name; it only
                                                               changes which experts are chosen)
    model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight    (H, C)   experts.w1[j].T
    model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight    (C, H)   experts.w2[j].T
    model.layers.{i}.mlp.{fc1,fc2}.{weight,bias}               dense blocks: mlp.c_fc / c_proj
    model.norm.{weight,bias}                                   (C,)     ln_f
    lm_head.weight                                             (V, C)   only when untied

config.json has model_type "gpt3d_moe" with Mixtral's keys for the MoE (num_local_experts,
num_experts_per_tok), moe_intermediate_size, moe_layer_freq and GPT-2's activation. No
transformers class computes this architecture (GELU experts without w3, LayerNorm, learned
positions): the file is for any safetensors reader and for gpt3d's own sampling.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpt3d.errors import CheckpointError
from gpt3d.hf import _atomic_write, _own, _pad_rows, _read_json
from gpt3d.model import GPT, GPTConfig

MODEL_TYPE = "gpt3d_moe"
# gpt3d name (block part) -> exported name (block part); experts and the bias are special.
_BLOCK = {
    "ln_1": "input_layernorm",
    "ln_2": "post_attention_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "moe.router": "block_sparse_moe.gate",
}
_TOP = {"wpe.weight": "model.embed_positions.weight", "ln_f.weight": "model.norm.weight"}
_TOP |= {"ln_f.bias": "model.norm.bias", "lm_head.weight": "lm_head.weight"}
_NAME = re.compile(r"h\.(\d+)\.(.+)\.(weight|bias)$")


# GPTConfig field -> config.json key (both directions)
_CONFIG_KEYS = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "block_size": "max_position_embeddings",
    "vocab_size": "vocab_size",
    "n_experts": "num_local_experts",
    "moe_top_k": "num_experts_per_tok",
    "moe_hidden": "moe_intermediate_size",
    "moe_every": "moe_layer_freq",  # block i is MoE iff i % freq == freq - 1
    "ln_eps": "layer_norm_eps",
    "bias": "attention_bias",
    "tie_embeddings": "tie_word_embeddings",
}


def moe_config_dict(cfg: GPTConfig) -> dict:
    """config.json describing a MoE `cfg` (real vocab, no padding)."""
    values = {ours: getattr(cfg, ours) for ours in _CONFIG_KEYS} | {"moe_hidden": cfg.expert_hidden}
    return {
        "model_type": MODEL_TYPE,
        "architectures": ["GPT3dMoEForCausalLM"],
        "scoring_func": "softmax",  # top-k of softmax + e_score_correction_bias, unnormalised
        "hidden_act": "gelu_pytorch_tanh",
        **{theirs: values[ours] for ours, theirs in _CONFIG_KEYS.items()},
    }


def gpt_config_from_moe(hf: dict, pad_vocab_multiple: int = 1) -> GPTConfig:
    if hf.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"not a gpt3d MoE config: model_type={hf.get('model_type')!r}")
    try:
        fields = {ours: hf[theirs] for ours, theirs in _CONFIG_KEYS.items()}
    except KeyError as e:
        raise CheckpointError(f"gpt3d MoE config.json lacks {e}") from None
    return GPTConfig(**fields, pad_vocab_multiple=pad_vocab_multiple)


def _exported(name: str) -> str:
    """gpt3d parameter name -> exported name (experts' w1/w2 are per expert: see to_moe_hf)."""
    if name in _TOP:
        return _TOP[name]
    if name == "wte.weight":
        return "model.embed_tokens.weight"
    if m := re.fullmatch(r"h\.(\d+)\.moe\.expert_bias", name):
        return f"model.layers.{m[1]}.block_sparse_moe.gate.e_score_correction_bias"
    m = _NAME.fullmatch(name)
    if m is None or m[2] not in _BLOCK:
        raise CheckpointError(f"no exported name for {name!r}")
    return f"model.layers.{m[1]}.{_BLOCK[m[2]]}.{m[3]}"


def to_moe_hf(sd: dict[str, torch.Tensor], cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """gpt3d state dict (plain model, buffers included) -> the exported tensors."""
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # the same tensor as wte
        if m := re.fullmatch(r"h\.(\d+)\.moe\.experts\.(w1|w2)", name):
            prefix = f"model.layers.{m[1]}.block_sparse_moe.experts"
            for j, w in enumerate(t):  # w1[j] (C, H) -> (H, C); w2[j] (H, C) -> (C, H)
                out[f"{prefix}.{j}.{m[2]}.weight"] = _own(w.T)
            continue
        if name in ("wte.weight", "lm_head.weight"):
            t = t[: cfg.vocab_size]  # padded vocab rows are not tokens
        out[_exported(name)] = _own(t)
    return out


def save_moe_hf(
    directory: str | os.PathLike,
    sd: dict[str, torch.Tensor],
    cfg: GPTConfig,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Write `directory`/{model.safetensors, config.json} (weights first, config last), the
    weights in `dtype`; the balancing bias stays fp32 (a bf16 bias would change choices)."""
    sd = {k: v if k.endswith("expert_bias") else v.to(dtype) for k, v in sd.items()}
    tensors = to_moe_hf(sd, cfg)
    config = moe_config_dict(cfg) | {"torch_dtype": str(dtype).removeprefix("torch.")}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(
        directory / "model.safetensors", lambda f: save_file(tensors, f, {"format": "pt"})
    )
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / "config.json", lambda f: Path(f).write_text(text))


def is_moe_export(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and _read_json(cfg).get("model_type") == MODEL_TYPE


def load_moe_hf(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(GPTConfig, full gpt3d state dict) from a save_moe_hf directory, every tensor checked."""
    path = Path(path)
    cfg = gpt_config_from_moe(_read_json(path / "config.json"))
    with safe_open(path / "model.safetensors", "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(cfg).state_dict().items()}
    sd = {}
    for name, shape in expected.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        if m := re.fullmatch(r"h\.(\d+)\.moe\.experts\.(w1|w2)", name):
            prefix = f"model.layers.{m[1]}.block_sparse_moe.experts"
            keys = [f"{prefix}.{j}.{m[2]}.weight" for j in range(cfg.n_experts)]
            sd[name] = torch.stack([_take(stored, k, path).T for k in keys])
        else:
            sd[name] = _take(stored, _exported(name), path)
        if name in ("wte.weight", "lm_head.weight"):
            sd[name] = _pad_rows(sd[name], cfg.padded_vocab_size)
        if tuple(sd[name].shape) != tuple(shape):
            raise CheckpointError(f"{path}: {name} has shape {tuple(sd[name].shape)}, not {shape}")
    if stored:
        raise CheckpointError(f"{path}: unexpected tensors {sorted(stored)[:5]}")
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["wte.weight"]
    return cfg, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _take(stored: dict, key: str, path: Path) -> torch.Tensor:
    if key not in stored:
        raise CheckpointError(f"{path}: missing tensor {key!r}")
    return stored.pop(key)
