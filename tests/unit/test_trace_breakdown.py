"""benchmarks/trace_breakdown.py on a hand-built pair of traces whose breakdown is worked out
by hand below: a pipeline message that the receiver waits for before its sender posts it
(pipeline idle), and a grad-norm all-reduce that one rank joins late (peer skew on the pp
group, counted as pipeline idle; the rest exposed communication of purpose "other")."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from trace_breakdown import analyze  # noqa: E402

MAIN, GLOO = 1, 7  # thread ids: the training thread, a gloo worker thread of the pp group
ACTIVATION = {"Input Dims": [[2, 128, 256]], "Input type": ["float"]}  # 0.25 MiB


def x(name, ts, dur, tid=MAIN, **args):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid, "args": args}


def post(name, ts, dur, peer):
    return x(name, ts, dur, **{"Concrete Inputs": ["", "", str(peer), "0"]})


def calibration():
    return [x("bench_calibrate#pp#1", -100, 50), x("gloo:all_reduce", -90, 10, tid=GLOO)]


SENDER = [  # rank 0: computes 390 us, sends at 400, waits for the send, then the norm
    x("bench_step#0", 0, 1000),
    x("phase:fwd_bwd", 0, 900),
    x("aten::mm", 10, 390),
    post("c10d::send", 400, 10, peer=1),
    x("gloo:send", 410, 90, **ACTIVATION),
    x("c10d::wait", 410, 90),
    x("c10d::allreduce_", 910, 5),
    x("c10d::wait", 915, 75),
    x("gloo:all_reduce", 915, 70, tid=GLOO),
]
RECEIVER = [  # rank 1: posts its receive at 5 and waits; its all-reduce starts at 955
    x("bench_step#0", 0, 1000),
    x("phase:fwd_bwd", 0, 900),
    post("c10d::recv_", 5, 5, peer=0),
    x("gloo:recv", 10, 510, **ACTIVATION),
    x("c10d::wait", 10, 510),
    x("aten::mm", 520, 380),
    x("c10d::allreduce_", 950, 5),
    x("c10d::wait", 955, 35),
    x("gloo:all_reduce", 955, 30, tid=GLOO),
]


@pytest.fixture
def case(tmp_path: Path) -> Path:
    for rank, events in enumerate((SENDER, RECEIVER)):
        record = {
            "rank": rank,
            "groups": {"pp": {"name": "1", "ranks": [0, 1]}},
            "step_s": [1e-3],
            "layout": "pp=2",
        }
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(record))
        trace = {"traceEvents": calibration() + events}
        (tmp_path / f"trace_rank{rank}.json").write_text(json.dumps(trace))
    return tmp_path


def test_every_microsecond_once_with_idle_split_from_transfer(case: Path):
    result = analyze(case)
    assert result["unmatched"] == 0
    sender, receiver = (
        {k: round(v * 1e3, 6) for k, v in r["time"].items()} for r in result["ranks"]
    )  # us
    # sender: the send joins at once (its receiver posted at 10): 10 launch + 90 wait; the
    # norm's partner joins at 955: 40 us of its 75 us wait are idle, 35 + 5 launch exposed
    assert sender == {
        "compute": 390,
        "comm:pp": 100,
        "idle:pipeline": 40,
        "comm:other": 40,
        "overhead:python": 430,
    }
    # receiver: waits 10..520 for a message posted at 410: 400 idle, 110 transfer
    assert receiver == {
        "compute": 380,
        "comm:pp": 5 + 110,
        "idle:pipeline": 400,
        "comm:other": 40,
        "overhead:python": 65,
    }
    for r in result["ranks"]:
        assert abs(r["residual"]) < 1e-9 and r["wall"] == pytest.approx(1.0)
        # busy from the join to the end; the training thread waited through all of it
        assert r["busy"]["other"] == pytest.approx(0.030)
        assert r["overlapped"]["other"] == pytest.approx(0.0)
    # p2p spans end when their work is waited for: no busy time claimed; bytes sent counted
    assert all("pp" not in r["busy"] for r in result["ranks"])
    assert result["ranks"][0]["MiB"]["pp"] == pytest.approx(0.25)
    assert "pp" not in result["ranks"][1]["MiB"]
