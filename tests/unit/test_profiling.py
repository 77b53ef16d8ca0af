"""[profiling]: torch.profiler Chrome traces of a window of steps (gpt3d/profiling.py), on CPU:
the hook in recipes/train.py, the window's steps and nothing else, resumed runs, rank choice."""

import json
from pathlib import Path

import pytest
import torch

from gpt3d.config import ProfilingConfig, load_config
from gpt3d.errors import ConfigError
from gpt3d.preflight import preflight
from gpt3d.profiling import StepProfiler
from tests.helpers import make_dataset, recipe, small_run


def trace_events(path: Path) -> list[dict]:
    return json.loads(path.read_text())["traceEvents"]


def step_ranges(events: list[dict]) -> list[str]:
    return sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})


def run_steps(cfg: ProfilingConfig, out: Path, first: int, last: int, rank: int = 0) -> list[str]:
    """Steps first..last of a loop of matmuls under a StepProfiler; returns its log lines."""
    lines: list[str] = []
    prof = StepProfiler(cfg, str(out), rank, torch.device("cpu"), first - 1, lines.append)
    a = torch.randn(64, 64)
    for step in range(first, last + 1):
        with torch.profiler.record_function(f"work{step}"):
            (a @ a).sum()
        prof.step(step)
    prof.stop()
    return lines


def test_training_writes_a_trace_of_the_chosen_steps(tmp_path):
    data, out = make_dataset(tmp_path / "data"), tmp_path / "run"
    args = [
        *small_run(steps=5),
        f"--data.dataset={data}",
        f"--job.output_dir={out}",
        "--profiling.trace=true",
        "--profiling.start_step=2",
        "--profiling.steps=2",
        "--checkpoint.save_final=false",
    ]
    assert recipe("train")(args) == 0
    assert [p.name for p in (out / "profile").iterdir()] == ["trace_rank0_steps2-3.json"]
    events = trace_events(out / "profile" / "trace_rank0_steps2-3.json")
    assert step_ranges(events) == ["ProfilerStep#2", "ProfilerStep#3"]
    names = {e.get("name", "") for e in events}
    assert {"aten::mm", "aten::addmm"} & names  # forward matmuls
    assert any("Backward" in n for n in names)  # autograd
    assert any(n.startswith("Optimizer.step") for n in names)


def test_window_warmup_resume_and_ranks(tmp_path):
    cfg = ProfilingConfig(trace=True, start_step=3, steps=2)
    lines = run_steps(cfg, tmp_path / "a", 1, 6)
    events = trace_events(tmp_path / "a" / "profile" / "trace_rank0_steps3-4.json")
    assert step_ranges(events) == ["ProfilerStep#3", "ProfilerStep#4"]
    work = {e["name"] for e in events if e.get("name", "").startswith("work")}
    assert work == {"work3", "work4"}  # the warm-up step 2 and steps 5, 6 are not recorded
    assert "wrote" in lines[0]
    # resumed inside the window: traces what is left of it, without warm-up
    run_steps(cfg, tmp_path / "b", 4, 6)
    events = trace_events(tmp_path / "b" / "profile" / "trace_rank0_steps4-4.json")
    assert step_ranges(events) == ["ProfilerStep#4"]
    # resumed past the window, another rank, or off: nothing
    run_steps(cfg, tmp_path / "c", 5, 8)
    run_steps(cfg, tmp_path / "d", 1, 6, rank=1)
    run_steps(ProfilingConfig(start_step=3), tmp_path / "e", 1, 6)
    assert not any((tmp_path / d / "profile").exists() for d in "cde")
    run_steps(ProfilingConfig(trace=True, start_step=1, steps=1, ranks=[]), tmp_path / "f", 1, 2, 3)
    assert (tmp_path / "f" / "profile" / "trace_rank3_steps1-1.json").is_file()


def test_memory_snapshot_needs_cuda(tmp_path):
    cfg = ProfilingConfig(trace=True, start_step=1, steps=1, memory_snapshot=True)
    lines = run_steps(cfg, tmp_path, 1, 2)
    assert "memory_snapshot needs CUDA" in lines[0]
    assert [p.name for p in (tmp_path / "profile").iterdir()] == ["trace_rank0_steps1-1.json"]


def test_ranks_outside_the_world_are_a_config_error(tmp_path):
    data = make_dataset(tmp_path / "data")
    cfg = load_config([*small_run(2), f"--data.dataset={data}", "--profiling.ranks=0,2"])
    with pytest.raises(ConfigError, match=r"profiling.ranks=\[0, 2\]: rank\(s\) \[2\] outside"):
        preflight(cfg, world_size=2)
    assert preflight(cfg, world_size=4).config.profiling.ranks == [0, 2]


def test_profiler_is_a_no_op_when_off(tmp_path):
    prof = StepProfiler(ProfilingConfig(), str(tmp_path), 0, torch.device("cpu"), 0, print)
    for step in range(1, 10):
        prof.step(step)
        assert prof.prof is None
    prof.stop()
    assert list(tmp_path.iterdir()) == []
