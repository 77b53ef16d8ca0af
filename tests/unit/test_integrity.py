"""gpt3d.integrity on real checkpoints: every file's crc32 is recorded while writing and
checked before use (a flipped byte is one error naming the file and the previous good
checkpoint, on resume and on export), meta.json checks itself, a checkpoint knows its
dataset, and a full disk stops the run cleanly with the previous checkpoint still the latest.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemWriter

from gpt3d.checkpoint_dir import latest_complete, verify
from gpt3d.checkpoint_safety import CorruptCheckpointError
from gpt3d.config import load_config
from gpt3d.errors import DataError
from gpt3d.integrity import (
    FINGERPRINT_REGIONS,
    REGION_BYTES,
    SIDECAR,
    DiskFullError,
    dataset_differences,
    dataset_fingerprint,
    meta_checksum,
)
from gpt3d.preflight import preflight
from tests.helpers import (
    REPO,
    copy_dataset,
    env,
    make_dataset,
    run_script,
    small_run,
    trainer_with_checkpointer,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
SMALL = small_run(steps=6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4000, n_val=1000)


def train(data, out, until=6, *args):
    """A one-process run to step `until`, checkpoints every 2 steps (in this process)."""
    trainer, ckpt = trainer_with_checkpointer(
        [*SMALL, f"--data.dataset={data}", f"--job.output_dir={out}", "--checkpoint.interval=2"]
        + list(args)
    )
    losses = []
    while trainer.step < until:
        losses.append(trainer.train_step().loss)
        ckpt.maybe_save()
    ckpt.wait()
    return trainer, ckpt, losses


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """step-2, step-4, step-6 of one run (keep_last 3)."""
    out = tmp_path_factory.mktemp("run")
    train(data, out)
    return out / "checkpoints"


def copy_run(saved, tmp_path) -> Path:
    root = tmp_path / "run" / "checkpoints"
    shutil.copytree(saved, root)
    return root


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def tensor_offset(ckpt: Path, fqn: str) -> tuple[str, int]:
    """(data file, a byte in the middle of that tensor's record): from our own index."""
    with open(ckpt / ".metadata", "rb") as f:
        index = pickle.load(f)  # a checkpoint this test wrote itself
    info = next(v for k, v in index.storage_data.items() if k.fqn == fqn)
    return info.relative_path, info.offset + info.length // 2


# ---------------------------------------------------------------- checksums


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_every_file_has_its_crc32_in_meta_json(data, tmp_path, mode):
    train(data, tmp_path, 4, f"--checkpoint.async_save={mode == 'async'}")
    for step in ("step-2", "step-4"):
        ckpt = tmp_path / "checkpoints" / step
        meta = json.loads((ckpt / "meta.json").read_text())
        on_disk = {p.name for p in ckpt.iterdir()} - {"meta.json"}
        assert set(meta["checksums"]) == set(meta["files"]) == on_disk  # no sidecar left
        assert not list(ckpt.glob(f"*{SIDECAR}"))
        for name, crc in meta["checksums"].items():  # recomputed here, with zlib directly
            assert crc == f"crc32:{zlib.crc32((ckpt / name).read_bytes()):08x}", name
        assert meta["meta_checksum"] == meta_checksum(meta)


def test_flipped_byte_names_the_file_and_the_previous_good_checkpoint(saved, tmp_path):
    root = copy_run(saved, tmp_path)
    name, offset = tensor_offset(root / "step-6", "model.wte.weight")
    flip_byte(root / "step-6" / name, offset)
    with pytest.raises(CorruptCheckpointError) as info:
        verify(root / "step-6")
    message = str(info.value)
    assert f"step-6 is damaged: {name} has checksum crc32:" in message
    assert f"the previous good checkpoint is {root / 'step-4'}" in message
    flip_byte(root / "step-4" / ".metadata", 100)  # step-4 bad too: the next older one
    with pytest.raises(CorruptCheckpointError, match=f"good checkpoint is {root / 'step-2'}"):
        verify(root / "step-6")
    verify(root / "step-6", checksums=False)  # the skip option reads past the damage


def test_meta_json_checks_itself(saved, tmp_path):
    root = copy_run(saved, tmp_path)
    meta_file = root / "step-4" / "meta.json"
    text = meta_file.read_text()
    assert '"samples_consumed": 16' in text
    meta_file.write_text(text.replace('"samples_consumed": 16', '"samples_consumed": 17'))
    with pytest.raises(CorruptCheckpointError, match="does not match its own checksum"):
        verify(root / "step-4")


@pytest.mark.slow
def test_recipes_refuse_a_flipped_byte_unless_told_to_skip(saved, data, tmp_path):
    """Resume (train.py) and export.py: exit 2, one line naming file and fallback."""
    root = copy_run(saved, tmp_path)
    name, offset = tensor_offset(root / "step-6", "model.wte.weight")
    flip_byte(root / "step-6" / name, offset)
    out = tmp_path / "run"
    resume = [*SMALL, f"--data.dataset={data}", f"--job.output_dir={out}"]
    resume += ["--model.pad_vocab_multiple=1"]  # train.py's default config pads to 64
    runs = {
        "train": ("recipes/train.py", [*resume, "--checkpoint.resume=auto"]),
        "export": (
            "recipes/export.py",
            ["--checkpoint", "auto", "--output_dir", out, "--out", tmp_path / "hf"],
        ),
    }
    for what, (script, args) in runs.items():
        proc = run_script(script, args, nproc=0, timeout=120)
        assert proc.returncode == 2, (what, proc.stderr[-2000:])
        lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"step-6 is damaged: {name} has checksum" in lines[0]
        assert f"the previous good checkpoint is {root / 'step-4'}" in lines[0]
    skip = [*resume, "--checkpoint.resume=auto", "--checkpoint.verify_checksums=false"]
    proc = run_script("recipes/train.py", [*skip, "--training.steps=7"], nproc=0, timeout=120)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------- dataset identity


def test_dataset_fingerprint_is_content_not_path(data, tmp_path):
    same = copy_dataset(data, tmp_path / "copy")
    assert dataset_differences(dataset_fingerprint(data), dataset_fingerprint(same)) == []
    edited = copy_dataset(data, tmp_path / "edited")
    tokens = bytearray((edited / "train.bin").read_bytes())
    tokens[1000] ^= 1
    (edited / "train.bin").write_bytes(bytes(tokens))
    (edited / "val.bin").write_bytes((edited / "val.bin").read_bytes()[:-200])
    meta = json.loads((edited / "meta.json").read_text())
    (edited / "meta.json").write_text(json.dumps(meta | {"val_tokens": 900}))
    diffs = dataset_differences(dataset_fingerprint(data), dataset_fingerprint(edited))
    assert diffs == [
        "its meta.json differs",
        "train.bin has other contents (sampled regions differ)",
        "val.bin has 1,800 bytes (checkpoint: 2,000)",
    ]


def test_fingerprint_reads_sampled_regions_only(tmp_path):
    """A big token file costs FINGERPRINT_REGIONS x REGION_BYTES of reading; a change in a
    sampled region (here: the last byte) is seen, the size always is."""
    big = make_dataset(tmp_path / "big", n_train=4_000_000, n_val=1000)
    before = dataset_fingerprint(big)
    with open(big / "train.bin", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert dataset_differences(before, dataset_fingerprint(big)) == [
        "train.bin has other contents (sampled regions differ)"
    ]
    assert FINGERPRINT_REGIONS * REGION_BYTES <= 1 << 17


def test_resume_on_another_dataset_is_refused_unless_allowed(saved, data, tmp_path):
    other = make_dataset(tmp_path / "other", n_train=5000, n_val=1000)
    args = [*SMALL, f"--data.dataset={other}", f"--checkpoint.resume={saved / 'step-6'}"]
    with pytest.raises(DataError) as info:
        preflight(load_config(args), world_size=1)
    message = str(info.value)
    assert "was trained on another dataset than data.dataset=" in message
    assert "train.bin has 10,000 bytes (checkpoint: 8,000)" in message
    assert "--checkpoint.allow_dataset_change=true" in message
    allowed = preflight(load_config([*args, "--checkpoint.allow_dataset_change=true"]), 1)
    assert allowed.resume == saved / "step-6"
    copy = copy_dataset(data, tmp_path / "moved")  # same content elsewhere: fine
    moved = [*SMALL, f"--data.dataset={copy}", f"--checkpoint.resume={saved / 'step-6'}"]
    assert preflight(load_config(moved), world_size=1).resume == saved / "step-6"


# ---------------------------------------------------------------- disk full


def snapshot(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def no_space_at_step(monkeypatch, step: int) -> None:
    """A writer that fills the disk: it writes, then fails as the kernel would."""
    write_data = FileSystemWriter.write_data

    def write_then_enospc(self, plan, planner):
        future = write_data(self, plan, planner)
        if Path(self.path).name == f"step-{step}.tmp":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return future

    monkeypatch.setattr(FileSystemWriter, "write_data", write_then_enospc)


def test_space_estimate_is_a_safe_upper_bound(data, tmp_path):
    """What a save checks against the free space: never less than it then writes (else the
    disk could fill mid-write), and not much more (else it refuses saves that fit)."""
    _, ckpt, _ = train(data, tmp_path, 2)
    written = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / "step-2").iterdir())
    print(f"estimated {ckpt.need} bytes, wrote {written}")
    assert written <= ckpt.need <= 1.3 * written


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_keeps_the_previous_checkpoint_and_says_what_it_needs(
    data, tmp_path, monkeypatch, mode
):
    trainer, ckpt, _ = train(data, tmp_path, 2, f"--checkpoint.async_save={mode == 'async'}")
    root = tmp_path / "checkpoints"
    before = snapshot(root / "step-2")
    no_space_at_step(monkeypatch, 4)
    with pytest.raises(DiskFullError) as info:
        while trainer.step < 6:
            trainer.train_step()
            ckpt.maybe_save()
        ckpt.wait()
    message = str(info.value)
    assert "disk full while writing checkpoint step-4 (No space left on device)" in message
    assert "it needs" in message and "MiB free now" in message
    assert "step-4.tmp was removed and step-2 stays the latest checkpoint" in message
    assert sorted(p.name for p in root.iterdir()) == ["step-2"]
    assert latest_complete(root).name == "step-2" and snapshot(root / "step-2") == before


UNSHARE = shutil.which("unshare")


def _can_mount_tmpfs() -> bool:
    if UNSHARE is None:
        return False
    probe = [UNSHARE, "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare -rm and tmpfs mounts")
def test_real_full_tmpfs_stops_training_and_restarts_do_not_loop(data, tmp_path):
    """A real small tmpfs (its own mount namespace): the run saves step-2, finds no room for
    step-4 and stops (exit 2) without writing; every torchrun restart then stops in
    preflight at once instead of recomputing steps to fail again."""
    probe = tmp_path / "probe"
    train(data, probe, 2)
    size = sum(f.stat().st_size for f in (probe / "checkpoints" / "step-2").iterdir())
    mnt, out = tmp_path / "mnt", tmp_path / "mnt" / "run"
    mnt.mkdir()
    args = " ".join(
        [
            *SMALL,
            f"--data.dataset={data}",
            f"--job.output_dir={out}",
            "--checkpoint.interval=2",
            "--training.log_interval=1",
        ]
    )
    py = sys.executable
    script = f"""
mount -t tmpfs -o size={int(size * 1.6)} tmpfs {mnt}
{py} recipes/train.py {args}; echo "first exit $?"
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 {py} -m torch.distributed.run --standalone \
    --nproc_per_node=1 --max-restarts=2 --monitor-interval=0.5 recipes/train.py {args} \
    --checkpoint.resume=auto; echo "restarted exit $?"
ls {out}/checkpoints
{py} -c "import gpt3d.checkpoint_dir as c; c.verify('{out}/checkpoints/step-2')" && echo verified
"""
    proc = subprocess.run(
        [UNSHARE, "-rm", "sh", "-c", script],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    out_text = proc.stdout + proc.stderr
    print("\n".join(x for x in out_text.splitlines() if "error:" in x))
    assert "first exit 2" in out_text and "restarted exit 1" in out_text, out_text[-3000:]
    assert "error: no room for checkpoint step-4: it needs" in out_text
    assert "nothing was written and step-2 stays the latest checkpoint" in out_text
    assert out_text.count("error: no room for the next checkpoint: step-2 takes") == 3
    assert "| loss" in out_text.split("first exit 2")[0]
    assert "| loss" not in out_text.split("first exit 2")[1]  # restarts trained nothing
    assert proc.stdout.split("restarted exit 1")[1].split() == ["step-2", "verified"]
