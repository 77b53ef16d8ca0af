"""metrics.jsonl's companions: TensorBoard events with the same fields, and the loss-curve PNG."""

from __future__ import annotations

import sys

import pytest

from gpt3d.metrics import MetricsWriter, plot_loss_curve, read_metrics
from tests.helpers import DEBUG_CONFIG, NO_CHECKPOINTS, make_dataset, run_script

RECORDS = [
    {"step": 1, "loss": 6.0, "lr": 1e-3, "grad_norm": 1.5, "tokens_per_sec": 900.0, "mfu": 0.1},
    {"step": 2, "loss": 5.5, "lr": 1e-3, "grad_norm": 1.2, "tokens_per_sec": 950.0, "mfu": 0.1},
    {"step": 2, "val_loss": 5.7},
]


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_gets_the_jsonl_fields(tmp_path):
    pytest.importorskip("tensorboard")
    writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=True)
    for r in RECORDS:
        writer.write(r)
    writer.close()
    scalars = _scalars(tmp_path / "tensorboard")
    fields = {k for r in read_metrics(tmp_path / "metrics.jsonl") for k in r if k != "step"}
    assert set(scalars) == fields
    assert scalars["loss"] == [(1, 6.0), (2, 5.5)]
    assert scalars["val_loss"] == [(2, pytest.approx(5.7))]


def test_loss_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    writer = MetricsWriter(str(tmp_path), enabled=True)
    for r in RECORDS:
        writer.write(r)
    png = plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png", tokens_per_step=512)
    assert png == tmp_path / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_curve_skipped_with_a_note_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n')
    assert plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "loss.png") is None
    assert not (tmp_path / "loss.png").exists()
    assert "pip install 'gpt3d[plot]'" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_train_recipe_writes_loss_png_and_events(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    args = [
        *DEBUG_CONFIG,
        f"--data.dataset={data}",
        "--model.vocab_size=512",
        f"--job.output_dir={out}",
        "--training.steps=4",
        "--training.eval_interval=2",
        *NO_CHECKPOINTS,
        "--metrics.plot=true",
        "--metrics.tensorboard=true",
    ]
    proc = run_script("recipes/train.py", args, nproc=0, timeout=110)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    scalars = _scalars(out / "tensorboard")
    assert len(scalars["loss"]) == 4 and len(scalars["val_loss"]) == 2
