"""Reading a DCP checkpoint without executing it: the index through an allow-list unpickler,
non-tensor entries through torch.load(weights_only=True), and a content checksum.

torch.distributed.checkpoint trusts its files. FileSystemReader.read_metadata unpickles
.metadata with plain pickle.load, and DefaultLoadPlanner.load_bytes reads every non-tensor
("bytes") entry with torch.load(weights_only=False), so either file can run code on load:
a .metadata whose __reduce__ names os.system, or a clean index that declares a requested
key as bytes and points it at a pickled gadget in a .distcp file. Tensor payloads are
already read with torch.load(weights_only=True).

    read_dcp_metadata(path)              the checked index, for verification code
    with checkpoint_errors():            DCP's CheckpointException -> the CheckpointError inside
        dcp.load(sd, storage_reader=SafeFileSystemReader(path), ...)
    file_checksum(path)                  "crc32:<hex>" of a file's bytes, for meta.json

A DCP index is made of the few classes in ALLOWED_GLOBALS (found by recording every global
real checkpoints ask for: plain and DTensor FSDP2 x TP layouts, bytes entries, async_save);
anything else is refused before it is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pathlib
import pickle
import types
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import metadata as md
from torch.distributed.checkpoint.filesystem import _StorageInfo

from gpt3d.errors import CheckpointError

METADATA_FILE = ".metadata"
CHECKSUM_CHUNK = 8 << 20  # bytes read per step by file_checksum


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file asks to build something that is not checkpoint data."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, garbage, or not shaped like a DCP index."""


_LAYOUTS = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}


def _layout_named(name: str) -> torch.layout:
    """Stands in for torch.serialization._get_layout, which pickles torch.strided as
    _get_layout("torch.strided"): a name -> layout lookup and nothing else."""
    if not isinstance(name, str) or name not in _LAYOUTS:
        raise CorruptCheckpointError(f"unknown tensor layout {name!r}")
    return _LAYOUTS[name]


_META = "torch.distributed.checkpoint.metadata"
# (module, name) -> the object it resolves to; nothing is imported by name at load time.
ALLOWED_GLOBALS = types.MappingProxyType(
    {
        (_META, "Metadata"): md.Metadata,
        (_META, "TensorStorageMetadata"): md.TensorStorageMetadata,
        (_META, "BytesStorageMetadata"): md.BytesStorageMetadata,
        (_META, "ChunkStorageMetadata"): md.ChunkStorageMetadata,
        (_META, "TensorProperties"): md.TensorProperties,
        (_META, "_MEM_FORMAT_ENCODING"): md._MEM_FORMAT_ENCODING,  # TensorProperties state
        (_META, "MetadataIndex"): md.MetadataIndex,  # storage_data keys
        (_META, "StorageMeta"): md.StorageMeta,
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
        ("torch", "Size"): torch.Size,  # shapes, chunk offsets and sizes
        ("torch.serialization", "_get_layout"): _layout_named,  # TensorProperties.layout
        # StorageMeta.checkpoint_id: FileSystemWriter stores its path as a Path object
        # (Python 3.13 names the class's module pathlib._local).
        ("pathlib", "PosixPath"): pathlib.PosixPath,
        ("pathlib._local", "PosixPath"): pathlib.PosixPath,
        # TensorProperties.dtype: a dtype pickles as its torch attribute, torch.float32.
        **{("torch", k): v for k, v in vars(torch).items() if isinstance(v, torch.dtype)},
    }
)


class MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that builds only ALLOWED_GLOBALS; `source` names the file in errors."""

    def __init__(self, file, *, source: str | os.PathLike):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        found = ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise UnsafeCheckpointError(
                f"checkpoint {self.source} refers to {module}.{name}, which a DCP index never "
                "contains; refusing to load it (the file may be malicious or from an "
                "incompatible torch)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            f"checkpoint {self.source} uses a persistent id, which a "
            "DCP index never contains; refusing to load it"
        )


def load_metadata(file, source: str | os.PathLike) -> md.Metadata:
    """Unpickle one DCP index from an open binary file and check its shape."""
    try:
        index = MetadataUnpickler(file, source=source).load()
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except Exception as e:  # noqa: BLE001 - garbage makes the unpickler raise anything
        raise CorruptCheckpointError(
            f"checkpoint {source} is unreadable ({e!r}); it is truncated or not a DCP index"
        ) from None
    _check_index(index, source)
    return index


def read_dcp_metadata(path: str | os.PathLike) -> md.Metadata:
    """The DCP index of the checkpoint directory `path` (its .metadata file), read without
    executing anything; UnsafeCheckpointError / CorruptCheckpointError otherwise (both
    gpt3d.errors.CheckpointError)."""
    file = Path(path) / METADATA_FILE
    try:
        with open(file, "rb") as f:
            return load_metadata(f, file)
    except OSError as e:
        raise CorruptCheckpointError(
            f"checkpoint {path} has no readable DCP index {METADATA_FILE} ({e.strerror})"
        ) from None


def _check_index(index: Any, source) -> None:
    """Only allowed classes were built; check they sit where DCP puts them, and that every
    data file named is a plain file name inside the checkpoint directory."""
    if not isinstance(index, md.Metadata) or not isinstance(index.state_dict_metadata, dict):
        raise CorruptCheckpointError(
            f"checkpoint {source} is not a DCP index (it holds a {type(index).__name__})"
        )
    for key, entry in index.state_dict_metadata.items():
        if not isinstance(key, str) or not isinstance(entry, md.STORAGE_TYPES):
            kind = type(entry).__name__
            raise CorruptCheckpointError(
                f"checkpoint {source}: entry {key!r} is a {kind}, not tensor or bytes metadata"
            )
    if not isinstance(index.storage_data, dict):
        raise CorruptCheckpointError(
            f"checkpoint {source}: no storage table (a {type(index.storage_data).__name__})"
        )
    for key, info in index.storage_data.items():
        name = getattr(info, "relative_path", None)
        if not (
            isinstance(info, _StorageInfo)
            and _is_plain_name(name)
            and _is_count(info.offset)
            and _is_count(info.length)
            and _no_transforms(getattr(info, "transform_descriptors", None))
        ):
            raise CorruptCheckpointError(
                f"checkpoint {source}: {getattr(key, 'fqn', key)!r} is stored at {name!r} "
                f"({info!r}); DCP data files are plain names inside the checkpoint directory"
            )


def _is_plain_name(name: Any) -> bool:
    return isinstance(name, str) and PurePosixPath(name).name == name and name not in ("", "..")


def _is_count(n: Any) -> bool:
    return type(n) is int and n >= 0


def _no_transforms(descriptors: Any) -> bool:
    """gpt3d writes no DCP storage extensions (compression...): the field is None or empty."""
    return descriptors is None or (isinstance(descriptors, list | tuple) and not descriptors)


# ---------------------------------------------------------------- dcp.load's reader


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader that never unpickles with plain pickle: the index (.metadata, or a
    rank's __<r>.metadata) goes through MetadataUnpickler, and each bytes entry through
    torch.load(weights_only=True) before the planner sees it. Tensors are read as before
    (FileSystemReader already uses weights_only=True for them)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> md.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            index = load_metadata(f, path)
        if getattr(index, "storage_meta", None) is None:
            index.storage_meta = md.StorageMeta()
        index.storage_meta.load_id = self.load_id
        return index

    def read_data(self, plan, planner):
        """One data file at a time, so a payload torch refuses is reported by file name."""
        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        safe_planner = _WeightsOnlyBytes(planner, self.path)
        for name, items in by_file.items():
            try:  # tensors: FileSystemReader's torch.load(weights_only=True)
                super().read_data(dataclasses.replace(plan, items=items), safe_planner).wait()
            except pickle.UnpicklingError as e:
                raise UnsafeCheckpointError(
                    f"checkpoint {Path(self.path) / name} holds a tensor payload that is not "
                    f"plain tensor data ({_first_global(e)}); refusing to load it (the file "
                    "may be malicious)"
                ) from None
            except CheckpointError:
                raise
            except (RuntimeError, EOFError, ValueError, AssertionError) as e:  # damaged record
                raise CorruptCheckpointError(
                    f"checkpoint {Path(self.path) / name} has unreadable tensor data "
                    f"({type(e).__name__}: {str(e)[:200]})"
                ) from None
        future = torch.futures.Future()
        future.set_result(None)
        return future


class _WeightsOnlyBytes:
    """A LoadPlanner seen through a filter: load_bytes gets a weights-only copy of each
    bytes entry; everything else is the planner's own."""

    def __init__(self, planner, source):
        self._planner, self._source = planner, source

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        self._planner.load_bytes(read_item, weights_only_copy(value, self._where(read_item)))

    def _where(self, read_item) -> str:
        return f"{self._source} (entry {read_item.storage_index.fqn!r})"


def weights_only_copy(value: io.BytesIO, source: str) -> io.BytesIO:
    """torch.save bytes -> the same object re-saved by us, after torch.load(weights_only=True)
    accepted it: what the planner's torch.load(weights_only=False) then reads is data we
    wrote, never the file's own pickle."""
    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refusals are UnpicklingError
        raise UnsafeCheckpointError(
            f"checkpoint {source} holds a non-tensor value that is "
            f"not plain data ({_first_global(e)}); refusing to load it (the "
            "file may be malicious)"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated zip / pickle data
        raise CorruptCheckpointError(
            f"checkpoint {source}: unreadable non-tensor value ({e!r})"
        ) from None
    clean = io.BytesIO()
    torch.save(obj, clean)
    clean.seek(0)
    return clean


def _first_global(e: Exception) -> str:
    """The line of a weights_only refusal that names the global it refused."""
    lines = [line for line in str(e).splitlines() if "GLOBAL" in line or "global" in line]
    return (lines or [str(e)])[0][:300]


@contextlib.contextmanager
def checkpoint_errors():
    """Around dcp.load: DCP reports a failure on any rank as a CheckpointException (a
    BaseException listing every rank's error); when one of them is a gpt3d CheckpointError
    (a refused or damaged file), raise that instead, so it is one clear user error. DCP
    gathers every rank's failures before raising, so every rank raises the same one."""
    from torch.distributed.checkpoint import CheckpointException

    try:
        yield
    except CheckpointException as e:
        for _, (exc, _trace) in sorted(e.failures.items()):
            if isinstance(exc, CheckpointError):
                exc.same_on_every_rank = True  # gpt3d.launch prints it once (rank 0)
                raise exc from None
        raise


# ---------------------------------------------------------------- content checksum


def file_checksum(path: str | os.PathLike) -> str:
    """'crc32:<8 hex digits>' of the file's bytes, streamed in 8 MiB reads. Catches damage
    (truncation, bit rot, a partial copy); it is no signature: whoever can rewrite the file
    can rewrite meta.json too."""
    crc, buf = 0, bytearray(CHECKSUM_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"crc32:{crc:08x}"
