"""A checkpoint directory on disk: its layout, finding the latest complete one, checking it
before any collective, and reading the plain model out of it in one process.

Under <job.output_dir>/checkpoints/:

    step-200/            complete: made visible by one atomic rename, after every rank wrote
      .metadata          DCP index: tensor names, global shapes, which bytes hold which chunk
      __<rank>_0.distcp  DCP tensor data, one file per writing rank
      meta.json          step, data-loader position, config, model shape, layout, the size
                         and crc32 of every file, the dataset's fingerprint, its own crc32
    step-300.tmp/        being written, or left by a crash: never resumed from

Tensor names are the plain model's, whatever the layout: "model.wte.weight",
"optim.state.h.0.attn.q_proj.weight.exp_avg" (AdamW state keyed by parameter name, so it
reshards across layouts whose parameter groups differ), "rng.rank<r>.cpu" (per-rank RNG,
restored only on the same world size). A tied output head is stored once, as wte.weight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from gpt3d.checkpoint_safety import (
    CorruptCheckpointError,
    SafeFileSystemReader,
    checkpoint_errors,
    read_dcp_metadata,
)
from gpt3d.errors import CheckpointError
from gpt3d.integrity import check_checksums, meta_checksum
from gpt3d.model import GPT, GPTConfig

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_META = "meta.json"  # written last, by rank 0: its presence = complete
FORMAT = 1
TMP_SUFFIX = ".tmp"
STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")
HEAD, WTE = "lm_head.weight", "wte.weight"
TENSORS_ONLY = ("model.", "optim.state.", "rng.")  # the entries gpt3d reads: tensors only
# One process reads/writes with no_dist=True on purpose; DCP warns about it every time.
warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def latest_complete(root: str | os.PathLike) -> Path | None:
    """The newest published step-N directory (half-written .tmp directories never count)."""
    root = Path(root)
    found = [(int(m[1]), p) for p in root.glob("step-*") if (m := STEP_DIR.match(p.name))]
    found = [(n, p) for n, p in found if (p / CHECKPOINT_META).is_file()]
    return max(found)[1] if found else None


def read_checkpoint_meta(path: str | os.PathLike) -> dict:
    """meta.json of a complete checkpoint; ValueError saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} does not exist; point checkpoint.resume at a step-N "
            "directory or use checkpoint.resume=auto"
        )
    if path.name.endswith(".tmp") or not (path / CHECKPOINT_META).is_file():
        raise CheckpointError(
            f"checkpoint {path} is incomplete (no {CHECKPOINT_META}: its save never "
            "finished); resume from an earlier step-N directory"
        )
    try:
        meta = json.loads((path / CHECKPOINT_META).read_text())
        GPTConfig(**meta["model"])
        int(meta["step"]), int(meta["loader"]["samples_consumed"]), dict(meta["files"])
    except (ValueError, KeyError, TypeError) as e:  # incl. json.JSONDecodeError
        raise CheckpointError(
            f"checkpoint {path}: {CHECKPOINT_META} is corrupt ({e!r}); "
            "resume from another step-N directory"
        ) from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT}"
        )
    if "meta_checksum" in meta and meta_checksum(meta) != meta["meta_checksum"]:
        raise CorruptCheckpointError(
            f"checkpoint {path} is damaged: {CHECKPOINT_META} does not match its own checksum "
            "(a changed byte); resume from another step-N directory"
        )
    return meta


def verify(path: str | os.PathLike, gpt: GPTConfig | None = None, checksums: bool = True) -> dict:
    """Read-only check before any collective: meta.json, file sizes, (with `checksums`) every
    file's crc32, the DCP index and (with `gpt`) that the saved model shape is this model's.
    Returns meta.json. A damaged checkpoint's error names the previous good one."""
    path = Path(path)
    return _verify(path, gpt, checksums, lambda: _instead_of(path))


def _verify(path: Path, gpt: GPTConfig | None, checksums: bool, instead) -> dict:
    meta = read_checkpoint_meta(path)
    for name, size in meta["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            found = f.stat().st_size if f.is_file() else "missing"
            raise CorruptCheckpointError(
                f"checkpoint {path} is damaged: {name} has {found} bytes, {size} "
                f"were written; {instead()}"
            )
    if checksums:  # before anything parses a byte of the data files
        check_checksums(path, meta, instead)
    index = read_dcp_metadata(path).state_dict_metadata  # allow-list unpickler: runs nothing
    for key, entry in index.items():
        if key.startswith(TENSORS_ONLY) and not isinstance(entry, TensorStorageMetadata):
            raise CorruptCheckpointError(
                f"checkpoint {path}: {key!r} is stored as a non-tensor value; gpt3d writes "
                "only tensors there (the index was altered)"
            )
    saved = GPTConfig(**meta["model"])
    for name, shape in model_shapes(saved).items():
        if tuple(getattr(index.get(f"model.{name}"), "size", ())) != shape:
            raise CheckpointError(
                f"checkpoint {path} is damaged: model.{name} {shape} not in index"
            )
    if gpt is not None:
        _check_same_shape(saved, gpt, path)
    return meta


# Training knobs a resumed run may change: they alter no tensor and no sample order.
_NOT_SHAPE = ("dropout", "moe_aux_coef", "moe_bias_rate", "moe_impl")


def _check_same_shape(saved: GPTConfig, gpt: GPTConfig, path: Path) -> None:
    keys = [f.name for f in dataclasses.fields(GPTConfig) if f.name not in _NOT_SHAPE]
    diff = [
        f"{k}={getattr(saved, k)} (now {getattr(gpt, k)})"
        for k in keys
        if getattr(saved, k) != getattr(gpt, k)
    ]
    if diff:
        raise CheckpointError(
            f"checkpoint {path} holds a different model shape: {', '.join(diff)}; "
            "use the checkpoint's [model] settings (its meta.json has them) or "
            "start without checkpoint.resume"
        )


def previous_good(path: Path) -> Path | None:
    """The newest complete checkpoint older than `path` in its directory that verifies
    (checksums included), or None."""
    m = STEP_DIR.match(path.name) or TMP_DIR.match(path.name)
    if m is None or not path.parent.is_dir():
        return None
    older = [(int(o[1]), p) for p in path.parent.iterdir() if (o := STEP_DIR.match(p.name))]
    for _, candidate in sorted((s, p) for s, p in older if s < int(m[1]))[::-1]:
        try:
            _verify(candidate, None, True, lambda: "")
            return candidate
        except CheckpointError:
            continue
    return None


def _instead_of(path: Path) -> str:
    good = previous_good(path)
    if good is None:
        return f"there is no earlier good checkpoint in {path.parent}"
    return f"the previous good checkpoint is {good} (resume with --checkpoint.resume={good})"


def model_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes as stored: the plain model's, a tied lm_head only as wte."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop(HEAD)
    return shapes


def find_checkpoint(spec: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """A checkpoint path as given, or for "auto" the latest complete one under output_dir."""
    if str(spec) != "auto":
        return Path(spec)
    found = latest_complete(checkpoint_root(output_dir))
    if found is None:
        raise CheckpointError(
            f"no complete checkpoint in {checkpoint_root(output_dir)}; give the "
            "run's output directory or a step-N checkpoint path"
        )
    return found


def find_resume(spec: str, output_dir: str | os.PathLike) -> Path | None:
    """checkpoint.resume -> the checkpoint to continue from, unverified: "" = none (a fresh
    start), "auto" = the latest complete one in output_dir (none yet: a fresh start), else
    the path given."""
    if not spec:
        return None
    if spec == "auto":
        return latest_complete(checkpoint_root(output_dir))
    return Path(spec)


def load_model_state_dict(
    path: str | os.PathLike, checksums: bool = True
) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(GPTConfig, full fp32 CPU state dict of the plain model) from a checkpoint of any
    layout, in this process alone: only model tensors are read, never the optimizer state
    (the checksums, when checked, cover every file)."""
    path = Path(path)
    cfg = GPTConfig(**verify(path, checksums=checksums)["model"])
    sd = {k: torch.empty(shape) for k, shape in model_shapes(cfg).items()}
    with checkpoint_errors():
        dcp.load({"model": sd}, storage_reader=SafeFileSystemReader(path), no_dist=True)
    if cfg.tie_embeddings:
        sd[HEAD] = sd[WTE]
    return cfg, sd
