"""GPT-2 <-> Hugging Face mapping: names, shapes, config.json, safetensors files.

One conversion each way: to_hf_state_dict (export, full tensors) and LazyHFWeights (import:
one gpt3d tensor per call, read straight from the safetensors file; init_from uses it so each
rank reads only what it holds, load_hf for a whole model). One config reader: hf_config. The
two layouts differ in four ways:

    gpt3d                                      HF GPT2LMHeadModel ("transformer." prefix)
    h.N.attn.{q,k,v}_proj.weight  3 x (C, C)   h.N.attn.c_attn.weight  (C, 3C) = cat(q,k,v).T
    nn.Linear weights (out, in)                Conv1D weights (in, out): transposed
    wte / lm_head rows: padded_vocab_size      vocab_size rows (padding dropped / zero-filled)
    lm_head.weight always present              omitted when tied (save_pretrained does this)

HF's causal-mask buffers (h.N.attn.bias, h.N.attn.masked_bias) are not weights: never written
and ignored on load. OpenAI's original gpt2 files have no "transformer." prefix; both forms load.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gpt3d.errors import CheckpointError
from gpt3d.model import GPT, GPTConfig

Tensor = torch.Tensor
GPT2_EOS = 50256  # <|endoftext|>
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # the GELU gpt3d uses (tanh approximation)
_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")  # HF causal-mask buffers
_CONV1D = ("attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # per block: weight transposed, bias as-is
_LN = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias")


# ---------------------------------------------------------------------------- config.json


def hf_config_dict(cfg: GPTConfig) -> dict:
    """config.json for transformers' GPT2LMHeadModel describing `cfg` (real vocab, no padding)."""
    _check_representable(cfg)
    eos = GPT2_EOS if cfg.vocab_size > GPT2_EOS else None  # not in a smaller (custom) vocab
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_embd": cfg.n_embd,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,  # legacy key, still in OpenAI's config.json
        "n_inner": None,  # = 4 * n_embd
        "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": cfg.ln_eps,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "use_cache": True,
    }


def gpt_config_from_hf(hf_cfg: dict, *, pad_vocab_multiple: int = 1) -> GPTConfig:
    """GPTConfig from a transformers GPT-2 config.json dict (HF defaults for absent keys)."""
    if hf_cfg.get("model_type") != "gpt2":
        raise CheckpointError(
            f"not a GPT-2 config: model_type={hf_cfg.get('model_type')!r}, need 'gpt2'"
        )
    missing = [
        k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hf_cfg
    ]
    if missing:
        raise CheckpointError(f"GPT-2 config.json lacks required keys {missing}")
    act = hf_cfg.get("activation_function", "gelu_new")
    if act not in _TANH_GELUS:
        raise CheckpointError(
            f"activation_function={act!r} is not supported; gpt3d uses {_TANH_GELUS}"
        )
    n_inner = hf_cfg.get("n_inner")
    if n_inner not in (None, 4 * hf_cfg["n_embd"]):
        raise CheckpointError(f"n_inner={n_inner} is not supported; gpt3d's MLP is 4 * n_embd wide")
    if not hf_cfg.get("scale_attn_weights", True) or hf_cfg.get("scale_attn_by_inverse_layer_idx"):
        raise CheckpointError("only standard 1/sqrt(head_dim) attention scaling is supported")
    return GPTConfig(
        n_layer=hf_cfg["n_layer"],
        n_head=hf_cfg["n_head"],
        n_embd=hf_cfg["n_embd"],
        block_size=hf_cfg["n_positions"],
        vocab_size=hf_cfg["vocab_size"],
        pad_vocab_multiple=pad_vocab_multiple,
        dropout=hf_cfg.get("resid_pdrop", 0.1),
        bias=True,
        tie_embeddings=hf_cfg.get("tie_word_embeddings", True),
        ln_eps=hf_cfg.get("layer_norm_epsilon", 1e-5),
    )


def _check_representable(cfg: GPTConfig) -> None:
    if cfg.n_experts:
        raise CheckpointError(
            "a Mixture-of-Experts model has no GPT-2 layout; recipes/export.py writes it in "
            "gpt3d's Mixtral-style MoE layout (gpt3d/moe_hf.py, docs/moe.md)"
        )
    if not cfg.bias:
        raise CheckpointError(
            "bias=False models cannot be exported to Hugging Face GPT-2 (its Linear/LayerNorm "
            "layers always have biases); train with model.bias=true to export"
        )


# ---------------------------------------------------------------------------- state dicts


def _hf_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Expected HF GPT-2 tensors (names without the "transformer." prefix)."""
    C, V = cfg.n_embd, cfg.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (cfg.block_size, C)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        shapes |= {p + name: (C,) for name in _LN}
        shapes |= {p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,)}
        shapes |= {p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,)}
        shapes |= {p + "mlp.c_fc.weight": (C, 4 * C), p + "mlp.c_fc.bias": (4 * C,)}
        shapes |= {p + "mlp.c_proj.weight": (4 * C, C), p + "mlp.c_proj.bias": (C,)}
    shapes |= {"ln_f.weight": (C,), "ln_f.bias": (C,)}
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def _gpt3d_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes straight from model.py, no memory
        return {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}


def _check_shapes(sd: dict[str, Tensor], expected: dict, cfg: GPTConfig, what: str) -> None:
    """ValueError listing unknown, missing and wrongly shaped keys (all of them, up to 10)."""
    problems = [f"unexpected key {k!r} {tuple(sd[k].shape)}" for k in sd if k not in expected]
    problems += [f"missing key {k!r} {shape}" for k, shape in expected.items() if k not in sd]
    problems += [
        f"key {k!r}: expected {shape}, found {tuple(sd[k].shape)}"
        for k, shape in expected.items()
        if k in sd and tuple(sd[k].shape) != shape
    ]
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"this is not a {what} of shape n_layer={cfg.n_layer} n_embd={cfg.n_embd} "
            f"block_size={cfg.block_size} vocab_size={cfg.vocab_size} "
            f"tie_embeddings={cfg.tie_embeddings}:\n  " + "\n  ".join(problems[:10]) + more
        )


def _own(t: Tensor) -> Tensor:
    """A contiguous copy sharing storage with nothing (safetensors refuses shared storage)."""
    return t.detach().clone(memory_format=torch.contiguous_format)


def to_hf_state_dict(sd: dict[str, Tensor], cfg: GPTConfig) -> dict[str, Tensor]:
    """gpt3d state dict -> what GPT2LMHeadModel.save_pretrained writes (same dtypes)."""
    _check_representable(cfg)
    sd = dict(sd)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as wte.weight
    expected = _gpt3d_shapes(cfg)
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
    _check_shapes(sd, expected, cfg, "gpt3d state dict")
    V = cfg.vocab_size
    out = {"wte.weight": sd["wte.weight"][:V], "wpe.weight": sd["wpe.weight"]}  # drop pad rows
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        out |= {p + name: sd[p + name] for name in _LN}
        # 3 x (C, C) (out, in) -> (3C, C) -> Conv1D (in, out) = (C, 3C); biases 3 x (C,) -> (3C,)
        out[p + "attn.c_attn.weight"] = torch.cat([sd[f"{p}attn.{x}_proj.weight"] for x in "qkv"]).T
        out[p + "attn.c_attn.bias"] = torch.cat([sd[f"{p}attn.{x}_proj.bias"] for x in "qkv"])
        for name in _CONV1D:
            out[f"{p}{name}.weight"] = sd[f"{p}{name}.weight"].T  # (out, in) -> (in, out)
            out[f"{p}{name}.bias"] = sd[f"{p}{name}.bias"]
    out |= {"ln_f.weight": sd["ln_f.weight"], "ln_f.bias": sd["ln_f.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    return {(k if k == "lm_head.weight" else "transformer." + k): _own(v) for k, v in out.items()}


def _strip_hf(hf_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the "transformer." prefix (absent in OpenAI's files) and the causal-mask buffers."""
    sd = {k.removeprefix("transformer."): v for k, v in hf_sd.items()}
    return {k: v for k, v in sd.items() if not _BUFFER.match(k)}


def _pad_rows(w: Tensor, rows: int) -> Tensor:
    """(V, C) -> (rows, C), zero-filled below V (the padded vocab rows)."""
    out = w.new_zeros(rows, w.shape[1])
    out[: w.shape[0]] = w
    return out


# ---------------------------------------------------------------------------- files


def save_hf(directory: str | os.PathLike, sd: dict[str, Tensor], cfg: GPTConfig) -> None:
    """Write `directory`/{model.safetensors, config.json}, loadable by
    GPT2LMHeadModel.from_pretrained. Each file is written to a temp file, then os.replace'd
    (weights first, config.json last)."""
    hf_sd = to_hf_state_dict(sd, cfg)
    config = hf_config_dict(cfg) | {
        "torch_dtype": str(hf_sd["transformer.wte.weight"].dtype).removeprefix("torch.")
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(directory / "model.safetensors", lambda f: save_file(hf_sd, f, {"format": "pt"}))
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    _atomic_write(directory / "config.json", lambda f: Path(f).write_text(text))


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_hf(
    path: str | os.PathLike, *, n_head: int | None = None, pad_vocab_multiple: int = 1
) -> tuple[GPTConfig, dict[str, Tensor]]:
    """(GPTConfig, full gpt3d state dict) from a HF GPT-2 directory or .safetensors file
    (hf_config + LazyHFWeights: the same path init_from takes, all tensors at once)."""
    cfg = hf_config(path, n_head=n_head, pad_vocab_multiple=pad_vocab_multiple)
    weights = LazyHFWeights(path, cfg)
    sd = {name: weights(name) for name in _gpt3d_shapes(cfg)}
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["wte.weight"]  # one tensor, like GPT(cfg).state_dict()
    return cfg, sd


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():  # sharded save_pretrained output (big models)
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map object")
        names = sorted(set(map(str, weight_map.values())))
        if any(Path(n).name != n for n in names):  # stay inside the directory
            raise CheckpointError(f"{index} names files outside {directory}: {names}")
        return [directory / n for n in names]
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    raise CheckpointError(
        f"no model.safetensors in {directory} (pytorch_model.bin is not supported: re-save the "
        "model with save_pretrained(..., safe_serialization=True))"
    )


def _infer_config(
    sd: dict[str, Tensor], path: Path, n_head: int | None, hf_cfg: dict | None, pad: int, tied
) -> GPTConfig:
    """GPTConfig from tensor shapes (meta tensors); n_head (and ln eps) are not in the
    shapes. tied() says whether a stored lm_head equals wte (it reads both)."""
    if any(k not in sd or sd[k].ndim != 2 for k in ("wte.weight", "wpe.weight")):
        found = sorted(sd)[:5]
        raise CheckpointError(
            f"{path} is not a GPT-2 checkpoint: no wte.weight/wpe.weight (found {found})"
        )
    hf_cfg = hf_cfg if hf_cfg and hf_cfg.get("model_type") == "gpt2" else {}
    n_head = n_head or hf_cfg.get("n_head")
    if n_head is None:
        raise CheckpointError(
            f"cannot infer n_head from the shapes in {path}: pass n_head=... or put the "
            "model's config.json next to the file"
        )
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"h\.(\d+)\.", k))}
    lm_head, wte = sd.get("lm_head.weight"), sd["wte.weight"]
    tied = lm_head is None or (lm_head.shape == wte.shape and tied())
    cfg = GPTConfig(
        n_layer=max(layers, default=-1) + 1,
        n_head=n_head,
        n_embd=sd["wpe.weight"].shape[1],
        block_size=sd["wpe.weight"].shape[0],
        vocab_size=wte.shape[0],
        pad_vocab_multiple=pad,
        tie_embeddings=tied,
        ln_eps=hf_cfg.get("layer_norm_epsilon", 1e-5),
    )
    if cfg.n_embd % n_head:
        raise CheckpointError(f"n_head={n_head} does not divide n_embd={cfg.n_embd} of {path}")
    return cfg


# ---------------------------------------------------------------------------- lazy import


# safetensors dtype names a GPT-2 weight may have (read as fp32); anything else is refused.
_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _header_shapes(files: list[Path]) -> dict[str, tuple[Path, Tensor]]:
    """Stored key -> (file, meta tensor of its shape and dtype), from safetensors headers only.
    safetensors itself refuses a truncated file, a header longer than the file and offsets
    past its end; the dtypes are checked here."""
    out = {}
    for f in files:
        try:
            with safe_open(f, "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                    info = handle.get_slice(key)
                    dtype = _FLOAT_DTYPES.get(info.get_dtype())
                    if dtype is None and not _BUFFER.match(key.removeprefix("transformer.")):
                        raise CheckpointError(
                            f"{f}: tensor {key!r} has dtype {info.get_dtype()}; GPT-2 weights "
                            f"are floating point ({', '.join(_FLOAT_DTYPES)})"
                        )
                    out[key] = (f, torch.empty(info.get_shape(), dtype=dtype, device="meta"))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' SafetensorError: header/format problems
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    return out


class LazyHFWeights:
    """weights(name, full_shape, region) -> a gpt3d tensor (or the region of it a rank holds)
    read from HF GPT-2 safetensors, for gpt3d.parallel.parallelize.load_weights: each call
    reads just the bytes it needs (a shard of a q/k/v slice of c_attn, of a transposed Conv1D
    weight), so no process ever holds the whole model, nor a whole sharded tensor.

    Every HF key and shape is checked against `cfg` from the file headers at construction."""

    def __init__(self, path: str | os.PathLike, cfg: GPTConfig):
        path = Path(path)
        header = _header_shapes(_weight_files(path) if path.is_dir() else [path])
        # HF name without "transformer." -> (file, stored key); the mask buffers dropped
        self.cfg = cfg
        self.where = {k.removeprefix("transformer."): (f, k) for k, (f, _) in header.items()}
        shapes = _strip_hf({k: t for k, (_, t) in header.items()})
        if cfg.tie_embeddings:
            shapes.pop("lm_head.weight", None)
        _check_shapes(shapes, _hf_shapes(cfg), cfg, "GPT-2 checkpoint")
        self.shapes = _gpt3d_shapes(cfg)  # gpt3d name -> full shape

    def _read(self, name: str, index=None) -> Tensor:
        f, key = self.where[name]
        if index is None:
            return _read_stored(f, key)
        try:
            with safe_open(f, "pt") as handle:
                return handle.get_slice(key)[index]
        except Exception as e:  # the file changed since its header was checked
            raise CheckpointError(f"{f}: cannot read {key!r} ({e})") from None

    def __call__(self, name: str, shape=None, region=None) -> Tensor:
        """gpt3d tensor `name` as fp32, or only its `region` (one slice per dim of the
        gpt3d shape: a rank's shard), read straight from the file without the rest."""
        full = self.shapes[name]
        r = [_bounds(x, n) for x, n in zip(region or [slice(None)] * len(full), full, strict=True)]
        if name in ("wte.weight", "lm_head.weight"):  # rows past vocab_size: padding, zero
            source = "wte.weight" if self.cfg.tie_embeddings else name
            (r0, r1), (c0, c1) = r
            V = self.cfg.vocab_size
            rows = self._read(source, (slice(min(r0, V), min(r1, V)), slice(c0, c1)))
            return _pad_rows(rows, r1 - r0).float()
        if m := re.fullmatch(r"(h\.\d+\.)attn\.([qkv])_proj\.(weight|bias)", name):
            off = "qkv".index(m[2]) * self.cfg.n_embd  # its columns of Conv1D c_attn (C, 3C)
            out = slice(r[0][0] + off, r[0][1] + off)
            if m[3] == "bias":
                return self._read(m[1] + "attn.c_attn.bias", (out,)).float()
            return self._read(m[1] + "attn.c_attn.weight", (slice(*r[1]), out)).T.float()
        if name.endswith(".weight") and any(f".{c}." in f".{name}" for c in _CONV1D):
            # Conv1D (in, out) -> Linear (out, in): read the transposed region
            return self._read(name, (slice(*r[1]), slice(*r[0]))).T.float()
        return self._read(name, tuple(slice(*b) for b in r)).float()


def _bounds(region: slice, n: int) -> tuple[int, int]:
    start, stop, step = region.indices(n)
    assert step == 1, "weights are read in contiguous slices"
    return start, stop


def hf_config(path: str | os.PathLike, *, n_head: int | None = None, pad_vocab_multiple: int = 1):
    """GPTConfig of a HF GPT-2 directory or .safetensors file, read without loading weights:
    config.json when present, else shapes from the safetensors header (n_head must be given)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"{path} does not exist; give a Hugging Face GPT-2 directory "
            "(config.json + model.safetensors) or a .safetensors file"
        )
    if not path.is_dir() and path.suffix != ".safetensors":
        raise CheckpointError(f"{path} is neither a directory nor a .safetensors file")
    cfg_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    hf_cfg = _read_json(cfg_file) if cfg_file.is_file() else None
    if hf_cfg is not None and hf_cfg.get("model_type") == "gpt2":
        cfg = gpt_config_from_hf(hf_cfg, pad_vocab_multiple=pad_vocab_multiple)
        if n_head is not None and n_head != cfg.n_head:
            raise CheckpointError(f"n_head={n_head} contradicts n_head={cfg.n_head} in {cfg_file}")
        return cfg
    header = _header_shapes(_weight_files(path) if path.is_dir() else [path])
    shapes = _strip_hf({k: t for k, (_, t) in header.items()})

    def tied() -> bool:
        where = {k.removeprefix("transformer."): (f, k) for k, (f, _) in header.items()}
        return torch.equal(*(_read_stored(*where[n]) for n in ("lm_head.weight", "wte.weight")))

    return _infer_config(shapes, path, n_head, hf_cfg, pad_vocab_multiple, tied)


def _read_stored(file: Path, key: str) -> Tensor:
    try:
        with safe_open(file, "pt") as handle:
            return handle.get_tensor(key)
    except Exception as e:  # the file changed since its header was checked
        raise CheckpointError(f"{file}: cannot read {key!r} ({e})") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data
