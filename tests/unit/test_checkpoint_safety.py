"""gpt3d.checkpoint_safety: crafted checkpoints are refused without running anything (the
same payloads do run under plain pickle), garbage is a clear error, and real checkpoints
(plain tensors, bytes entries, async_save, DTensor FSDP2 x TP) read bitwise as DCP's own
reader reads them, through an allow-list that covers every global they contain.

Run as a script under torchrun, this file is the 4-rank worker of the DTensor test.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import os
import pickle
import random
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from gpt3d.checkpoint_safety import (
    ALLOWED_GLOBALS,
    CorruptCheckpointError,
    SafeFileSystemReader,
    UnsafeCheckpointError,
    file_checksum,
    read_dcp_metadata,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


# ---------------------------------------------------------------- helpers


class Reduce:
    """Pickles as fn(*args): the shape of every pickle gadget."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def recorded_globals(path: Path) -> set[tuple[str, str]]:
    """Every (module, name) plain pickle asks for while reading a checkpoint we wrote."""
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    with open(path / ".metadata", "rb") as f:
        Recorder(f).load()
    return seen


def plain_metadata(path: Path):
    with open(path / ".metadata", "rb") as f:
        return pickle.load(f)  # a checkpoint this test wrote itself


def same(a, b) -> bool:
    """Bitwise for tensors (dtype, shape, bytes), == for anything else, nested."""
    if isinstance(a, torch.Tensor):
        flat = lambda t: t.detach().reshape(-1).contiguous().view(torch.uint8)  # noqa: E731
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(flat(a), flat(b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def blank(state):
    """A load request shaped like `state`: zeroed tensors, a placeholder for other values."""
    if isinstance(state, dict):
        return {k: blank(v) for k, v in state.items()}
    return torch.zeros_like(state) if isinstance(state, torch.Tensor) else 0


def load_both_ways(state, path, **kw):
    """(what DCP's FileSystemReader loads, what SafeFileSystemReader loads) into `state`."""
    plain, safe = blank(state), blank(state)
    dcp.load(plain, storage_reader=dcp.FileSystemReader(path), **kw)
    dcp.load(safe, storage_reader=SafeFileSystemReader(path), **kw)
    return plain, safe


def trained(model: nn.Module) -> dict:
    """{model, optim, rng} after one AdamW step, as gpt3d's Checkpointer builds it."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt, options=OPTIONS)
    return {"model": msd, "optim": osd, "rng": {"cpu": torch.get_rng_state()}}


# ---------------------------------------------------------------- crafted files


def _getattr_chain(marker: Path) -> bytes:  # getattr(__import__("os"), "system")(cmd)
    return (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
        + f"touch {marker}".encode()
        + b"\ntR."
    )


def _dotted_walk(marker: Path) -> bytes:  # protocol 4 resolves dotted names attribute by attribute
    name = b"torch.distributed.checkpoint.metadata\nos.system\n"
    return b"\x80\x04c" + name + b"(V" + f"touch {marker}".encode() + b"\ntR."


def _nested_in_real_index(marker: Path, real: Path) -> bytes:
    index = plain_metadata(real)
    index.storage_meta.save_id = Reduce(os.system, f"touch {marker}")
    return pickle.dumps(index)


def _torch_load_inside(marker: Path) -> bytes:  # torch.load(..., weights_only=False)(payload)
    inner = io.BytesIO()
    torch.save(Reduce(os.system, f"touch {marker}"), inner)
    full_load = functools.partial(torch.load, weights_only=False)
    return pickle.dumps(Reduce(full_load, io.BytesIO(inner.getvalue())))


GADGETS = {  # name -> (payload for a marker path, the global the error must name)
    "os.system": (lambda m, r: pickle.dumps(Reduce(os.system, f"touch {m}")), "posix.system"),
    "subprocess": (lambda m, r: pickle.dumps(Reduce(subprocess.call, ["touch", m])), "subprocess"),
    "eval": (lambda m, r: pickle.dumps(Reduce(eval, f"open({str(m)!r}, 'w')")), "builtins.eval"),
    "exec": (lambda m, r: pickle.dumps(Reduce(exec, f"open({str(m)!r}, 'w')")), "builtins.exec"),
    "pathlib": (lambda m, r: pickle.dumps(Reduce(Path.touch, m)), "pathlib.Path.touch"),
    "getattr chain": (lambda m, r: _getattr_chain(m), "builtins.getattr"),
    "dotted walk": (lambda m, r: _dotted_walk(m), "torch.distributed.checkpoint.metadata.os"),
    "nested in index": (_nested_in_real_index, "posix.system"),
    "torch.load inside": (lambda m, r: _torch_load_inside(m), "functools.partial"),
}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A genuine single-process checkpoint: model + AdamW state + RNG, tensors of several
    dtypes and shapes, and non-tensor values DCP stores as bytes entries."""
    torch.manual_seed(0)
    state = trained(nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)))
    dtypes = (
        torch.bfloat16,
        torch.float16,
        torch.float64,
        torch.int64,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
    )
    state["tensors"] = {str(d): torch.randn(5).to(d) for d in dtypes}
    state["shapes"] = {
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "strided": torch.randn(4, 6).t(),
    }
    state["extra"] = {
        "step": 7,
        "lr": 1.5e-3,
        "name": "x",
        "list": [1, 2],
        "tuple": (1, "a"),
        "none": None,
        "set": {3, 4},
        "raw": b"\x00\x01",
        "nested": {"a": {"b": 2}},
        "py_rng": random.Random(0).getstate(),
        "ordered": collections.OrderedDict(b=1, a=2),
    }
    root = tmp_path_factory.mktemp("real")
    dcp.save(state, checkpoint_id=str(root / "sync"), no_dist=True)
    dcp.async_save(state, checkpoint_id=root / "async", no_dist=True).result()
    writer = dcp.FileSystemWriter(root / "per-item", single_file_per_rank=False)
    dcp.save(state, storage_writer=writer, no_dist=True)
    return state, root


@pytest.mark.parametrize("gadget", GADGETS)
def test_crafted_index_is_refused_and_runs_nothing(gadget, real, tmp_path):
    make, refused = GADGETS[gadget]
    marker, ckpt = tmp_path / "marker", tmp_path / "ckpt"
    ckpt.mkdir()
    payload = make(marker, real[1] / "sync")
    for name in (".metadata", "__0.metadata"):  # DCP retries a rank's own index on failure
        (ckpt / name).write_bytes(payload)
    with pytest.raises(UnsafeCheckpointError, match=f"refers to {refused}.*refusing to load it"):
        read_dcp_metadata(ckpt)
    with pytest.raises(BaseException, match=f"refers to {refused}"):  # CheckpointException
        dcp.load({"w": torch.zeros(2)}, storage_reader=SafeFileSystemReader(ckpt), no_dist=True)
    assert not marker.exists()
    with contextlib.suppress(Exception):  # control: the payload is live under plain pickle
        pickle.loads(payload)
    assert marker.exists()


def test_clean_index_with_code_in_a_bytes_entry_is_refused(tmp_path):
    """DCP reads every bytes entry with torch.load(weights_only=False), and a clean index can
    declare any requested key a bytes entry: the safe reader loads it weights-only."""
    marker, ckpt = tmp_path / "marker", tmp_path / "ckpt"
    dcp.save(
        {"model": {"w": Reduce(os.system, f"touch {marker}")}}, checkpoint_id=ckpt, no_dist=True
    )
    read_dcp_metadata(ckpt)  # the index itself is plain data
    request = {"model": {"w": torch.zeros(3)}}
    with pytest.raises(BaseException, match="not plain data.*posix.system"):
        dcp.load(request, storage_reader=SafeFileSystemReader(ckpt), no_dist=True)
    assert not marker.exists() and torch.equal(request["model"]["w"], torch.zeros(3))


def _truncated(real: Path) -> bytes:
    data = (real / ".metadata").read_bytes()
    return data[: len(data) // 2]


def _escaping(real: Path, where: str) -> bytes:
    index = plain_metadata(real)
    info = next(iter(index.storage_data.values()))
    info.relative_path = where
    return pickle.dumps(index)


DAMAGED = {
    "empty": (lambda r: b"", "unreadable"),
    "truncated": (_truncated, "unreadable"),
    "random bytes": (lambda r: random.Random(0).randbytes(4096), "unreadable"),
    "json": (lambda r: b'{"step": 3}', "unreadable"),
    "a plain dict": (lambda r: pickle.dumps({"a": 1}), "not a DCP index .it holds a dict"),
    "parent path": (lambda r: _escaping(r, "../secret.distcp"), "stored at '../secret.distcp'"),
    "absolute path": (lambda r: _escaping(r, "/etc/passwd"), "stored at '/etc/passwd'"),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_index_is_a_clear_error(damage, real, tmp_path):
    make, match = DAMAGED[damage]
    (tmp_path / ".metadata").write_bytes(make(real[1] / "sync"))
    with pytest.raises(CorruptCheckpointError, match=match):
        read_dcp_metadata(tmp_path)


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(CorruptCheckpointError, match="has no readable DCP index .metadata"):
        read_dcp_metadata(tmp_path)


# ---------------------------------------------------------------- genuine checkpoints


def reads_exactly_as_dcp(path: Path) -> None:
    """A gpt3d checkpoint of any layout: verify() passes (sizes, every crc32, the index), the
    allow-list covers every global its index asks for, and every entry (tensors and the bytes
    entries of optimizer hyper-parameters) loads bitwise as DCP's own reader loads it.
    tests/distributed/test_checkpoint.py runs it on checkpoints of every layout."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from gpt3d.checkpoint_dir import verify

    verify(path)
    assert recorded_globals(path) <= ALLOWED_GLOBALS.keys()
    index = read_dcp_metadata(path)
    assert index == plain_metadata(path)
    request = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        if isinstance(m, TensorStorageMetadata)
        else None
        for k, m in index.state_dict_metadata.items()
    }
    plain, safe = load_both_ways(request, path, no_dist=True)
    assert same(safe, plain)


@pytest.mark.parametrize("kind", ["sync", "async", "per-item"])
def test_real_checkpoint_reads_as_dcp_reads_it(kind, real):
    state, root = real
    path = root / kind
    assert recorded_globals(path) <= ALLOWED_GLOBALS.keys()
    assert read_dcp_metadata(path) == plain_metadata(path)
    plain, safe = load_both_ways(state, path, no_dist=True)
    assert same(safe, plain) and same(safe, state)
    assert safe["extra"]["py_rng"] == random.Random(0).getstate()


@pytest.mark.slow
@pytest.mark.distributed
def test_dtensor_fsdp_tp_checkpoint_reads_as_dcp_reads_it(tmp_path):
    """4 ranks, FSDP2 over dp=2 x TP over tp=2 (_StridedShard placements): each rank loads
    its shards both ways (worker below); here one process reads full tensors both ways."""
    from tests.helpers import REPO, TORCHRUN, env

    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=4", __file__, str(tmp_path)]
    t0 = time.perf_counter()
    run = subprocess.run(
        cmd, cwd=REPO, env=env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("worker ok") == 4, run.stdout
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    for kind in ("sync", "async"):
        path = tmp_path / kind
        assert recorded_globals(path) <= ALLOWED_GLOBALS.keys()
        assert read_dcp_metadata(path) == plain_metadata(path)
        plain, safe = load_both_ways({"model": full}, path, no_dist=True)
        assert same(safe, plain) and same(safe["model"], full)
    print(f"4-rank worker: {time.perf_counter() - t0:.1f}s")


def _worker(out: Path) -> None:
    """torchrun rank: save {model, optim, rng} sync and async, reload each both ways."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
        parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        return fully_shard(model, mesh=mesh["dp"])

    state = trained(build())
    state["rng"] = {f"rank{dist.get_rank()}": state["rng"]["cpu"]}
    kinds = [type(p).__name__ for p in state["model"]["0.weight"].placements]
    assert kinds == ["_StridedShard", "Shard"], kinds  # FSDP2 dim 0 over TP's dim 0
    full = {k: v.full_tensor() for k, v in state["model"].items()}
    if dist.get_rank() == 0:
        torch.save(full, out / "full.pt")
    dcp.save(state, checkpoint_id=out / "sync")
    dcp.async_save(state, checkpoint_id=out / "async").result()
    local = lambda sd: {k: getattr(v, "_local_tensor", v) for k, v in sd.items()}  # noqa: E731
    for kind in ("sync", "async"):
        plain, safe = load_both_ways(state, out / kind)  # into zeroed DTensors, same layout
        for part in ("model", "optim", "rng"):
            assert same(local(safe[part]), local(plain[part])), (kind, part)
            assert same(local(safe[part]), local(state[part])), (kind, part)
    dist.barrier()
    print(f"rank {dist.get_rank()} worker ok", flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------- checksum


def test_file_checksum_is_crc32_of_the_bytes(tmp_path):
    import zlib

    data = random.Random(1).randbytes((8 << 20) + 12345)  # crosses a chunk boundary
    (tmp_path / "f").write_bytes(data)
    assert file_checksum(tmp_path / "f") == f"crc32:{zlib.crc32(data):08x}"
    (tmp_path / "e").write_bytes(b"")
    assert file_checksum(tmp_path / "e") == "crc32:00000000"


# ---------------------------------------------------------------- every read path, for real


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A gpt3d checkpoint (2 steps, one process) and its dataset."""
    from tests.helpers import make_dataset, small_run, trainer_with_checkpointer

    root = tmp_path_factory.mktemp("genuine")
    data = make_dataset(root / "data", n_train=4000, n_val=1000)
    args = [*small_run(steps=2), f"--data.dataset={data}", f"--job.output_dir={root / 'run'}"]
    trainer, ckpt = trainer_with_checkpointer(args)
    trainer.train_step(), trainer.train_step()
    ckpt.finish()
    return root / "run" / "checkpoints" / "step-2", data


def attacked(src: Path, dst: Path, files: dict[str, bytes], fix_checksums: bool = True) -> Path:
    """A copy of a checkpoint with files replaced, and meta.json rewritten as an attacker
    would (it is plain JSON): sizes, and unless told otherwise crc32s and its own checksum."""
    import json
    import shutil
    import zlib

    from gpt3d.integrity import meta_checksum

    shutil.copytree(src, dst)
    meta = json.loads((dst / "meta.json").read_text())
    for name, data in files.items():
        (dst / name).write_bytes(data)
        meta["files"][name] = len(data)
        if fix_checksums:
            meta["checksums"][name] = f"crc32:{zlib.crc32(data):08x}"
    meta["meta_checksum"] = meta_checksum(json.loads(json.dumps(meta)))
    (dst / "meta.json").write_text(json.dumps(meta))
    return dst


def payload_in_tensor(src: Path, marker: Path) -> dict[str, bytes]:
    """A clean index (only allowed classes) whose model.wte.weight entry points at a
    torch.save'd gadget appended to the data file: only weights_only stops it."""
    index = plain_metadata(src)
    key = next(k for k in index.storage_data if k.fqn == "model.wte.weight")
    info = index.storage_data[key]
    data = (src / info.relative_path).read_bytes()
    gadget = io.BytesIO()
    torch.save(Reduce(os.system, f"touch {marker}"), gadget)
    index.storage_data[key] = _StorageInfo(info.relative_path, len(data), len(gadget.getvalue()))
    return {".metadata": pickle.dumps(index), info.relative_path: data + gadget.getvalue()}


def read_path(which: str, ckpt: Path, data: Path, tmp: Path) -> tuple[str, list]:
    """(script, args) of one way gpt3d reads a checkpoint."""
    from tests.helpers import small_run

    if which == "export":
        return "recipes/export.py", ["--checkpoint", ckpt, "--out", tmp / "hf"]
    if which == "sample":
        return "recipes/sample.py", ["--checkpoint", ckpt, "--max_new_tokens", "2"]
    train = [*small_run(steps=4), f"--data.dataset={data}", f"--job.output_dir={tmp / 'out'}"]
    return "recipes/train.py", [
        *train,
        "--model.pad_vocab_multiple=1",
        f"--checkpoint.resume={ckpt}",
    ]


READ_PATHS = {  # name -> processes (0: plain python)
    "train": 0,
    "export": 0,
    "sample": 0,
    "train tp=2": 2,
}
ATTACKS = {  # name -> (files to plant, what the one error line says)
    "index gadget": (
        lambda src, m: {".metadata": pickle.dumps(Reduce(os.system, f"touch {m}"))},
        "refers to posix.system, which a DCP index never contains; refusing to load it",
    ),
    "tensor payload gadget": (
        payload_in_tensor,
        "holds a tensor payload that is not plain tensor data",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.distributed) if n else p for p, n in READ_PATHS.items()],
)
def test_every_read_path_refuses_code_in_a_checkpoint(genuine, tmp_path, path, attack):
    """resume (1 process and torchrun), export, sample: exit 2, one clear line, the payload
    never ran (its marker file is absent), even with meta.json rewritten to match."""
    from tests.helpers import run_script

    src, data = genuine
    marker = tmp_path / "marker"
    ckpt = attacked(src, tmp_path / "step-2", ATTACKS[attack][0](src, marker))
    script, args = read_path(path.split()[0], ckpt, data, tmp_path)
    args += (
        ["--parallel.tp=2", "--parallel.pp=1", "--parallel.dp_shard=1"] if READ_PATHS[path] else []
    )
    proc = run_script(script, args, nproc=READ_PATHS[path], timeout=180)
    if READ_PATHS[path]:
        assert "exitcode  : 2" in proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1 and ATTACKS[attack][1] in lines[0], proc.stderr[-3000:]
    # no worker traceback (torchrun prints its own ChildFailedError traceback)
    assert not [x for x in proc.stderr.splitlines() if "File" in x and "gpt3d" in x]
    assert not marker.exists()


@pytest.mark.slow
def test_an_attacker_who_forgets_the_checksum_is_caught_earlier(genuine, tmp_path):
    from tests.helpers import run_script

    src, _ = genuine
    marker = tmp_path / "marker"
    files = {".metadata": pickle.dumps(Reduce(os.system, f"touch {marker}"))}
    ckpt = attacked(src, tmp_path / "step-2", files, fix_checksums=False)
    proc = run_script("recipes/export.py", ["--checkpoint", ckpt, "--out", tmp_path / "hf"], 0)
    assert proc.returncode == 2 and "is damaged: .metadata has checksum" in proc.stderr
    assert not marker.exists()


def test_genuine_checkpoint_still_loads_bitwise(genuine):
    from gpt3d.checkpoint_dir import load_model_state_dict

    src, _ = genuine
    _, sd = load_model_state_dict(src)
    plain = {k: torch.zeros_like(v) for k, v in sd.items() if k != "lm_head.weight"}
    dcp.load({"model": plain}, storage_reader=dcp.FileSystemReader(src), no_dist=True)
    assert all(same(sd[k], plain[k]) for k in plain)


# ---------------------------------------------------------------- malformed safetensors


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small GPT-2 in Hugging Face layout (gpt3d's own export) and a dataset for it."""
    from gpt3d.hf import save_hf
    from gpt3d.model import GPT, GPTConfig
    from tests.helpers import make_dataset

    root = tmp_path_factory.mktemp("hf")
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=512)
    torch.manual_seed(0)
    save_hf(root / "hf", GPT(cfg).state_dict(), cfg)
    return root / "hf", make_dataset(root / "data", n_train=4000, n_val=1000)


def _split(raw: bytes) -> tuple[dict, bytes]:
    import json
    import struct

    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    import json
    import struct

    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def _edit_header(raw: bytes, key: str, **fields) -> bytes:
    header, body = _split(raw)
    header[key] = header[key] | fields
    return _join(header, body)


MALFORMED = {  # name -> (damage to model.safetensors, what the error says)
    "truncated": (lambda raw: raw[:-100], "incomplete metadata, file not fully covered"),
    "header longer than the file": (
        lambda raw: len(raw).to_bytes(8, "little") + raw[8:],
        "invalid header length",
    ),
    "offsets past the end": (
        lambda raw: _edit_header(raw, "transformer.wpe.weight", data_offsets=[0, 10**9]),
        "invalid offset for tensor `transformer.wpe.weight`",
    ),
    "integer weights": (
        lambda raw: _edit_header(raw, "transformer.h.0.ln_1.weight", dtype="I32"),
        "tensor 'transformer.h.0.ln_1.weight' has dtype I32; GPT-2 weights are floating point",
    ),
    "wrong shape": (
        lambda raw: _edit_header(raw, "transformer.h.0.ln_1.weight", shape=[16, 2]),
        "key 'h.0.ln_1.weight': expected (32,), found (16, 2)",
    ),
    "garbage header": (
        lambda raw: raw[:8] + b"x" * (len(raw) - 8 - len(_split(raw)[1])) + _split(raw)[1],
        "invalid JSON in header",
    ),
}


@pytest.mark.parametrize("damage", MALFORMED)
def test_malformed_safetensors_is_one_clear_error(hf_dir, tmp_path, damage):
    import shutil

    from gpt3d.config import load_config
    from gpt3d.errors import CheckpointError
    from gpt3d.preflight import preflight
    from tests.helpers import small_run

    src, data = hf_dir
    bad = tmp_path / "hf"
    shutil.copytree(src, bad)
    make, says = MALFORMED[damage]
    (bad / "model.safetensors").write_bytes(make((src / "model.safetensors").read_bytes()))
    args = [*small_run(steps=1), f"--data.dataset={data}", f"--checkpoint.init_from={bad}"]
    with pytest.raises(CheckpointError) as info:
        preflight(load_config(args), world_size=1)
    assert says in str(info.value)


@pytest.mark.slow
def test_malformed_safetensors_through_the_recipe_exits_2_without_a_traceback(hf_dir, tmp_path):
    import shutil

    from tests.helpers import run_script, small_run

    src, data = hf_dir
    bad = tmp_path / "hf"
    shutil.copytree(src, bad)
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:-100])
    args = [*small_run(steps=1), f"--data.dataset={data}", f"--checkpoint.init_from={bad}"]
    proc = run_script("recipes/train.py", [*args, f"--job.output_dir={tmp_path / 'out'}"], 0)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1, proc.stderr[-2000:]
    assert "is not a readable safetensors file" in proc.stderr and "Traceback" not in proc.stderr


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
