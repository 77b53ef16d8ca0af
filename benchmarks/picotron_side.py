"""picotron's side of bench_peer: the matched model, its inputs (a Llama config directory
and the weights file its start-up reads), its config JSON per layout, one launch of its
train.py and the step times parsed from its log. Nothing here fetches or patches picotron:
`picotron` is the directory of the user's own patched checkout (benchmarks/README.md).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common import TORCHRUN

N_LAYER, N_HEAD, N_EMBD, SEQ, BATCH = 4, 4, 256, 128, 8
VOCAB = 50257  # GPT-2's tokens; gpt3d pads the table to 50304, picotron's vocabulary is 50304
PADDED_VOCAB = 50304


@dataclass(frozen=True)
class Peer:
    """One picotron layout: degrees, pipeline engine, microbatch size, microbatches."""

    dp: int = 1
    tp: int = 1
    pp: int = 1
    engine: str = "1f1b"
    mbs: int = BATCH
    acc: int = 1

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def key(self) -> str:
        return f"dp{self.dp}_tp{self.tp}_pp{self.pp}_{self.engine}_mb{self.mbs}x{self.acc}"


def llama_intermediate() -> int:
    """The SwiGLU width whose Llama block has the GPT-2 block's parameter count: GPT-2
    12C^2 + 13C (biases, two LayerNorms) per layer + a final LayerNorm (2C); Llama
    4C^2 + 3CI + 2C (two RMSNorms) per layer + a final RMSNorm (C)."""
    c, n = N_EMBD, N_LAYER
    gpt2 = n * (12 * c * c + 13 * c) + 2 * c
    return round((gpt2 - c - n * (4 * c * c + 2 * c)) / (3 * c * n))


def flops_per_token(non_embedding: int) -> float:
    """6N + 12 L C T with N = non-embedding parameters + the output head (PaLM/nanoGPT)."""
    return 6 * (non_embedding + PADDED_VOCAB * N_EMBD) + 12 * N_LAYER * N_EMBD * SEQ


def matched_flops() -> dict:
    c, n, i = N_EMBD, N_LAYER, llama_intermediate()
    gpt2 = flops_per_token(n * (12 * c * c + 13 * c) + 2 * c)
    llama = flops_per_token(n * (4 * c * c + 3 * c * i + 2 * c) + c)
    return {
        "llama_intermediate": i,
        "gpt3d_flops_per_token": gpt2,
        "picotron_flops_per_token": llama,
        "rel_diff": abs(gpt2 - llama) / gpt2,
    }


# ---- picotron's side ----------------------------------------------------------------------
def picotron_inputs(work: Path) -> Path:
    """The Llama config directory and, under work/hf_model_safetensors, the weights file
    picotron's start-up reads (zeros: its reset_parameters initialises every tensor)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    model_dir = work / "llama_matched"
    LlamaConfig(
        hidden_size=N_EMBD,
        intermediate_size=llama_intermediate(),
        num_hidden_layers=N_LAYER,
        num_attention_heads=N_HEAD,
        num_key_value_heads=N_HEAD,
        vocab_size=PADDED_VOCAB,
        max_position_embeddings=SEQ,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ).save_pretrained(model_dir)
    c, i = N_EMBD, llama_intermediate()
    shapes = {"model.embed_tokens.weight": (PADDED_VOCAB, c), "model.norm.weight": (c,)}
    for layer in range(N_LAYER):
        p = f"model.layers.{layer}."
        shapes |= {p + "input_layernorm.weight": (c,), p + "post_attention_layernorm.weight": (c,)}
        shapes |= {p + f"self_attn.{x}_proj.weight": (c, c) for x in "qkvo"}
        shapes |= {p + f"mlp.{x}_proj.weight": (i, c) for x in ("gate", "up")}
        shapes[p + "mlp.down_proj.weight"] = (c, i)
    (work / "hf_model_safetensors").mkdir(exist_ok=True)
    save_file(
        {k: torch.zeros(s) for k, s in shapes.items()},
        str(work / "hf_model_safetensors" / "model.safetensors"),
    )
    return model_dir


def picotron_config(peer: Peer, model_dir: Path, data: Path, steps: int, work: Path) -> dict:
    return {
        "distributed": {
            "tp_size": peer.tp,
            "cp_size": 1,
            "pp_size": peer.pp,
            "dp_size": peer.dp,
            "pp_engine": peer.engine,
            "backend": "gloo",
            "use_cpu": True,
        },
        "model": {
            "name": str(model_dir),
            "num_hidden_layers": N_LAYER,
            "num_attention_heads": N_HEAD,
            "num_key_value_heads": N_HEAD,
            "dtype": "float32",
            "use_flash_attention": False,
            "use_fused_adam": True,
        },
        "training": {
            "seed": 42,
            "learning_rate": 1e-4,
            "total_train_steps": steps,
            "seq_length": SEQ,
            "micro_batch_size": peer.mbs,
            "gradient_accumulation_steps": peer.acc,
            "num_samples": None,
            "max_tokens": None,
        },
        "dataset": {
            "name": str(data / "train.bin"),
            "subset_name": None,
            "num_workers": 0,
            "num_proc": 1,
        },
        "checkpoint": {"save_dir": str(work / "ckpt"), "save_frequency": 10**9, "load_path": ""},
        "logging": {"use_wandb": False, "project_name": "picotron", "run_name": None},
        "environment": {
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "FLASH_ATTEN": "0",
            "HF_TOKEN": "offline",
        },
    }


STEP_LINE = re.compile(r"Step:\s*(\d+)\s*\|\s*Loss:\s*([-\d.]+)\s*\|\s*Step time:\s*([\d.]+)s")


def run_picotron(picotron: Path, peer: Peer, model_dir: Path, data: Path, a, work: Path):
    """(step seconds, losses) of the steady steps of one launch of picotron's train.py."""
    cfg = work / f"picotron_{peer.key}.json"
    cfg.write_text(json.dumps(picotron_config(peer, model_dir, data, a.warmup + a.steps, work)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DTYPE="float32")
    cmd = [
        *TORCHRUN,
        "--standalone",
        f"--nproc_per_node={peer.world}",
        str(picotron / "train.py"),
        "--config",
        str(cfg),
    ]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    steps = {int(m[1]): (float(m[2]), float(m[3])) for m in STEP_LINE.finditer(proc.stdout)}
    if proc.returncode != 0 or len(steps) < a.warmup + a.steps:
        hint = (
            ""
            if steps or proc.returncode
            else ("\nno 'Step time:' in its log: apply the patches listed in benchmarks/README.md")
        )
        raise RuntimeError(
            f"picotron {peer.key} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}{hint}"
        )
    steady = [steps[s] for s in sorted(steps) if s > a.warmup]
    return [t for _, t in steady], [loss for loss, _ in steady]
