"""Distributed checkpoints (torch.distributed.checkpoint) that resume on any dp x pp x tp layout.

On disk, under <job.output_dir>/checkpoints/:

    step-200/            complete: made visible by one atomic rename, after every rank wrote
      .metadata          DCP index: tensor names, global shapes, which bytes hold which chunk
      __<rank>_0.distcp  DCP tensor data, one file per writing rank
      meta.json          step, data-loader position, config, model shape, layout, file sizes
    step-300.tmp/        being written, or left by a crash: never resumed from

Tensor names are the plain model's, whatever the layout: "model.wte.weight",
"optim.state.h.0.attn.q_proj.weight.exp_avg" (AdamW state keyed by parameter name, so it
reshards across layouts whose parameter groups differ), "rng.rank<r>" (per-rank RNG, restored
only on the same world size). A tied output head is stored once, as wte.weight: a last
pipeline stage without the embedding loads its lm_head copy from that entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from gpt3d.config import config_to_dict
from gpt3d.model import GPT, GPTConfig

CHECKPOINT_DIR = "checkpoints"
META_FILE = "meta.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
TMP_SUFFIX = ".tmp"
_TMP_DIR = re.compile(r"^step-(\d+)\.tmp$")
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_HEAD, _WTE = "lm_head.weight", "wte.weight"
# One process saves/loads with no_dist=True on purpose; DCP warns about it every time.
warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)


# ------------------------------------------------------- finding and checking (no collectives)


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def latest_complete(root: str | os.PathLike) -> Path | None:
    """The newest published step-N directory (half-written .tmp directories never count)."""
    root = Path(root)
    found = [(int(m[1]), p) for p in root.glob("step-*") if (m := _STEP_DIR.match(p.name))]
    found = [(n, p) for n, p in found if (p / META_FILE).is_file()]
    return max(found)[1] if found else None


def read_meta(path: str | os.PathLike) -> dict:
    """meta.json of a complete checkpoint; ValueError saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} does not exist; point checkpoint.resume at a step-N "
                         "directory or use checkpoint.resume=auto")  # fmt: skip
    if path.name.endswith(".tmp") or not (path / META_FILE).is_file():
        raise ValueError(f"checkpoint {path} is incomplete (no {META_FILE}: its save never "
                         "finished); resume from an earlier step-N directory")  # fmt: skip
    try:
        meta = json.loads((path / META_FILE).read_text())
        GPTConfig(**meta["model"])
        int(meta["step"]), int(meta["loader"]["samples_consumed"]), dict(meta["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {path}: {META_FILE} is corrupt ({e!r}); "
                         "resume from another step-N directory") from None  # fmt: skip
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path} has format {meta.get('format')}, expected {FORMAT}")
    return meta


def verify(path: str | os.PathLike, gpt: GPTConfig | None = None) -> dict:
    """Read-only check before any collective: meta.json, file sizes, the DCP index and (with
    `gpt`) that the saved model shape is this model's. Returns meta.json."""
    path, meta = Path(path), read_meta(path)
    for name, size in meta["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            found = f.stat().st_size if f.is_file() else "missing"
            raise ValueError(f"checkpoint {path} is damaged: {name} has {found} bytes, {size} "
                             "were written; resume from another step-N directory")  # fmt: skip
    try:
        index = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - unpickling garbage raises anything
        raise ValueError(f"checkpoint {path}: unreadable DCP metadata ({e!r})") from None
    saved = GPTConfig(**meta["model"])
    for name, shape in _model_shapes(saved).items():
        if tuple(getattr(index.get(f"model.{name}"), "size", ())) != shape:
            raise ValueError(f"checkpoint {path} is damaged: model.{name} {shape} not in index")
    if gpt is not None:
        _check_same_shape(saved, gpt, path)
    return meta


def _check_same_shape(saved: GPTConfig, gpt: GPTConfig, path: Path) -> None:
    keys = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "dropout"]
    diff = [f"{k}={getattr(saved, k)} (now {getattr(gpt, k)})" for k in keys
            if getattr(saved, k) != getattr(gpt, k)]  # fmt: skip
    if diff:
        raise ValueError(f"checkpoint {path} holds a different model shape: {', '.join(diff)}; "
                         "use the checkpoint's [model] settings (its meta.json has them) or "
                         "start without checkpoint.resume")  # fmt: skip


def _model_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes as stored: the plain model's, a tied lm_head only as wte."""
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in GPT(cfg).state_dict().items()}
    if cfg.tie_embeddings:
        shapes.pop(_HEAD)
    return shapes


def find_checkpoint(spec: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """A checkpoint path as given, or for "auto" the latest complete one under output_dir."""
    if str(spec) != "auto":
        return Path(spec)
    found = latest_complete(checkpoint_root(output_dir))
    if found is None:
        raise ValueError(f"no complete checkpoint in {checkpoint_root(output_dir)}; give the "
                         "run's output directory or a step-N checkpoint path")  # fmt: skip
    return found


def resolve_resume(cfg) -> Path | None:
    """checkpoint.resume -> a verified checkpoint directory, or None for a fresh start.
    "auto": the latest complete checkpoint in job.output_dir, if any."""
    from gpt3d.config import gpt_config

    resume = cfg.checkpoint.resume
    if not resume:
        return None
    path = latest_complete(checkpoint_root(cfg.job.output_dir)) if resume == "auto" else resume
    if path is None:
        return None
    verify(path, gpt_config(cfg.model))
    return Path(path)


def load_model_state_dict(path: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """(GPTConfig, full fp32 CPU state dict of the plain model) from a checkpoint of any
    layout, in this process alone: only model tensors are read, never the optimizer state."""
    path = Path(path)
    cfg = GPTConfig(**verify(path)["model"])
    sd = {k: torch.empty(shape) for k, shape in _model_shapes(cfg).items()}
    dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True)
    if cfg.tie_embeddings:
        sd[_HEAD] = sd[_WTE]
    return cfg, sd


# ---------------------------------------------------------------- preemption


class StopOnSignal:
    """SIGTERM/SIGINT set a flag that the training loop checks between steps; a second
    SIGINT aborts at once. Install from the main thread."""

    def __init__(self):
        self.received = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def on_any_rank(self) -> bool:
        """True on every rank once any rank got a signal (ranks may get it a step apart)."""
        if not dist.is_initialized():
            return bool(self.received)
        flag = torch.tensor([int(bool(self.received))])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ---------------------------------------------------------------- the checkpointer


class Checkpointer:
    """save / maybe_save / load / finish for one Trainer (collective: every rank calls)."""

    def __init__(self, trainer, log=print):
        self.trainer, self.log = trainer, log
        self.cfg = trainer.cfg.checkpoint
        self.root = checkpoint_root(trainer.cfg.job.output_dir)
        self.rank, self.world = trainer.env.rank, trainer.env.world_size
        self.tied = trainer.gpt.tie_embeddings
        self.view = _merged_view(trainer.model.parts)
        self.last_saved = -1
        self.pending = None  # async save in flight: (future, tmp dir, meta)
        if _restarts_may_hang():
            log("warning: torchrun --max-restarts with the shared rendezvous TCPStore reuses "
                "stale keys on restart and can hang in torch 2.13 (pytorch#135712); launch "
                "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1")  # fmt: skip
        # Async writes run collectives from a background thread: give them their own group.
        use_group = self.cfg.async_save and dist.is_initialized()
        self.async_group = dist.new_group(backend="gloo") if use_group else None

    # ---- save --------------------------------------------------------------------------
    def maybe_save(self) -> None:
        self._publish_if_done()
        if self.cfg.interval and self.trainer.step % self.cfg.interval == 0:
            self.save()

    def save(self) -> None:
        """Write step-N.tmp/ on every rank, then rank 0 publishes it as step-N/ (once per step)."""
        if self.trainer.step == self.last_saved:
            return
        self.wait()
        t0, step = time.perf_counter(), self.trainer.step
        tmp = self.root / f"step-{step}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
            tmp.mkdir(parents=True)
        _barrier()
        state, meta = self._state_dict(), self._meta()
        if self.cfg.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.async_group,
                                    no_dist=self.world == 1)  # fmt: skip
            self.pending = (future, tmp, meta)
            self.log(f"checkpoint step-{step}: staged in {time.perf_counter() - t0:.1f}s, "
                     "writing in the background")  # fmt: skip
        else:
            dcp.save(state, checkpoint_id=str(tmp), no_dist=self.world == 1)
            self._publish(tmp, meta)
            self.log(f"checkpoint step-{step} saved in {time.perf_counter() - t0:.1f}s")
        self.last_saved = step

    def finish(self) -> None:
        """End of training: the final save (checkpoint.save_final), then wait for writes."""
        if self.cfg.save_final:
            self.save()
        self.wait()

    def wait(self) -> None:
        """Block until an async save has been written and published."""
        if self.pending is not None:
            self.pending[0].result()
            self._publish_if_done()

    def _publish_if_done(self) -> None:
        # On rank 0 a finished future means every rank's data and the index are on disk (DCP
        # gathers all write results before writing .metadata), so no barrier is needed.
        if self.pending is not None and self.pending[0].done():
            future, tmp, meta = self.pending
            self.pending = None
            future.result()  # re-raise a failed write
            self._publish(tmp, meta)

    def _publish(self, tmp: Path, meta: dict) -> None:
        """Rank 0: meta.json (with file sizes) last, fsync, atomic rename, prune old ones."""
        if self.rank != 0:
            return
        meta["files"] = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        _write_synced(tmp / META_FILE, json.dumps(meta, indent=1))
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        if final.exists():  # re-saving a step (resumed from an older checkpoint)
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _fsync_dir(self.root)
        self._prune(meta["step"])

    def _prune(self, step: int) -> None:
        """Keep the newest checkpoint.keep_last complete ones; drop stale .tmp directories."""
        steps = sorted((int(m[1]), p) for p in self.root.iterdir()
                       if (m := _STEP_DIR.match(p.name)))  # fmt: skip
        for _, p in steps[: -self.cfg.keep_last]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.iterdir():
            if (m := _TMP_DIR.match(p.name)) and int(m[1]) <= step:
                shutil.rmtree(p, ignore_errors=True)

    def _meta(self) -> dict:
        t = self.trainer
        return {
            "format": FORMAT, "step": t.step, "loader": t.loader.state_dict(),
            "model": dataclasses.asdict(t.gpt), "config": config_to_dict(t.cfg),
            "world_size": self.world, "layout": t.dims.describe(), "time": time.time(),
        }  # fmt: skip

    # ---- state dicts ---------------------------------------------------------------------
    def _state_dict(self) -> dict:
        model, optim = get_state_dict(self.view, self.trainer.optimizer, options=_OPTIONS)
        if self.tied:  # one copy of a tied embedding, under wte's name; the head copy is equal
            model, optim = _without_head(model), _without_head(optim)
        return {"model": model, "optim": optim, "rng": _rng_state(self.rank)}

    def load(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, step, data position (and RNG on the same world size)."""
        path = Path(path)
        meta = verify(path, self.trainer.gpt)
        self.trainer.loader.load_state_dict(meta["loader"])  # checks seed / seq_len first
        model, optim = get_state_dict(self.view, self.trainer.optimizer, options=_OPTIONS)
        # Hyper-parameters (param_groups) come from this run's config; state from the file.
        state = {k: v for k, v in optim.items() if k.startswith("state.")}
        request = {"model": _head_as_wte(model, self.tied), "optim": _head_as_wte(state, self.tied)}
        same_world = meta["world_size"] == self.world
        rng = _rng_state(self.rank) if same_world else {}
        if rng:
            request["rng"] = rng
        # In place: these are the live parameters and optimizer state.
        dcp.load(request, checkpoint_id=str(path), no_dist=self.world == 1)
        if self.tied:
            _copy_wte_to_head(model)
            _copy_wte_to_head(state)
        set_state_dict(self.view, self.trainer.optimizer, model_state_dict=model,
                       optim_state_dict=optim, options=_OPTIONS)  # fmt: skip
        if rng:
            _set_rng_state(rng, self.rank)
        self.trainer.step = self.last_saved = int(meta["step"])
        note = "" if same_world else "; RNG reseeded (different world size)"
        self.log(f"resumed from {path} at step {meta['step']} (saved on {meta['layout']}, "
                 f"{meta['world_size']} ranks){note}")  # fmt: skip


# ---------------------------------------------------------------- helpers


def _merged_view(parts: list[nn.Module]) -> nn.Module:
    """One module holding every local pipeline chunk's submodules under their plain names,
    so DCP's state-dict API sees one model (and one optimizer) with unprefixed FQNs."""
    if len(parts) == 1:
        return parts[0]
    view = nn.Module()
    view.h = nn.ModuleDict()
    for part in parts:
        for name, child in part.named_children():
            if name == "h":
                view.h.update(child)
            else:
                setattr(view, name, child)
    return view


def _is_head(key: str) -> bool:
    return key == _HEAD or key.startswith((f"state.{_HEAD}.", f"param_groups.{_HEAD}."))


def _without_head(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not _is_head(k)}


def _head_as_wte(sd: dict, tied: bool) -> dict:
    """What to read for a tied model: wte entries; a rank holding only the head reads them
    into its head copy."""
    if not tied:
        return sd
    if any(k == _WTE or k.startswith(f"state.{_WTE}.") for k in sd):
        return _without_head(sd)
    return {k.replace(_HEAD, _WTE) if _is_head(k) else k: v for k, v in sd.items()}


@torch.no_grad()
def _copy_wte_to_head(sd: dict) -> None:
    """A rank holding both copies of a tied embedding (pp=1 or a V schedule): the head copy
    takes the loaded wte values (same placements, so local shards line up)."""
    for key in [k for k in sd if _is_head(k)]:
        src = sd.get(key.replace(_HEAD, _WTE))
        if src is not None:
            dst, src = _local(sd[key]), _local(src)
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _rng_state(rank: int) -> dict:
    state = {f"rank{rank}.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state[f"rank{rank}.cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict, rank: int) -> None:
    torch.set_rng_state(state[f"rank{rank}.cpu"])
    if f"rank{rank}.cuda" in state:
        torch.cuda.set_rng_state(state[f"rank{rank}.cuda"])


def _restarts_may_hang() -> bool:
    env = os.environ
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0
    return restarts and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
