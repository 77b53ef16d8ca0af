"""Trust nothing on disk: content checksums of a checkpoint's files, the identity of the
dataset a run trains on, and room on the disk for the next checkpoint.

    dcp.save(state, storage_writer=ChecksumWriter(tmp))   # crc32 of each file while writing
    collect_checksums(tmp)                                 # rank 0, before meta.json
    dataset_fingerprint(data_dir)                          # into meta.json; checked on resume
    need = check_room(root, state, step, latest)           # collective, before writing

A checksum catches damage (bit rot, a truncated copy, a flipped byte); it is no signature:
whoever can rewrite a file can rewrite meta.json too (docs/security.md).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

from gpt3d.checkpoint_safety import CorruptCheckpointError, file_checksum
from gpt3d.data import DATASET_META, SPLITS, token_files
from gpt3d.errors import CheckpointError

SIDECAR = "checksums.json"  # per writing rank, "__<r>_checksums.json"; merged into meta.json
FINGERPRINT_REGIONS, REGION_BYTES = 32, 4096  # sampled from every token file
ENTRY_OVERHEAD = 2048  # bytes per entry beyond its data: torch.save framing ~1.6 KB + index


# ---------------------------------------------------------------- checksums while writing


class _CrcStream:
    """A binary file being written, with the crc32 of every byte passed to write(). DCP only
    appends (write, tell, flush, fileno); a seek makes the running crc unusable (None)."""

    def __init__(self, raw):
        self._raw, self.crc = raw, 0

    def write(self, data) -> int:
        if self.crc is not None:
            self.crc = zlib.crc32(data, self.crc)
        return self._raw.write(data)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def seek(self, *args):
        self.crc = None
        return self._raw.seek(*args)

    def __getattr__(self, name: str):  # tell, flush, fileno, close, ...
        return getattr(self._raw, name)


class _ChecksumFileSystem(FileSystem):
    """DCP's local file system; remembers the crc32 of each file it wrote, by name."""

    def __init__(self):
        super().__init__()
        self.sums: dict[str, int | None] = {}

    @contextmanager
    def create_stream(self, path, mode):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            tracked = _CrcStream(stream)
            yield tracked
        self.sums[Path(path).name] = tracked.crc


class ChecksumWriter(FileSystemWriter):
    """FileSystemWriter that checksums each data file as it writes it, on the writing rank,
    and leaves the sums in a small sidecar file (__<r>_checksums.json) that rank 0 merges
    into meta.json (collect_checksums). No extra pass over the data, no extra collective."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self.fs = _ChecksumFileSystem()

    def write_data(self, plan, planner):
        self.fs.sums.clear()
        future = super().write_data(plan, planner)  # FileSystemWriter writes synchronously
        future.wait()
        folder = Path(self.path)
        sums = {
            name: file_checksum(folder / name) if crc is None else f"crc32:{crc:08x}"
            for name, crc in self.fs.sums.items()
        }
        (folder / f"{plan.storage_data.prefix}{SIDECAR}").write_text(json.dumps(sums))
        return future


def collect_checksums(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Rank 0, once every rank has written: {file: "crc32:..."} for every file in `folder`
    but `skip`, from the writers' sidecars (deleted here) and computed for the rest (the
    index rank 0 just wrote, and any file a plain writer left unrecorded)."""
    sums: dict[str, str] = {}
    for sidecar in sorted(folder.glob(f"*{SIDECAR}")):
        sums.update(json.loads(sidecar.read_text()))
        sidecar.unlink()
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in sums and path.name not in skip:
            sums[path.name] = file_checksum(path)
    return dict(sorted(sums.items()))


def check_checksums(path: Path, meta: dict, instead: Callable[[], str]) -> None:
    """Every file recorded in meta.json's "checksums" has that checksum now; instead() ends
    the error (which earlier checkpoint to use: only looked for when something is wrong)."""
    sums = meta.get("checksums")
    if sums is None:  # written before gpt3d recorded checksums: nothing to compare
        return
    unrecorded = sorted(set(meta["files"]) - set(sums))
    if unrecorded:
        raise CorruptCheckpointError(
            f"checkpoint {path}: meta.json has no checksum for {unrecorded}; {instead()}"
        )
    for name, want in sums.items():
        got = file_checksum(path / name) if (path / name).is_file() else "missing"
        if got != want:
            raise CorruptCheckpointError(
                f"checkpoint {path} is damaged: {name} has checksum {got}, {want} was "
                f"written; {instead()}"
            )


def meta_checksum(meta: dict) -> str:
    """crc32 of meta.json's own content (every key but this one), canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    return f"crc32:{zlib.crc32(json.dumps(body, sort_keys=True).encode()):08x}"


# ---------------------------------------------------------------- dataset identity


def dataset_fingerprint(data_dir: str | os.PathLike) -> dict:
    """What identifies a prepared dataset, cheaply at any size: a hash of its meta.json
    (canonical JSON; None without one) and, per token file of every split, its size and a
    hash of FINGERPRINT_REGIONS evenly spaced REGION_BYTES regions (first and last included)."""
    data_dir = Path(data_dir)
    meta_file = data_dir / DATASET_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
    meta_hash = None if meta is None else _sha256(json.dumps(meta, sort_keys=True).encode())
    files = {}
    for split in SPLITS:
        for path in token_files(data_dir, split):
            name = path.relative_to(data_dir).as_posix()
            files[name] = {"bytes": path.stat().st_size, "sampled_sha256": _sampled_hash(path)}
    return {"meta_sha256": meta_hash, "files": files}


def _sampled_hash(path: Path) -> str:
    size, h = path.stat().st_size, hashlib.sha256()
    last = max(0, size - REGION_BYTES)
    offsets = sorted({last * i // (FINGERPRINT_REGIONS - 1) for i in range(FINGERPRINT_REGIONS)})
    with open(path, "rb") as f:
        for offset in offsets:
            f.seek(offset)
            h.update(offset.to_bytes(8, "little") + f.read(REGION_BYTES))
    return h.hexdigest()[:32]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def dataset_differences(saved: dict, now: dict) -> list[str]:
    """How the dataset now differs from the one a checkpoint recorded; [] = the same."""
    diffs = []
    if saved.get("meta_sha256") != now["meta_sha256"]:
        diffs.append(f"its {DATASET_META} differs")
    before, after = saved.get("files", {}), now["files"]
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old is None or new is None:
            diffs.append(f"{name} is {'new' if old is None else 'gone'}")
        elif old["bytes"] != new["bytes"]:
            diffs.append(f"{name} has {new['bytes']:,} bytes (checkpoint: {old['bytes']:,})")
        elif old["sampled_sha256"] != new["sampled_sha256"]:
            diffs.append(f"{name} has other contents (sampled regions differ)")
    return diffs


# ---------------------------------------------------------------- disk space


class DiskFullError(CheckpointError):
    """No room for a checkpoint: the save stopped, the previous checkpoint is the latest."""


def state_bytes(state) -> tuple[int, int]:
    """(bytes of this rank's tensor data in a nested state dict, number of entries): every
    leaf is one DCP entry, a tensor or a torch.save'd value (the optimizer's lr, betas...)."""
    if isinstance(state, dict):
        sums = [state_bytes(v) for v in state.values()]
        return sum(s[0] for s in sums), sum(s[1] for s in sums)
    if isinstance(state, torch.Tensor):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size(), 1
    return 0, 1


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system that holds `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_room(root: Path, state: dict, step: int, latest: str) -> int:
    """Collective: the bytes checkpoint `step` needs (every rank's tensors plus framing per entry)
    against rank 0's free space; DiskFullError on every rank, before anything is written,
    when it does not fit. Returns the bytes needed."""
    size, count = state_bytes(state)
    rank = dist.get_rank() if dist.is_initialized() else 0
    free = free_bytes(root) if rank == 0 else 0
    if dist.is_initialized():
        gpu = dist.get_backend() == "nccl"
        device = f"cuda:{torch.cuda.current_device()}" if gpu else "cpu"
        totals = torch.tensor([size + count * ENTRY_OVERHEAD, free], device=device)
        dist.all_reduce(totals)  # every rank: the whole checkpoint's size, rank 0's free space
        need, free = (int(v) for v in totals.tolist())
    else:
        need = size + count * ENTRY_OVERHEAD
    if need > free:
        error = DiskFullError(
            f"no room for checkpoint step-{step}: it needs {_mb(need)}, {root} has "
            f"{_mb(free)} free; nothing was written and {latest} stays the latest checkpoint. "
            "Free space (or lower checkpoint.keep_last) or move job.output_dir, then resume"
        )
        error.same_on_every_rank = True  # one all-reduced decision: gpt3d.launch prints once
        raise error
    return need


def disk_full_error(
    exc: BaseException, step: int, need: int, root: Path, latest: str
) -> DiskFullError | None:
    """The clear error for a save that failed because the disk filled up, else None."""
    cause = disk_full_cause(exc)
    if cause is None:
        return None
    return DiskFullError(
        f"disk full while writing checkpoint step-{step} ({cause.strerror}): it needs "
        f"{_mb(need)}, {root} has {_mb(free_bytes(root))} free now; the half-written "
        f"step-{step}.tmp was removed and {latest} stays the latest checkpoint. Free space "
        "(or lower checkpoint.keep_last) or move job.output_dir, then resume"
    )


def disk_full_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind a failed save (DCP wraps each rank's failure in a
    CheckpointException), or None."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [e.__cause__, e.__context__]
    return None


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"
