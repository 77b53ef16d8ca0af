"""Distributed checkpoints (torch.distributed.checkpoint) of a training run: save on any
dp x pp x tp layout, resume on any other, exactly (layout on disk: gpt3d/checkpoint_dir.py).

Every rank passes its live parameters and AdamW state, under the plain model's names, to
DCP; each writing rank checksums its files as it writes them (gpt3d/integrity.py), and rank
0 publishes the directory once all of it is on disk. A save that does not fit on the disk
stops the run with one clear error before writing (or, if the disk fills up meanwhile, with
the half-written directory removed); the previous checkpoint stays the latest.

A tied output head is saved once (as wte.weight); a last pipeline stage without the
embedding loads its lm_head copy from that entry, a rank holding both copies copies wte into
the head after loading.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import shutil
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
    CHECKPOINT_META,
    FORMAT,
    HEAD,
    STEP_DIR,
    TMP_DIR,
    TMP_SUFFIX,
    WTE,
    checkpoint_root,
    latest_complete,
    verify,
)
from gpt3d.checkpoint_safety import SafeFileSystemReader, checkpoint_errors
from gpt3d.config import config_to_dict
from gpt3d.errors import TrainingDiverged
from gpt3d.heartbeat import start_heartbeat
from gpt3d.integrity import (
    ChecksumWriter,
    check_room,
    collect_checksums,
    dataset_fingerprint,
    disk_full_error,
    meta_checksum,
)
from gpt3d.parallel.utils import all_finite

_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


# ---------------------------------------------------------------- the checkpointer


class Checkpointer:
    """save / maybe_save / load / finish of one run's state (collective: every rank calls).

    It is handed exactly what it saves and restores, torchtitan-style: the model parts, the
    optimizer, the data loader and the train state (whose step it advances on load)."""

    def __init__(self, run, parts, optimizer, loader, state, log=print):
        """run: the gpt3d.preflight.RunPlan (checkpoint settings, model shape, layout)."""
        self.cfg, self.run = run.config.checkpoint, run
        self.parts, self.optimizer, self.loader, self.state = parts, optimizer, loader, state
        self.grad_sync = parts.grad_sync  # PowerSGD's errors and Q, when compressing
        self.log = log
        self.root = checkpoint_root(run.config.job.output_dir)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.tied = run.model.tie_embeddings
        self.view = _merged_view(parts.chunks)
        self.last_saved = -1
        self.pending = None  # async save in flight: (future, tmp dir, meta)
        # Async writes run collectives from a background thread: give them their own group.
        use_group = self.cfg.async_save and dist.is_initialized()
        self.async_group = dist.new_group(backend="gloo") if use_group else None
        self.dataset = dataset_fingerprint(run.config.data.dataset) if self.rank == 0 else None
        self.need = 0  # bytes the last save needed, for a disk-full message
        # Every rank of a live run builds a Checkpointer once the process group exists and
        # shares its output directory: the place to start the heartbeat that ends the job
        # when a rank stops answering for the collective timeout (init_process_group's).
        timeout = run.config.parallel.timeout_s or (1800.0 if torch.cuda.is_available() else 120.0)
        start_heartbeat(run.config.job.output_dir, self.rank, self.world, timeout)

    # ---- save --------------------------------------------------------------------------
    def maybe_save(self) -> None:
        self._publish_if_done()
        if self.cfg.interval and self.state.step % self.cfg.interval == 0:
            self.save()

    def save(self) -> None:
        """Write step-N.tmp/ on every rank, then rank 0 publishes it as step-N/ (once per step)."""
        step = self.state.step
        if step == self.last_saved:
            return
        if not all_finite(self.parts.parameters()):  # never replace a good checkpoint by NaNs
            raise TrainingDiverged(
                f"parameters became NaN/Inf after step {step}; lower training.lr "
                f"(now {self.run.config.training.lr}); the last checkpoint was kept"
            )
        self.wait()
        t0 = time.perf_counter()
        state, meta = self._state_dict(), self._meta()
        self.need = check_room(self.root, state, step, self._latest_name())  # collective
        tmp = self.root / f"step-{step}{TMP_SUFFIX}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier attempt
            tmp.mkdir(parents=True)
        _barrier()
        writer = ChecksumWriter(tmp)
        if self.cfg.async_save:
            future = dcp.async_save(
                state,
                storage_writer=writer,
                process_group=self.async_group,
                no_dist=self.world == 1,
            )
            self.pending = (future, tmp, meta)
            took = time.perf_counter() - t0
            self.log(f"checkpoint step-{step}: staged in {took:.1f}s, writing in the background")
        else:
            try:
                dcp.save(state, storage_writer=writer, no_dist=self.world == 1)
            except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException included
                self._save_failed(e, tmp, step, same_on_every_rank=True)
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
            concurrent.futures.wait([self.pending[0]])
            self._publish_if_done()

    def _publish_if_done(self) -> None:
        # On rank 0 a finished future means every rank's data and the index are on disk (DCP
        # gathers all write results before writing .metadata), so no barrier is needed.
        if self.pending is not None and self.pending[0].done():
            future, tmp, meta = self.pending
            self.pending = None
            try:
                future.result()  # re-raise a failed write
            except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException included
                # every rank's future fails, but each rank notices at its own next step
                self._save_failed(e, tmp, meta["step"], same_on_every_rank=False)
            self._publish(tmp, meta)

    def _save_failed(self, exc, tmp: Path, step: int, same_on_every_rank: bool) -> None:
        """A failed write: a full disk becomes one clear DiskFullError, with the half-written
        directory removed to give the space back; anything else propagates as it is. DCP
        gathers the failure to every rank, so a synchronous save fails on all at once."""
        error = disk_full_error(exc, step, self.need, self.root, self._latest_name())
        if error is None:
            raise exc
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        error.same_on_every_rank = same_on_every_rank  # gpt3d.launch: print once or per rank
        raise error from None

    def _latest_name(self) -> str:
        latest = latest_complete(self.root)
        return latest.name if latest is not None else "no checkpoint (none saved yet)"

    def _publish(self, tmp: Path, meta: dict) -> None:
        """Rank 0: meta.json (with file sizes) last, fsync, atomic rename, prune old ones."""
        if self.rank != 0:
            return
        meta["checksums"] = collect_checksums(tmp, skip=(CHECKPOINT_META,))  # sidecars merged
        meta["files"] = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        meta["meta_checksum"] = meta_checksum(json.loads(json.dumps(meta)))  # as read back
        _write_synced(tmp / CHECKPOINT_META, json.dumps(meta, indent=1))
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
        steps = sorted((int(m[1]), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)))
        for _, p in steps[: -self.cfg.keep_last]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.iterdir():
            if (m := TMP_DIR.match(p.name)) and int(m[1]) <= step:
                shutil.rmtree(p, ignore_errors=True)

    def _meta(self) -> dict:
        run = self.run
        return {
            "format": FORMAT,
            "step": self.state.step,
            "loader": self.loader.state_dict(),
            "model": dataclasses.asdict(run.model),
            "config": config_to_dict(run.config),
            "world_size": self.world,
            "dataset": self.dataset,
            "layout": run.dims.describe(),
            "grad_sync": self.grad_sync.describe() if self.grad_sync else None,
            "time": time.time(),
        }

    # ---- state dicts ---------------------------------------------------------------------
    def _state_dict(self) -> dict:
        model, optim = get_state_dict(self.view, self.optimizer, options=_OPTIONS)
        if self.tied:  # one copy of a tied embedding, under wte's name; the head copy is equal
            model, optim = _without_head(model), _without_head(optim)
        state = {"model": model, "optim": optim, "rng": _rng_state(self.rank)}
        if self.grad_sync is not None and self.grad_sync.describe():
            state["grad_sync"] = self.grad_sync.state_dict()
        return state

    def load(self, path: str | os.PathLike) -> None:
        """Restore model, optimizer, step, data position (and RNG on the same world size)."""
        path = Path(path)
        meta = verify(path, self.run.model, checksums=False)  # preflight checked them (rank 0)
        self.loader.load_state_dict(meta["loader"])  # checks seed / seq_len first
        model, optim = get_state_dict(self.view, self.optimizer, options=_OPTIONS)
        # Hyper-parameters (param_groups) come from this run's config; state from the file.
        state = {k: v for k, v in optim.items() if k.startswith("state.")}
        request = {"model": _head_as_wte(model, self.tied), "optim": _head_as_wte(state, self.tied)}
        same_world = meta["world_size"] == self.world
        rng = _rng_state(self.rank) if same_world else {}
        if rng:
            request["rng"] = rng
        sync_note = self._request_grad_sync(request, meta)
        # In place: these are the live parameters and optimizer state.
        with checkpoint_errors():
            dcp.load(request, storage_reader=SafeFileSystemReader(path), no_dist=self.world == 1)
        if self.tied:
            _copy_wte_to_head(model)
            _copy_wte_to_head(state)
        set_state_dict(
            self.view,
            self.optimizer,
            model_state_dict=model,
            optim_state_dict=optim,
            options=_OPTIONS,
        )
        if rng:
            _set_rng_state(rng, self.rank)
        self.state.step = self.last_saved = int(meta["step"])
        note = ("" if same_world else "; RNG reseeded (different world size)") + sync_note
        self.log(
            f"resumed from {path} at step {meta['step']} (saved on {meta['layout']}, "
            f"{meta['world_size']} ranks){note}"
        )

    def _request_grad_sync(self, request: dict, meta: dict) -> str:
        """Compressor state is read only when it was saved by the same compressor on the same
        layout (its tensors are per-rank local shards); otherwise it starts afresh."""
        mine = self.grad_sync.describe() if self.grad_sync is not None else None
        if mine is None:
            return ""
        if meta.get("grad_sync") != mine:
            return f"; {mine.split(' on ')[0]} state starts afresh (not saved on this layout)"
        request["grad_sync"] = self.grad_sync.state_dict()
        return ""


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
