"""The planner's printed report: header, ranked table, commands, what was rejected and why."""

from __future__ import annotations

from gpt3d.planner.hardware import GiB
from gpt3d.planner.layout import PLANNER_RULES, torchrun_command
from gpt3d.planner.search import Candidate, PlanResult

LAYOUT_HEAD = "  #  dp    dp_r dp_s pp tp sp schedule            m  mbs   ga AC   "
MEMORY = ("params", "grads", "optim", "act", "temp", "total")
TIME = ("compute", "tp", "bubble", "pp", "dp", "optim", "step")


def table_head() -> list[str]:
    mem = " ".join(f"{h:>6}" for h in MEMORY) + "  fits      "
    time = " ".join(f"{h:>7}" for h in TIME)
    groups = (
        f"{'':{len(LAYOUT_HEAD)}}| {'GiB per rank (the fullest)':{len(mem)}}"
        f"| {'ms per optimizer step (the slowest rank)':{len(time)}} |"
    )
    return [groups, f"{LAYOUT_HEAD}| {mem}| {time} |     tok/s    MFU"]


def header(r: PlanResult) -> list[str]:
    w, c, hw = r.workload, r.cluster, r.cluster.hw
    m = w.model
    n = m.n_layer * (12 * m.n_embd**2) + m.padded_vocab_size * m.n_embd
    return [
        f"model: {m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads, vocab "
        f"{m.padded_vocab_size} (~{n / 1e9:.2f} B matmul params); seq {w.seq_len}, global "
        f"batch {w.global_batch} ({w.tokens:,} tokens/step), {w.dtype}",
        f"cluster: {c.n_devices} x {hw.name} ({c.nodes} node(s) x {min(c.per_node, c.n_devices)}); "
        f"budget {c.memory_budget / GiB:.1f} GiB per rank ({c.usable_fraction:.0%} of "
        f"{hw.mem_gib:g} GiB{' shared by a node' if hw.shared_memory else ''}); peak "
        f"{hw.peak_flops(w.dtype) / 1e12:.4g} TFLOP/s x efficiency {hw.compute_efficiency:.2f}; "
        f"all-reduce busbw intra {hw.intra.all_reduce:.3g} GB/s, inter "
        f"{hw.inter.all_reduce:.3g} GB/s",
        f"searched {r.enumerated:,} layouts: {len(r.candidates):,} valid by gpt3d's rules, "
        f"{len(r.feasible):,} fit in memory",
    ] + _oversubscribed(r)


def _oversubscribed(r: PlanResult) -> list[str]:
    c = r.cluster
    if c.compute_share >= 1:
        return []
    return [
        f"note: {min(c.per_node, c.n_devices)} processes share {c.hw.cores} cores: rates are "
        "divided accordingly, but time-slicing overheads are not modelled (optimistic)"
    ]


def row(i: int, r: PlanResult, c: Candidate) -> str:
    lay, mem, t = c.layout, c.memory, c.time
    layout = (
        f"{i:3d}  {lay.dp_kind:5s} {lay.dp_replicate:4d} {lay.dp_shard:4d} {lay.pp:2d} "
        f"{lay.tp:2d} {'y' if lay.sequence_parallel else '-':>2} {lay.schedule_name():18s} "
        f"{lay.microbatches:2d} {lay.microbatch_size(r.workload.global_batch):4d} "
        f"{lay.grad_accum:4d} {lay.ac[:4]:5s}"
    )
    gib = (mem.params, mem.grads, mem.optimizer, mem.activations, mem.temporaries, mem.total)
    fits = "yes" if c.fits else f"+{c.over_by / GiB:.1f} GiB"
    parts = (t.compute, t.tp_comm, t.pp_bubble, t.pp_comm, t.dp_comm, t.optimizer, t.step)
    return (
        f"{layout}| "
        + " ".join(f"{x / GiB:6.2f}" for x in gib)
        + f"  {fits:10s}| "
        + " ".join(_ms(x) for x in parts)
        + f" | {r.tokens_per_s(c):9,.0f} {100 * r.mfu(c):5.1f}%"
    )


def _ms(seconds: float) -> str:
    ms = 1e3 * seconds
    return f"{'-':>7}" if ms == 0 else f"{ms:7.1f}" if ms >= 10 else f"{ms:7.3f}"


def format_report(r: PlanResult, top: int = 15, commands: int = 3) -> str:
    lines = header(r) + [""]
    if not r.candidates:
        lines.append("no valid layout for this request (see the rejections below)")
    else:
        lines += table_head()
        lines += [row(i + 1, r, c) for i, c in enumerate(r.candidates[:top])]
        lines += [
            "",
            "dp_r/dp_s = dp_replicate/dp_shard; m = pipeline microbatches, mbs = sequences per "
            "microbatch, ga = grad_accum; ranked by step time (within 1 %: less memory first)",
        ]
    lines += _commands(r, commands) + _infeasible(r) + _rejected(r)
    lines += ["", "validity: gpt3d's own layout checks, plus the planner's rules:"]
    lines += [f"  - {rule}" for rule in PLANNER_RULES]
    return "\n".join(lines)


def _commands(r: PlanResult, n: int) -> list[str]:
    """The best entry of each of the top n distinct meshes (degrees, dp mode, schedule)."""
    best, seen = [], set()
    for i, c in enumerate(r.feasible, 1):
        lay = c.layout
        key = (lay.pp, lay.dp_replicate, lay.dp_shard, lay.tp, lay.dp_mode, lay.schedule_name())
        if key not in seen and len(best) < n:
            seen.add(key)
            best.append((i, c))
    if not best:
        return []
    out = ["", f"commands (the best entry of the top {len(best)} distinct meshes):"]
    for i, c in best:
        out.append(f"  #{i}: {torchrun_command(r.workload, c.layout, r.cluster.per_node)}")
    return out


def _infeasible(r: PlanResult) -> list[str]:
    if r.feasible:
        return []
    out = ["", f"nothing fits on {r.cluster.n_devices} x {r.cluster.hw.name}:"]
    if r.candidates:
        c = r.candidates[0]
        out.append(
            f"  closest: layout #1 needs {c.memory.total / GiB:.1f} GiB per rank, "
            f"{c.over_by / GiB:.1f} GiB over the budget"
        )
    if r.smallest_cluster:
        n, c = r.smallest_cluster
        out.append(
            f"  smallest feasible cluster: {n} x {r.cluster.hw.name} (e.g. "
            f"{_describe(c)}, {c.memory.total / GiB:.1f} GiB per rank)"
        )
    if r.smallest_batch:
        g, c = r.smallest_batch
        out.append(
            f"  smallest feasible global batch on this cluster: {g} sequences (e.g. {_describe(c)})"
        )
    if not (r.smallest_cluster or r.smallest_batch):
        out.append("  no cluster size or batch tried makes it fit")
    return out


def _describe(c: Candidate) -> str:
    lay = c.layout
    return (
        f"pp={lay.pp} dp_replicate={lay.dp_replicate} dp_shard={lay.dp_shard} tp={lay.tp} "
        f"{lay.schedule_name()} m={lay.microbatches} ga={lay.grad_accum} ac={lay.ac}"
    )


def _rejected(r: PlanResult) -> list[str]:
    if not r.rejected:
        return []
    out = ["", f"rejected by gpt3d's checks: {sum(r.rejected.values()):,} layouts; most common:"]
    out += [f"  {n:6,d} x {reason}" for reason, n in r.rejected.most_common(4)]
    return out
