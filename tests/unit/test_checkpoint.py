"""Checkpointer in one process: resume, crash safety, retention, async, and the clear errors
for damaged, incomplete or mismatched checkpoints (which touch nothing)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

from gpt3d.checkpoint_dir import latest_complete, load_model_state_dict, verify
from gpt3d.config import load_config
from gpt3d.errors import UserError
from gpt3d.preflight import preflight
from tests.helpers import make_dataset, run_script, small_run, trainer_with_checkpointer

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

SMALL = small_run(steps=6)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4000, n_val=1000)


def make(data, out, *args):
    return trainer_with_checkpointer(
        [*SMALL, f"--data.dataset={data}", f"--job.output_dir={out}", *args]
    )


def resume_of(*args):
    return preflight(load_config([*SMALL, *args]), world_size=1).resume


def run(trainer, ckpt, until):
    losses = []
    while trainer.step < until:
        losses.append(trainer.train_step().loss)
        ckpt.maybe_save()
    return losses


@pytest.fixture(scope="module")
def saved(data, tmp_path_factory):
    """6 steps with a checkpoint every 2 (keep_last 2): losses and the output dir."""
    out = tmp_path_factory.mktemp("run")
    trainer, ckpt = make(data, out, "--checkpoint.interval=2", "--checkpoint.keep_last=2")
    losses = run(trainer, ckpt, 6)
    ckpt.finish()
    return out, losses


def snapshot(path):
    return sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")
    )


def test_resume_continues_bitwise_and_keeps_last(saved, data, tmp_path):
    out, losses = saved
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-4", "step-6"]  # keep_last=2
    assert latest_complete(root).name == "step-6"
    meta = json.loads((root / "step-4" / "meta.json").read_text())
    assert meta["step"] == 4 and meta["loader"]["samples_consumed"] == 16
    trainer, ckpt = make(data, tmp_path, f"--checkpoint.resume={root / 'step-4'}")
    assert trainer.step == 4 and trainer.loader.samples_consumed == 16
    assert run(trainer, ckpt, 6) == losses[4:]


def test_plain_names_and_tied_head_stored_once(saved):
    out, _ = saved
    cfg, sd = load_model_state_dict(out / "checkpoints" / "step-6")
    assert "wte.weight" in sd and sd["lm_head.weight"] is sd["wte.weight"]
    assert "h.1.attn.q_proj.weight" in sd and not any("module" in k or "_orig" in k for k in sd)
    assert cfg.n_layer == 2 and cfg.n_embd == 32


def test_crash_during_save_keeps_previous_checkpoint(data, tmp_path, monkeypatch):
    trainer, ckpt = make(data, tmp_path, "--checkpoint.interval=2")
    run(trainer, ckpt, 2)
    before = snapshot(tmp_path / "checkpoints" / "step-2")
    write_data = FileSystemWriter.write_data

    def partial_write_then_crash(self, plan, planner):
        write_data(self, plan, planner).wait()
        data_file = next(p for p in os.scandir(self.path) if p.name.endswith(".distcp"))
        os.truncate(data_file.path, 100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(FileSystemWriter, "write_data", partial_write_then_crash)
    with pytest.raises(BaseException, match="simulated"):  # DCP: CheckpointException
        run(trainer, ckpt, 4)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4.tmp"]
    assert latest_complete(root).name == "step-2"
    assert snapshot(root / "step-2") == before  # the previous checkpoint is untouched
    resumed, ckpt = make(data, tmp_path, "--checkpoint.resume=auto", "--checkpoint.interval=2")
    assert resumed.step == 2
    run(resumed, ckpt, 4)  # saving step 4 again replaces the half-written directory
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"]


def test_async_save_matches_sync(saved, data, tmp_path):
    out, _ = saved
    trainer, ckpt = make(data, tmp_path, "--checkpoint.interval=2", "--checkpoint.async_save=1")
    run(trainer, ckpt, 6)
    ckpt.finish()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    _, a = load_model_state_dict(out / "checkpoints" / "step-6")
    _, b = load_model_state_dict(tmp_path / "checkpoints" / "step-6")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- bad checkpoints: one clear ValueError, checked before any collective ------------------


def damaged_copy(saved, tmp_path, how):
    src = saved[0] / "checkpoints" / "step-6"
    dst = tmp_path / "run" / "checkpoints" / "step-6"
    shutil.copytree(src, dst)
    if how == "truncated":
        f = next(dst.glob("*.distcp"))
        os.truncate(f, f.stat().st_size // 2)
    elif how == "meta":
        (dst / "meta.json").write_text('{"step": 6, "model": ')
    elif how == "index":
        index = dst / ".metadata"  # same size, garbage bytes: passes the size check
        index.write_bytes(b"x" * index.stat().st_size)
    elif how == "incomplete":
        (dst / "meta.json").unlink()
    return dst


@pytest.mark.parametrize(
    "how,match",
    [
        ("truncated", "is damaged: __0_0.distcp has"),
        ("meta", "meta.json is corrupt"),
        ("index", "is damaged: .metadata has checksum"),  # crc32 first, before unpickling
        ("incomplete", "is incomplete"),
    ],
)
def test_damaged_checkpoint_is_a_clear_error(saved, tmp_path, how, match):
    path = damaged_copy(saved, tmp_path, how)
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match=match) as info:
        verify(path)
    assert "\n" not in str(info.value)
    assert snapshot(tmp_path) == before


def test_other_model_shape_or_missing_path_is_a_clear_error(saved, data, tmp_path):
    path = saved[0] / "checkpoints" / "step-6"
    common = [f"--data.dataset={data}", f"--checkpoint.resume={path}"]
    with pytest.raises(UserError, match=r"different model shape: n_layer=2 \(now 3\)"):
        resume_of(*common, "--model.n_layer=3")
    with pytest.raises(UserError, match="trained with seed=1337, this run has 7"):
        resume_of(*common, "--job.seed=7")
    with pytest.raises(UserError, match="does not exist"):
        resume_of(f"--data.dataset={data}", f"--checkpoint.resume={tmp_path / 'nope'}")
    auto = ["--checkpoint.resume=auto", f"--job.output_dir={tmp_path}"]
    assert resume_of(f"--data.dataset={data}", *auto) is None  # nothing saved yet: fresh


def test_train_recipe_refuses_damaged_checkpoint_and_touches_nothing(saved, data, tmp_path):
    path = damaged_copy(saved, tmp_path, "truncated")
    before = snapshot(tmp_path)
    args = [
        *SMALL,
        f"--data.dataset={data}",
        f"--job.output_dir={tmp_path / 'run'}",
        "--checkpoint.resume=auto",
    ]
    proc = run_script("recipes/train.py", args, nproc=0, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: checkpoint {path} is damaged" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before  # no metrics, no new checkpoint, nothing deleted
