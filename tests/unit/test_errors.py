"""The bad-input catalogue (tests/error_cases.py), checked in process: every case is one
UserError that names the problem and the fix, raised by gpt3d.preflight before any process
group exists."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gpt3d.config import load_config
from gpt3d.errors import TrainingDiverged, UserError
from gpt3d.preflight import preflight
from tests.error_cases import PLAN_ERRORS, RUN_ERRORS
from tests.helpers import SMALL_MODEL, copy_dataset, make_dataset, trainer_for


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4000, n_val=1000)


def check(args, world=1, match=""):
    with pytest.raises(UserError, match=match) as info:
        preflight(load_config([*SMALL_MODEL, *args]), world)
    assert "\n" not in str(info.value).strip()  # one readable line
    return str(info.value)


@pytest.mark.parametrize("case", list(RUN_ERRORS))
def test_run_errors(data, case):
    world, args, match = RUN_ERRORS[case]
    check([f"--data.dataset={data}", *args], world, match.replace("(", r"\(").replace(")", r"\)"))


@pytest.mark.parametrize("case", list(PLAN_ERRORS))
def test_plan_errors(tmp_path, data, case):
    text, match = PLAN_ERRORS[case]
    plan = tmp_path / "plan.toml"
    plan.write_text(text)
    args = [f"--data.dataset={data}", "--parallel.tp=2", f"--parallel.plan={plan}"]
    assert str(plan) in check(args, 2, match)


# ---- data ---------------------------------------------------------------------------------------
def broken_dataset(tmp_path, data, kind):
    d = copy_dataset(data, tmp_path / kind)
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
    elif kind == "no_meta":
        (d / "meta.json").unlink()
        return d
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
        ("no_meta", "meta.json is missing"),
    ],
)
def test_data_errors(tmp_path, data, kind, match):
    d = tmp_path / "nothing" if kind == "missing_dir" else broken_dataset(tmp_path, data, kind)
    check([f"--data.dataset={d}"], 1, match)


def test_only_rank_0_scans_token_ids(tmp_path, data):
    """Every rank reads the same files: rank 0's scan is enough (and reports the error)."""
    d = broken_dataset(tmp_path, data, "big_ids")
    cfg = load_config([*SMALL_MODEL, f"--data.dataset={d}"])
    assert preflight(cfg, world_size=1, rank=1).dataset["vocab_size"] == 512
    with pytest.raises(UserError, match="token id 600"):
        preflight(cfg, world_size=1, rank=0)


# ---- numerics ------------------------------------------------------------------------------------
def test_nan_loss_stops_with_the_step(data):
    trainer = trainer_for(
        [
            *SMALL_MODEL,
            f"--data.dataset={data}",
            "--training.lr=1e6",
            "--training.warmup_steps=0",
            "--training.grad_clip=0",
        ]
    )
    with pytest.raises(TrainingDiverged, match=r"at step \d+"):
        for _ in range(50):
            trainer.train_step()
