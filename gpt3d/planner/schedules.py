"""Pipeline schedules: the bubble, and how many microbatches' activations each rank holds.

Bubble, in units of one rank's work on one microbatch (all its stages), so that
bubble / (m + bubble) is the idle fraction of a step with m microbatches:
  GPipe, 1F1B                      p - 1              -> (p-1)/(m+p-1)  (Huang et al. 2019;
                                                         Narayanan et al. 2021, PipeDream-Flush)
  Interleaved1F1B, LoopedBFS       (p - 1) / v        (Narayanan et al. 2021 sec. 2.2;
                                                         Lamy-Poirier 2023, breadth-first)
  InterleavedZeroBubble            (p - 1) / (3 v)    ZB-H1: (p-1)(T_F + T_B - T_W) with
                                                         T_F = T_B = T_W (Qi et al. 2024 sec. 3)
  ZBVZeroBubble, DualPipeV         0                  (Qi et al. 2024 sec. 6; DeepSeek-V3)

Residency: microbatches whose activations a rank holds at its peak, per local stage. GPipe
holds all m, 1F1B min(p - rank, m) (one stage per rank); the multi-stage schedules are
replayed from torch.distributed.pipelining's own action lists (F adds one, B or W frees one;
the split-backward schedules free a microbatch's saved tensors at its W). Every schedule's
replay equals the saved-tensor peak of each rank measured on torch 2.13, fake and real
(tests/unit/test_planner_fake.py). (Phase 1 saw split-backward stages "retain" tensors after
W: that was the measuring hook holding saved outputs in a cycle with their own grad_fn, which
the I/W split never releases; gpt3d/planner/livebytes.py holds detached aliases instead.)
When torch's tables are not reachable, closed forms (exact for m a multiple of p) are used.
"""

from __future__ import annotations

import functools

import numpy as np


def bubble_units(schedule: str, p: int, v: int) -> float:
    if p == 1:
        return 0.0
    if schedule in ("GPipe", "1F1B"):
        return p - 1.0
    if schedule in ("Interleaved1F1B", "LoopedBFS"):
        return (p - 1.0) / v
    if schedule == "InterleavedZeroBubble":
        return (p - 1.0) / (3 * v)
    return 0.0  # ZBVZeroBubble, DualPipeV


def bubble_fraction(schedule: str, p: int, v: int, m: int) -> float:
    """Idle fraction of one pipeline step."""
    units = bubble_units(schedule, p, v)
    return units / (m + units)


def local_stages(schedule: str, rank: int, p: int, v: int) -> list[int]:
    """Stage indices a pp rank holds (gpt3d's placement: loop, or V for ZBV/DualPipeV)."""
    from gpt3d.parallel.pipeline import stages_of_rank

    return stages_of_rank(rank, p, v, schedule)


@functools.lru_cache(maxsize=4096)
def residency(schedule: str, p: int, v: int, m: int) -> tuple:
    """Per pp rank, every state its schedule passes through: rows of microbatches alive per
    local stage (in local_stages order). A rank's peak bytes is max(states @ stage bytes)."""
    if p == 1:
        return (_array([(1.0,)]),)
    if schedule == "GPipe":
        return tuple(_array([(float(m),)]) for _ in range(p))
    if schedule == "1F1B":
        return tuple(_array([(float(min(p - r, m)),)]) for r in range(p))
    actions = torch_actions(schedule, p, v, m)
    if actions is None:
        return tuple(_array([_closed_form(schedule, p, v, m, r)]) for r in range(p))
    return tuple(_replay(actions[r], local_stages(schedule, r, p, v)) for r in range(p))


@functools.lru_cache(maxsize=4096)
def pending_weight_grads(schedule: str, p: int, v: int, m: int) -> tuple[int, ...]:
    """Per pp rank, the most microbatch-stages whose input gradient is done (I) and weight
    gradient not yet (W) at once: the split-backward schedules keep the gradients of a
    stage's intermediate outputs for each of them until its W."""
    actions = torch_actions(schedule, p, v, m) if p > 1 else None
    if actions is None:
        return (0,) * p
    most = []
    for rank in range(p):
        pending = peak = 0
        for action in actions[rank]:
            for sub in (action.sub_actions or (action,)) if action is not None else ():
                kind = sub.computation_type.value
                pending += (kind == "I") - (kind == "W")
                peak = max(peak, pending)
        most.append(peak)
    return tuple(most)


def inflight_closed_form(schedule: str, p: int, v: int, m: int, rank: int) -> int:
    """Chunk-microbatches alive at a rank's peak (exact for torch 2.13's tables when m is a
    multiple of p; tests compare it with the replay)."""
    if schedule == "GPipe":
        return m
    if schedule == "1F1B":
        return min(p - rank, m)
    if schedule == "LoopedBFS":
        return v * m
    if schedule == "Interleaved1F1B":
        per_round = m // max(1, m // p)  # torch's microbatches_per_round
        return min((v - 1) * per_round + 2 * (p - 1 - rank) + 1, v * m)
    if schedule == "InterleavedZeroBubble":
        return v * min(p, m)
    if schedule == "ZBVZeroBubble":
        return min(2 * p, m + 1 + rank)
    return 2 * p + 1  # DualPipeV (needs m >= 2p)


def _closed_form(schedule: str, p: int, v: int, m: int, rank: int) -> tuple[float, ...]:
    """Fallback: the closed-form count spread evenly over local stages."""
    stages = local_stages(schedule, rank, p, v)
    return (inflight_closed_form(schedule, p, v, m, rank) / len(stages),) * len(stages)


def _replay(actions, stages: list[int]) -> tuple:
    """Walk one rank's action list; every state (alive per local stage) it passes through."""
    index = {s: i for i, s in enumerate(stages)}
    count = [0.0] * len(stages)
    states = []
    for action in actions:
        if action is None:
            continue
        for sub in action.sub_actions or (action,):
            kind, i = sub.computation_type.value, index.get(sub.stage_index)
            if i is None or kind not in ("F", "B", "W"):
                continue
            count[i] += 1.0 if kind == "F" else -1.0
            states.append(tuple(count))
    return _array(states or [tuple(count)])


def _array(states) -> np.ndarray:
    """The distinct states as a read-only (n_states, 2 * local stages) array."""
    a = np.array(sorted(set(states)), dtype=np.float64)
    a.setflags(write=False)
    return a


def torch_actions(schedule: str, p: int, v: int, m: int):
    """torch's own per-rank action lists for a multi-stage schedule, or None if this torch
    cannot produce them without process groups (private API, torch 2.13)."""
    try:
        from torch.distributed.pipelining.schedules import get_schedule_class

        cls = get_schedule_class(schedule)
        sched = cls.__new__(cls)  # the tables need only these numbers, not real stages
        rounds = max(1, m // p)
        sched.pp_group_size, sched.n_local_stages, sched._n_microbatches = p, v, m
        sched.number_of_rounds, sched.microbatches_per_round = rounds, m // rounds
        sched.num_stages = sched._num_stages = p * v
        sched._stages = [None] * v
        order = {r: sched._calculate_single_rank_operations(r) for r in range(p)}
        if schedule == "InterleavedZeroBubble":
            sched.pipeline_order = order
            order = sched._add_bubbles_to_actions(p * v)
        return order
    except Exception:  # noqa: BLE001 - any change in torch's internals: use closed forms
        return None
