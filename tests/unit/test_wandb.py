"""metrics.wandb = true: W&B gets every metrics.jsonl record (same fields, same step) and the
config. Run offline (WANDB_MODE=offline writes the run only locally); the run file is read
back with W&B's own protobuf records."""

import json
import struct
import sys
from pathlib import Path

import pytest

from gpt3d.config import config_to_dict, load_config
from gpt3d.errors import ConfigError
from gpt3d.preflight import preflight
from tests.helpers import REPO, make_dataset, read_jsonl, run_script, small_run

wandb = pytest.importorskip("wandb")
pytestmark = pytest.mark.slow  # one training process importing torch and wandb (~10 s)

BLOCK, HEADER = 32 * 1024, 7  # W&B's run file: LevelDB-style log blocks after a 7-byte header


def wandb_records(path: Path) -> list:
    """The protobuf Records of a W&B run file (.wandb): header ':W&B' + magic + version, then
    32 KiB blocks of records (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle,
    4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    records, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if left < HEADER or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        pending += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_offline_run_logs_the_metrics_records_and_the_config(tmp_path):
    data, out = make_dataset(tmp_path / "data"), tmp_path / "run"
    args = [
        "--config",
        str(REPO / "recipes/configs/debug.toml"),  # explicit: the logged config is all of it
        *small_run(steps=4),
        f"--data.dataset={data}",
        f"--job.output_dir={out}",
        "--job.name=wandb-test",
        "--training.log_interval=1",
        "--training.eval_interval=2",
        "--training.eval_steps=1",
        "--checkpoint.save_final=false",
        "--metrics.wandb=true",
        "--metrics.wandb_project=gpt3d-tests",
    ]
    proc = run_script("recipes/train.py", args, nproc=0, env={"WANDB_MODE": "offline"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    # history: one row per step, holding every metrics.jsonl field of that step
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {key(i): json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    expected: dict[int, dict] = {}
    for rec in read_jsonl(out / "metrics.jsonl"):
        expected.setdefault(rec["step"], {}).update({k: v for k, v in rec.items() if k != "step"})
    assert sorted(expected) == [1, 2, 3, 4] and "val_loss" in expected[2]
    assert rows == expected
    # the run: project, name and the whole config
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name) == ("gpt3d-tests", "wandb-test")
    logged = {key(i): json.loads(i.value_json) for i in run.config.update if key(i) != "_wandb"}
    expected_config = config_to_dict(load_config(args))
    # the config that ran: preflight resolves dp_mode "auto" (one process, a model that fits -> ddp)
    # and embedding_sharding "auto" (no FSDP to keep the table by rows -> fsdp)
    assert expected_config["parallel"]["dp_mode"] == "auto"
    assert expected_config["parallel"]["embedding_sharding"] == "auto"
    expected_config["parallel"].update(dp_mode="ddp", embedding_sharding="fsdp")
    assert logged == expected_config
    assert "exit" in kinds  # the run was finished, not abandoned


def test_missing_wandb_is_a_config_error_before_training(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data")
    cfg = load_config([*small_run(2), f"--data.dataset={data}", "--metrics.wandb=true"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'gpt3d\[wandb\]'"):
        preflight(cfg, world_size=1)
