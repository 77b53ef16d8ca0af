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
replayed from torch.distributed.pipelining's own action lists (F adds one, B or W frees one).
Measured on torch 2.13 (per-rank saved-tensor peaks, pp=2, m=4 and 8, 8 layers, vocab 512 and
50304): every schedule matches that replay except the split-backward ones
(InterleavedZeroBubble, ZBVZeroBubble), whose W leaves part of a microbatch alive until the
step ends, on every stage but the first (stage 0 has no input gradient to split off):
W_RETAINED of its blocks' saved tensors and all of the loss path's (log-probs). So a state
counts, per local stage, microbatches alive and microbatches "retained" after their W.
Residual error: the V schedules' rank 0 (first and last stage) measures up to 10 % above this
(tests/unit/test_planner.py keeps the per-rank measurements).
When torch's tables are not reachable, closed forms (exact for m a multiple of p) are used.
"""

from __future__ import annotations

import functools

import numpy as np

SPLIT_BACKWARD = ("InterleavedZeroBubble", "ZBVZeroBubble")
W_RETAINED = 0.375  # 6 of a block's 16 saved C-wide tensors (measured, see module docstring)
HEAD_RETAINED = 1.0  # the last stage's loss path (log-probs, ln_f) stays whole (measured)


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
    """Per pp rank, every state its schedule passes through: rows of (alive..., retained...)
    microbatches per local stage (in local_stages order). A rank's peak bytes is
    max(states @ (stage bytes..., retained bytes...))."""
    if p == 1:
        return (_array([(1.0, 0.0)]),)
    if schedule == "GPipe":
        return tuple(_array([(float(m), 0.0)]) for _ in range(p))
    if schedule == "1F1B":
        return tuple(_array([(float(min(p - r, m)), 0.0)]) for r in range(p))
    actions = torch_actions(schedule, p, v, m)
    if actions is None:
        return tuple(_array([_closed_form(schedule, p, v, m, r)]) for r in range(p))
    return tuple(_replay(schedule, actions[r], local_stages(schedule, r, p, v)) for r in range(p))


def inflight_closed_form(schedule: str, p: int, v: int, m: int, rank: int) -> int:
    """Chunk-microbatches alive at a rank's peak without W retention (exact for torch 2.13's
    tables when m is a multiple of p; tests compare it with the replay)."""
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
    """Fallback: the closed-form count spread evenly over local stages, plus (upper bound)
    every non-first stage's m microbatches retained for the split-backward schedules."""
    stages = local_stages(schedule, rank, p, v)
    alive = inflight_closed_form(schedule, p, v, m, rank) / len(stages)
    split = schedule in SPLIT_BACKWARD
    return (alive,) * len(stages) + tuple(float(m) if split and s else 0.0 for s in stages)


def _replay(schedule: str, actions, stages: list[int]) -> tuple:
    """Walk one rank's action list; every state it passes through."""
    n, index = len(stages), {s: i for i, s in enumerate(stages)}
    count = [0.0] * (2 * n)  # alive per local stage, then retained per local stage
    states = []
    split = schedule in SPLIT_BACKWARD
    for action in actions:
        if action is None:
            continue
        for sub in action.sub_actions or (action,):
            kind, i = sub.computation_type.value, index.get(sub.stage_index)
            if i is None or kind not in ("F", "B", "W"):
                continue
            count[i] += 1.0 if kind == "F" else -1.0
            if split and kind == "W" and sub.stage_index != 0:
                count[n + i] += 1.0
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
