"""The bad-input catalog, checked in process: every case is one ValueError that names the
problem and the fix, raised before any process group exists (gpt3d.trainer.preflight)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt3d.config import ConfigError, load_config
from gpt3d.trainer import Trainer, TrainingDiverged, preflight
from tests.helpers import SMALL_MODEL, make_dataset

SMALL = [*SMALL_MODEL]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4000, n_val=1000)


def check(args, world=1, match=""):
    with pytest.raises(ValueError, match=match) as info:
        preflight(load_config([*SMALL, *args]), world)
    assert "\n" not in str(info.value).strip()  # one readable line
    return str(info.value)


# ---- config -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, match",
    [
        (["--foo.bar=1"], "unknown section"),
        (["--training.stepz=3"], "steps"),
        (["--training.steps=abc"], "training.steps"),
        (["--training.steps=0"], "training.steps"),
        (["--training.lr=-1"], "training.lr"),
        (["--training.min_lr=1"], "min_lr"),
        (["--config", "does/not/exist.toml"], "does/not/exist.toml"),
        (["--model.preset=gpt5"], "preset"),
    ],
)
def test_config_errors(args, match):
    with pytest.raises(ConfigError, match=match):
        load_config(args)


# ---- layout (world size given, no processes started) ---------------------------------------
@pytest.mark.parametrize(
    "world, args, match",
    [
        (3, ["--parallel.tp=2"], "world size 3"),
        (2, ["--parallel.tp=2", "--model.n_head=3", "--model.n_embd=48"], "n_head=3"),
        (2, ["--parallel.tp=2", "--model.vocab_size=511"], "pad_vocab_multiple"),
        (4, ["--parallel.pp=4", "--parallel.pp_microbatches=4"], "cannot fill 4"),
        (2, ["--parallel.pp=2", "--parallel.pp_microbatches=1"], "at least 2 microbatches"),
        (2, ["--training.global_batch_size=5"], "global_batch_size=5"),
        (
            2,
            ["--parallel.tp=2", "--parallel.sequence_parallel=true", "--training.seq_len=15"],
            "seq_len=15",
        ),
        (2, ["--parallel.pp=2", "--parallel.pp_schedule=DualPipeV"], "pp_stages_per_rank=2"),
        (2, ["--parallel.dp_mode=ddp", "--parallel.dp_shard=2"], "dp_mode='ddp'"),
    ],
)
def test_layout_errors(data, world, args, match):
    check([f"--data.dataset={data}", *args], world, match)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match="pp_schedule"):
        load_config(["--parallel.pp_schedule=Zigzag"])


# ---- plan files ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, match",
    [
        (None, "not found"),
        ('[modules."wte"\n', "not valid TOML"),
        ('[modules."h.*.attn.qproj"]\nstyle = "colwise"', "matches no module"),
        ('[modules."wte"]\nstyle = "vocab_parallel"', "unknown style"),
        ('[modules."wte"]\nstyle = "rowwise"\ninput_layouts = "diagonal"', "layouts are"),
    ],
)
def test_plan_errors(tmp_path, data, text, match):
    plan = tmp_path / "plan.toml"
    if text is not None:
        plan.write_text(text)
    check([f"--data.dataset={data}", "--parallel.tp=2", f"--parallel.plan={plan}"], 2, match)


# ---- data ---------------------------------------------------------------------------------------
def broken_dataset(tmp_path, data, kind):
    d = tmp_path / kind
    d.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (d / name).write_bytes((data / name).read_bytes())
    meta = json.loads((d / "meta.json").read_text())
    if kind == "missing_bin":
        (d / "train.bin").unlink()
    elif kind == "empty":
        (d / "val.bin").write_bytes(b"")
        meta["val_tokens"] = 0
    elif kind == "too_short":
        np.arange(10, dtype=np.uint16).tofile(d / "val.bin")
        meta["val_tokens"] = 10
    elif kind == "big_ids":
        tokens = np.fromfile(d / "train.bin", dtype=np.uint16)
        tokens[123] = 600
        tokens.tofile(d / "train.bin")
    elif kind == "meta_vocab":
        meta["vocab_size"] = 50257
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing_dir", "does not exist"),
        ("missing_bin", "train.bin"),
        ("empty", "val.bin"),
        ("too_short", "val.bin"),
        ("big_ids", "token id 600 at position 123"),
        ("meta_vocab", "vocab_size 50257"),
    ],
)
def test_data_errors(tmp_path, data, kind, match):
    d = tmp_path / "nothing" if kind == "missing_dir" else broken_dataset(tmp_path, data, kind)
    check([f"--data.dataset={d}"], 1, match)


# ---- numerics ------------------------------------------------------------------------------------
def test_nan_loss_stops_with_the_step(data):
    cfg = load_config(
        [
            *SMALL,
            f"--data.dataset={data}",
            "--training.lr=1e6",
            "--training.warmup_steps=0",
            "--training.grad_clip=0",
        ]
    )
    trainer = Trainer(cfg)
    with pytest.raises(TrainingDiverged, match=r"at step \d+"):
        for _ in range(50):
            trainer.train_step()
