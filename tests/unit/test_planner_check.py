"""training.memory_check (gpt3d/planner/check.py): recipes/train.py refuses a run whose
predicted peak exceeds the memory a rank has, before building anything, with one message
(exit 2) naming the prediction, the limit and a layout that fits. On CPU the limit is forced
small with training.memory_limit_gib (the GPU path differs only in where the limit comes
from: torch.cuda.mem_get_info)."""

from __future__ import annotations

import re

import pytest

from gpt3d.config import load_config
from gpt3d.errors import ConfigError
from gpt3d.planner import estimate_memory
from gpt3d.planner.check import check_memory, workload_and_layout
from gpt3d.preflight import preflight
from tests.helpers import make_dataset, model_args, run_script

GiB = 2**30


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("check") / "data", vocab_size=512)


def args(data, *more) -> list[str]:
    return [
        *model_args(4, 4, 64, block=64),
        "--model.pad_vocab_multiple=64",
        f"--data.dataset={data}",
        "--training.seq_len=64",
        "--training.global_batch_size=16",
        "--training.steps=2",
        "--training.eval_interval=0",
        "--checkpoint.save_final=false",
        "--metrics.plot=false",
        *more,
    ]


def need_gib(data, world: int, *more) -> float:
    run = preflight(load_config(args(data, *more)), world)
    return estimate_memory(*workload_and_layout(run, "cpu")).total / GiB


def refusal(data, world: int, limit: float, *more) -> str:
    import torch

    run = preflight(load_config(args(data, "--training.memory_check=analytic", *more,
                                     f"--training.memory_limit_gib={limit}")), world)  # fmt: skip
    with pytest.raises(ConfigError) as e:
        check_memory(run, torch.device("cpu"), log=lambda m: None)
    return str(e.value)


def test_the_suggested_layout_is_valid_and_fits(data):
    """DDP on 4 processes needs the whole model state per rank; between what it needs and
    what FSDP over 4 needs, the check refuses DDP and suggests a layout that gpt3d accepts
    and the model puts under the limit."""
    ddp = ["--parallel.dp_mode=ddp"]
    limit = 0.5 * (need_gib(data, 4, *ddp) + need_gib(data, 4, "--parallel.dp_shard=4"))
    message = refusal(data, 4, limit, *ddp)
    assert re.search(r"needs about [\d.]+ GiB per rank \(params", message), message
    assert f"training.memory_limit_gib is {limit:.3g} GiB" in message
    assert "--training.memory_check=off" in message
    suggested = message.split("predicted to fit")[1].split("): ")[1].split(";")[0].split()
    assert suggested and all(a.startswith(("--parallel.", "--training.")) for a in suggested)
    assert need_gib(data, 4, *suggested) <= limit


def test_no_layout_fits_names_the_leanest(data):
    message = refusal(data, 2, 1e-4)
    assert "no layout of 2 process(es) fits: the leanest needs" in message
    assert "--training.activation_checkpointing=full" in message  # the leanest recomputes


def test_auto_is_off_on_cpu_and_analytic_passes_a_run_that_fits(data, capsys):
    import torch

    run = preflight(load_config(args(data, "--training.memory_limit_gib=0.0001")), 1)
    check_memory(run, torch.device("cpu"), log=print)  # auto on CPU: no check at all
    run = preflight(load_config(args(data, "--training.memory_check=analytic")), 1)
    check_memory(run, torch.device("cpu"), log=print)
    assert "memory check (analytic): predicted peak" in capsys.readouterr().out


def test_uncovered_config_is_skipped_by_auto_and_refused_by_analytic(data):
    import torch

    custom = ["--parallel.pp=2", "--parallel.pp_layer_split=3,1", "--parallel.pp_microbatches=2"]
    notes = []
    run = preflight(load_config(args(data, *custom, "--training.memory_check=auto")), 2)
    check_memory(run, torch.device("cuda"), log=notes.append)  # auto on a GPU: skipped
    assert "parallel.pp_layer_split" in notes[0] and "memory_check=fake" in notes[0]
    assert "pp_layer_split; use fake or off" in refusal(data, 2, 1.0, *custom)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_train_refuses_before_building_with_one_message(data):
    """A real 2-process torchrun launch: exit 2, the message once, within seconds (no rank
    waits in a collective: the check runs before the process group exists)."""
    out = run_script("recipes/train.py", args(data, "--parallel.pp=1", "--parallel.tp=2",
                     "--training.memory_check=analytic", "--training.memory_limit_gib=0.001"),
                     nproc=2, timeout=120)  # fmt: skip
    assert out.returncode != 0
    assert (out.stdout + out.stderr).count("error: this run needs about") == 1
    assert "--training.memory_check=off" in out.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fake_mode_refuses_from_the_fake_estimate(data):
    """memory_check=fake: the fake-tensor estimate of every pipeline rank (subprocesses)."""
    message = refusal(data, 2, 0.001, "--parallel.pp=2", "--training.memory_check=fake")
    assert "training.memory_check=fake" in message and "pipeline rank" in message


def test_fake_estimate_child_unpickles_only_a_run_plan(data):
    """The fake estimate's child reads its RunPlan from stdin through an allow-list: a real
    plan (tp x pp, with rules) comes back equal; a pickle that would call a function is
    refused before anything runs."""
    import io
    import os
    import pickle
    from dataclasses import replace

    from gpt3d.planner.fake import _RunPlanUnpickler

    run = preflight(load_config(args(data, "--parallel.tp=2", "--parallel.pp=2")), 4)
    plan = replace(run, pretrained=None, resume=None)  # what estimate() sends
    assert _RunPlanUnpickler(io.BytesIO(pickle.dumps(plan))).load() == plan

    class RunsCode:
        def __reduce__(self):
            return (os.getpid, ())

    with pytest.raises(pickle.UnpicklingError, match="never holds"):
        _RunPlanUnpickler(io.BytesIO(pickle.dumps(RunsCode()))).load()
