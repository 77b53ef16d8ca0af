"""The memory check recipes/train.py runs before building anything (training.memory_check):
predict the per-rank peak, compare it with the memory a rank has, and refuse with a layout
that fits instead of running out of memory after minutes of start-up.

    auto      the analytic model on GPUs (instant; the planner's, gpt3d/planner/memory.py),
              off on CPU; a config the analytic model does not cover is skipped with a note
    analytic  the analytic model on any device
    fake      the fake-tensor estimate of gpt3d's real build path for every pipeline rank
              (gpt3d/planner/fake.py; a few seconds per stage, in subprocesses)
    off       no check

The limit is training.memory_limit_gib, else the GPU's free memory (torch.cuda.mem_get_info)
or, on CPU, the available RAM shared by this node's processes. Every rank predicts every
pipeline rank and takes the fullest, so all ranks reach the same verdict before any process
group exists (one message, exit code 2).
"""

from __future__ import annotations

import os
from pathlib import Path

from gpt3d.errors import ConfigError
from gpt3d.planner.hardware import GiB

MODES = ("auto", "analytic", "fake", "off")


class NotCovered(Exception):
    """A config the analytic model does not describe (the check says why it skipped)."""


def check_memory(run, device, log) -> None:
    """Raise ConfigError when the predicted peak of the fullest rank exceeds the limit."""
    t = run.config.training
    mode = t.memory_check
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return
    try:
        w, lay = workload_and_layout(run, device.type)
    except NotCovered as e:
        if mode == "analytic":
            raise ConfigError(f"training.memory_check=analytic: {e}; use fake or off") from None
        w = lay = None
        if mode == "auto":
            log(f"memory check skipped: {e} (training.memory_check=fake estimates it)")
            return
    predicted = _predict(run, w, lay, device.type, mode)
    limit, where = memory_limit(t.memory_limit_gib, device)
    if predicted.total <= limit:
        log(
            f"memory check ({mode}): predicted peak {gib(predicted.total)} per rank "
            f"(pipeline rank {predicted.pp_rank}), {where} {gib(limit)}"
        )
        return
    fix = suggestion(w, lay, limit, device.type) if w is not None else ""
    raise ConfigError(
        f"this run needs about {gib(predicted.total)} per rank ({describe(predicted)}; "
        f"pipeline rank {predicted.pp_rank}, training.memory_check={mode}) and {where} is "
        f"{gib(limit)}{fix}; or set --training.memory_check=off to try anyway"
    )


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.3g} GiB"


def _predict(run, w, lay, device_type: str, mode: str):
    if mode == "fake":
        from gpt3d.planner.fake import estimate

        return max(estimate(run, device_type=device_type), key=lambda mb: mb.total)
    from gpt3d.planner.memory import estimate_memory

    return estimate_memory(w, lay)


def describe(mb) -> str:
    parts = (("params", mb.params), ("grads", mb.grads), ("optimizer", mb.optimizer),
             ("activations", mb.activations), ("temporaries", mb.temporaries))  # fmt: skip
    return ", ".join(f"{name} {gib(value)}" for name, value in parts)


def memory_limit(limit_gib: float, device) -> tuple[float, str]:
    """(bytes a rank may use, what they are)."""
    if limit_gib > 0:
        return limit_gib * GiB, "training.memory_limit_gib"
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return float(free), f"the free memory of {torch.cuda.get_device_name(device)}"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return _available_ram() / local, f"this node's available RAM / {local} process(es)"


def _available_ram() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def workload_and_layout(run, device_type: str):
    """The planner's Workload and Layout of a RunPlan, or NotCovered."""
    from gpt3d.parallel.dims import n_microbatches
    from gpt3d.planner.layout import Layout, Workload

    model, p, t, dims = run.model, run.config.parallel, run.config.training, run.dims
    uncovered = [
        what
        for what, yes in (
            ("Mixture-of-Experts blocks", model.n_experts > 0),
            ("parallel.pp_layer_split", bool(p.pp_layer_split)),
            ("a custom tensor-parallel plan", p.plan not in ("", "gpt_tp", "gpt_tp_sp")),
            ("parallel.loss_parallel=false", dims.tp > 1 and not p.loss_parallel),
        )
        if yes
    ]
    if uncovered:
        raise NotCovered(f"the analytic model does not cover {', '.join(uncovered)}")
    w = Workload(model, t.seq_len, t.global_batch_size, t.dtype, (), t.ac_every, device_type)
    lay = Layout(
        pp=dims.pp,
        dp_replicate=dims.dp_replicate,
        dp_shard=dims.dp_shard,
        tp=dims.tp,
        dp_mode=p.dp_mode,
        schedule=p.pp_schedule,
        stages_per_rank=p.pp_stages_per_rank,
        microbatches=n_microbatches(p) if dims.pp > 1 else 1,
        grad_accum=t.grad_accum,
        ac=t.activation_checkpointing,
        sequence_parallel=p.sequence_parallel,
        embedding=p.embedding_sharding,
        reshard_per_microbatch=p.fsdp_reshard_per_microbatch,
    )
    return w, lay


def suggestion(w, lay, limit: float, device_type: str) -> str:
    """'; <a layout of the same world size that fits>' or the leanest one and its need."""
    from dataclasses import replace

    from gpt3d.planner.hardware import Cluster, HardwareProfile
    from gpt3d.planner.layout import layout_args
    from gpt3d.planner.search import plan

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", lay.world))
    hw = HardwareProfile("this device", {"float32": 1.0, "bfloat16": 1.0}, limit / GiB)
    if device_type != "cuda":
        hw = replace(hw, comm_overlap=0.0)
    result = plan(w, Cluster(lay.world, min(per_node, lay.world), hw, 1.0), suggest=False)
    fits = sorted(result.feasible, key=lambda c: c.memory.total)
    if fits:  # the fastest of those within 20 % of the leanest need
        lean = [c for c in fits if c.memory.total <= 1.2 * fits[0].memory.total]
        best = min(lean, key=lambda c: c.time.step)
        return (
            f"; a layout of {lay.world} process(es) predicted to fit "
            f"({gib(best.memory.total)}): {' '.join(layout_args(w, best.layout))}"
        )
    if result.candidates:
        lean = min(result.candidates, key=lambda c: c.memory.total)
        return (
            f"; no layout of {lay.world} process(es) fits: the leanest needs "
            f"{gib(lean.memory.total)} ({' '.join(layout_args(w, lean.layout))}): "
            "use more processes or a smaller batch"
        )
    return ""
