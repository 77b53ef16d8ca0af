"""The search: every layout gpt3d accepts, scored by memory and step time, ranked.

Ranking: layouts that fit the memory budget first, fastest step first, where steps within
TIE_BAND of each other (below what the cost model can tell apart) go to the one needing less
memory; then those that do not fit, closest to fitting first. When nothing fits, the smallest
cluster (same GPU, same per-node count) and the smallest global batch that would work are
searched too.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace

from gpt3d.planner.cost import TimeBreakdown, estimate_time, mfu
from gpt3d.planner.hardware import Cluster
from gpt3d.planner.layout import (
    Layout,
    SearchSpace,
    Workload,
    enumerate_layouts,
    gpt3d_layout_error,
)
from gpt3d.planner.memory import DTYPE_BYTES, MemoryBreakdown, estimate_memory


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    memory: MemoryBreakdown
    time: TimeBreakdown | None
    budget: float  # bytes a rank may use

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.budget

    @property
    def over_by(self) -> float:
        return max(0.0, self.memory.total - self.budget)


@dataclass
class PlanResult:
    workload: Workload
    cluster: Cluster
    candidates: list[Candidate]  # ranked
    enumerated: int = 0
    rejected: Counter = field(default_factory=Counter)  # gpt3d's reasons, normalised
    smallest_cluster: tuple[int, Candidate] | None = None  # when nothing fits
    smallest_batch: tuple[int, Candidate] | None = None

    @property
    def feasible(self) -> list[Candidate]:
        return [c for c in self.candidates if c.fits]

    def tokens_per_s(self, c: Candidate) -> float:
        return self.workload.tokens / c.time.step

    def mfu(self, c: Candidate) -> float:
        return mfu(self.workload, self.cluster, c.time.step)


def _reason(message: str) -> str:
    """gpt3d's message with the numbers taken out, so equal causes count together."""
    return re.sub(r"\d+", "N", message.split(";")[0])[:110]


def valid_layouts(w: Workload, cluster: Cluster, space: SearchSpace, rejected: Counter | None):
    for lay in enumerate_layouts(w, cluster.n_devices, cluster.per_node, space):
        error = gpt3d_layout_error(w, lay)
        if error is None:
            yield lay
        elif rejected is not None:
            rejected[_reason(error)] += 1


def score(w: Workload, lay: Layout, cluster: Cluster, dp_exposed: float | None) -> Candidate:
    return Candidate(
        lay,
        estimate_memory(w, lay),
        estimate_time(w, lay, cluster, dp_exposed),
        cluster.memory_budget,
    )


TIE_BAND = 0.01  # step times within 1 % of a group's fastest count as a tie


def rank(cands: list[Candidate]) -> list[Candidate]:
    """Fitting layouts by step time, each run of ties (within TIE_BAND of the run's fastest)
    by memory; then the rest by how far over the budget they are."""
    fits = sorted((c for c in cands if c.fits), key=lambda c: c.time.step)
    ranked, i = [], 0
    while i < len(fits):
        j = i
        while j < len(fits) and fits[j].time.step <= fits[i].time.step * (1 + TIE_BAND):
            j += 1
        ranked += sorted(fits[i:j], key=lambda c: c.memory.total)
        i = j
    rest = sorted((c for c in cands if not c.fits), key=lambda c: (c.over_by, c.time.step))
    return ranked + rest


def plan(
    w: Workload,
    cluster: Cluster,
    space: SearchSpace | None = None,
    dp_exposed: float | None = None,
    suggest: bool = True,
) -> PlanResult:
    """Every valid layout of `w` on `cluster`, ranked."""
    check_workload(w)
    space = space or SearchSpace()
    rejected: Counter = Counter()
    cands = [
        score(w, lay, cluster, dp_exposed) for lay in valid_layouts(w, cluster, space, rejected)
    ]
    cands = rank(cands)
    result = PlanResult(w, cluster, cands, len(cands) + sum(rejected.values()), rejected)
    if suggest and not result.feasible:
        result.smallest_cluster = smallest_feasible_cluster(w, cluster, space)
        result.smallest_batch = smallest_feasible_batch(w, cluster, space)
    return result


def check_workload(w: Workload) -> None:
    """What no layout can fix (ValueError with the fix)."""
    m = w.model
    if w.seq_len > m.block_size:
        raise ValueError(
            f"sequence length {w.seq_len} exceeds the model's block_size {m.block_size} "
            "(its position table); lower --seq or raise --block-size"
        )
    if w.global_batch < 1 or w.seq_len < 1:
        raise ValueError("--global-batch and --seq must be >= 1")
    if w.dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {w.dtype!r}: choose one of {sorted(DTYPE_BYTES)}")


def first_fit(w: Workload, cluster: Cluster, space: SearchSpace) -> Candidate | None:
    """Any layout that is valid and fits (memory only: no timing needed)."""
    for lay in valid_layouts(w, cluster, space, None):
        memory = estimate_memory(w, lay)
        if memory.total <= cluster.memory_budget:
            return Candidate(lay, memory, None, cluster.memory_budget)
    return None


def cluster_sizes(per_node: int, max_nodes: int = 1024) -> list[int]:
    """Device counts tried: 1..per_node (part of one node), 2..16 nodes, then powers of two."""
    nodes = list(range(2, 17)) + [2**k for k in range(5, max_nodes.bit_length())]
    return list(range(1, per_node + 1)) + [n * per_node for n in nodes]


def smallest_feasible_cluster(
    w: Workload,
    cluster: Cluster,
    space: SearchSpace,
) -> tuple[int, Candidate] | None:
    for n in cluster_sizes(cluster.per_node):
        if n == cluster.n_devices:
            continue
        found = first_fit(w, replace(cluster, n_devices=n), space)
        if found is not None:
            return n, found
    return None


def smallest_feasible_batch(
    w: Workload, cluster: Cluster, space: SearchSpace, limit_factor: int = 8
) -> tuple[int, Candidate] | None:
    """The smallest global batch (up to limit_factor x the request or the device count) with
    a layout that fits. None at once when even a model state sharded over every device
    (16 bytes per parameter / devices) exceeds the budget: no batch changes that."""
    from gpt3d.model import count_params_formula

    if 16 * count_params_formula(w.model) / cluster.n_devices > cluster.memory_budget:
        return None
    top = max(w.global_batch, cluster.n_devices) * limit_factor
    for g in range(1, top + 1):
        if g == w.global_batch:
            continue
        found = first_fit(replace(w, global_batch=g), cluster, space)
        if found is not None:
            return g, found
    return None
