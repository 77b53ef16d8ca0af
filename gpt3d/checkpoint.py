"""Distributed checkpoints (torch.distributed.checkpoint) of a training run: save on any
dp x pp x tp layout, resume on any other, exactly (layout on disk: gpt3d/checkpoint_dir.py).

Every rank passes its live parameters and AdamW state, under the plain model's names, to
DCP; rank 0 publishes the directory once all of it is on disk. A tied output head is saved
once (as wte.weight); a last pipeline stage without the embedding loads its lm_head copy
from that entry, a rank holding both copies copies wte into the head after loading.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
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

from gpt3d.checkpoint_dir import (
    FORMAT,
    HEAD,
    META_FILE,
    STEP_DIR,
    TMP_DIR,
    TMP_SUFFIX,
    WTE,
    checkpoint_root,
    verify,
)
from gpt3d.checkpoint_dir import resolve_resume as resolve_resume  # for recipes/train.py
from gpt3d.config import config_to_dict

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


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
        # NCCL reduces only CUDA tensors; gloo takes CPU ones.
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(bool(self.received))], device=device)
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
        self.trainer.check_finite_params()  # never replace a good checkpoint by a NaN state
        self.wait()
        t0, step = time.perf_counter(), self.trainer.step
        tmp = self.root / f"step-{step}{TMP_SUFFIX}"
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

    def latest_path(self) -> Path | None:
        """The newest published checkpoint of this run (None if it saved nothing)."""
        path = self.root / f"step-{self.last_saved}"
        return path if self.last_saved >= 0 and path.is_dir() else None

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
        final = tmp.with_name(tmp.name.removesuffix(TMP_SUFFIX))
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
                       if (m := STEP_DIR.match(p.name)))  # fmt: skip
        for _, p in steps[: -self.cfg.keep_last]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.iterdir():
            if (m := TMP_DIR.match(p.name)) and int(m[1]) <= step:
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
    return key == HEAD or key.startswith((f"state.{HEAD}.", f"param_groups.{HEAD}."))


def _without_head(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not _is_head(k)}


def _head_as_wte(sd: dict, tied: bool) -> dict:
    """What to read for a tied model: wte entries; a rank holding only the head reads them
    into its head copy."""
    if not tied:
        return sd
    if any(k == WTE or k.startswith(f"state.{WTE}.") for k in sd):
        return _without_head(sd)
    return {k.replace(HEAD, WTE) if _is_head(k) else k: v for k, v in sd.items()}


@torch.no_grad()
def _copy_wte_to_head(sd: dict) -> None:
    """A rank holding both copies of a tied embedding (pp=1 or a V schedule): the head copy
    takes the loaded wte values (same placements, so local shards line up)."""
    for key in [k for k in sd if _is_head(k)]:
        src = sd.get(key.replace(HEAD, WTE))
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
