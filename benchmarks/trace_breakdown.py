"""Where a training step's time goes, from the torch.profiler traces of every rank of one
launch (benchmarks/worker.py with "profile": n; read by bench_breakdown.py).

Every microsecond of a step (a `bench_step#<i>` range on the training thread) gets exactly
one label, from the event tree of that thread:
  wait     `c10d::wait` (Work.wait) or `_c10d_functional::wait_tensor`: the thread is blocked
           on the transfer it waits for (matched on this rank by end time). The part before
           the last participant joined that transfer is pipeline idle (pp axis: a stage
           waits for its input or gradient) or peer wait (other axes: a slower peer); the
           rest is exposed communication of the transfer's axis.
  launch   any other `c10d::*` / `_c10d_functional::*` op: exposed communication.
  compute  an aten op (with everything under it); `compute_wrappers` when it runs inside
           FSDP's hooks or a DTensor redistribute (copies, casts the model does not need).
  overhead the rest: self time of the enclosing events, named after the innermost one:
           dtensor (PythonSubclass, redistribute), fsdp (FSDP hooks), loss (gpt3d's
           cross-entropy outside its aten ops), autograd (engine and backward nodes),
           python (module calls, the pipeline schedule, the trainer; gaps).
Transfers come from gloo: its worker threads (two per process group, told apart by the
worker's `bench_calibrate#<axis>#<group>` ranges) run the collectives; gloo:send/recv spans
on the training thread are the pipeline's p2p. Partners are matched across ranks (the k-th
collective of a process group, the k-th message of a rank pair) to find when the last one
joined. A collective's busy time runs from that join to its end on the worker thread; the
part of it during which the training thread was not blocked is overlapped. A p2p span ends
when its work is waited for, not when its bytes land, so p2p gets bytes and exposure only.
Axes: dp (dp_shard, dp_replicate), tp, pp, and two purposes: tied (the tied-embedding
exchange, `phase:tied`) and other (collectives outside forward/backward: loss, grad norm).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SHOWN = {"dp_shard": "dp", "dp_replicate": "dp", "tp": "tp", "pp": "pp"}  # mesh axis -> column
WAITS = {"c10d::wait", "_c10d_functional::wait_tensor"}
WRAPPERS = re.compile(r"^(FSDP::|fsdp::|Redistribute|NestedRedistribute)")
OVERHEAD_KINDS = [
    (
        re.compile(
            r"^(PythonSubclass|Redistribute|NestedRedistribute|_ToTorchTensor|"
            r"_FromTorchTensor|_c10d_functional::_wrap_tensor_autograd)"
        ),
        "dtensor",
    ),
    (re.compile(r"^(FSDP::|fsdp::|RegisterPostBackwardFunction)"), "fsdp"),
    (re.compile(r"^_VocabCrossEntropy"), "loss"),
    (re.compile(r"^(autograd::|torch::autograd::|\w+Backward\d*$)"), "autograd"),
]
MERGE_US = 1000.0  # a wait may return up to 1 ms after its transfer ends (thread wake-up)
LAUNCH_US = 20000.0  # a gloo worker may start a collective up to 20 ms after its launch
NOT_LAUNCH = {"_c10d_functional::_wrap_tensor_autograd"}  # DTensor's wrapping of a result


def is_launch(name: str) -> bool:
    return name.startswith(("c10d::", "_c10d_functional::")) and name not in NOT_LAUNCH | WAITS


@dataclass
class Op:
    """One transfer on this rank: a gloo collective or one p2p message."""

    start: float
    end: float
    thread: int | str
    kind: str  # gloo event name
    axis: str = "unmapped"
    peer: int | None = None  # p2p: the other global rank
    pg: str = "p2p"  # the process group (collectives: from the calibration ranges)
    nbytes: int = 0  # this rank's input tensor
    join: float = 0.0  # when the last participant started (set by match_ops)
    purpose: str = "axis"  # axis, tied, other


@dataclass
class Rank:
    rank: int
    groups: dict
    steps: list  # bench_step events
    events: list  # training-thread X events, gloo spans excluded, sorted
    phases: list  # (name, start, end)
    ops: list = field(default_factory=list)


def load_rank(trace: Path, record: dict) -> Rank:
    doc = json.loads(trace.read_text())
    xs = [e for e in doc["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    steps = sorted((e for e in xs if e["name"].startswith("bench_step#")), key=lambda e: e["ts"])
    tid = steps[0]["tid"]
    main = sorted(
        (e for e in xs if e["tid"] == tid and not e["name"].startswith("gloo:")),
        key=lambda e: (e["ts"], -e["dur"]),
    )
    phases = [
        (e["name"], e["ts"], e["ts"] + e["dur"]) for e in main if e["name"].startswith("phase:")
    ]
    r = Rank(record["rank"], record.get("groups", {}), steps, main, phases)
    r.ops = _ops(xs, tid, r)
    return r


def _ops(xs: list, tid, r: Rank) -> list[Op]:
    """Transfers of this rank with their axis: worker threads mapped by the calibration
    ranges, p2p messages with their peer from the c10d::send / recv_ that posted them."""
    threads = {}  # gloo worker thread -> (mesh axis, process group)
    for cal in (e for e in xs if e["name"].startswith("bench_calibrate#")):
        _, axis, pg = cal["name"].split("#")
        for e in xs:
            inside = cal["ts"] <= e["ts"] <= cal["ts"] + cal["dur"]
            if e["tid"] != tid and e["name"].startswith("gloo:") and inside:
                threads[e["tid"]] = (axis, pg)
    posts = sorted(
        (e for e in xs if e["tid"] == tid and e["name"] in ("c10d::send", "c10d::recv_")),
        key=lambda e: e["ts"],
    )
    pp_ranks = r.groups.get("pp", {}).get("ranks", [])
    ops = []
    for e in xs:
        if not e["name"].startswith("gloo:") or e["name"] == "gloo:barrier":
            continue
        op = Op(e["ts"], e["ts"] + e["dur"], e["tid"], e["name"], nbytes=_nbytes(e))
        if e["tid"] == tid:  # a p2p span: posted by the c10d op that ends where it starts
            post = min(posts, key=lambda p: abs(p["ts"] + p["dur"] - e["ts"]))
            peer = int(post["args"]["Concrete Inputs"][2])
            op.axis, op.peer = "pp", pp_ranks[peer] if pp_ranks else peer
        else:
            op.axis, op.pg = threads.get(e["tid"], ("unmapped", f"thread{e['tid']}"))
        ops.append(op)
    for op in ops:
        op.join = op.start
        op.purpose = _purpose(r.phases, op.start)
    return sorted(ops, key=lambda o: o.start)


ITEM = {"float": 4, "double": 8, "c10::BFloat16": 2, "c10::Half": 2, "long int": 8, "int": 4}


def _nbytes(e: dict) -> int:
    """Bytes of the first input of a gloo event (record_shapes)."""
    args = e.get("args", {})
    dims, kind = (args.get("Input Dims") or [[]])[0], (args.get("Input type") or [""])[0]
    n = 1
    for d in dims:
        n *= d if isinstance(d, int) else 1
    return n * ITEM.get(kind, 1) if dims else 0


def _purpose(phases: list, t: float) -> str:
    for name, a, b in phases:
        if a <= t <= b:
            return "tied" if name == "phase:tied" else "axis"
    return "other"


def match_ops(ranks: dict[int, Rank]) -> int:
    """Set each transfer's join time from its partners on the other ranks; returns how many
    transfers found no partner (their join stays their own start)."""
    unmatched = 0
    # collectives: the k-th of a process group on each of its members (names are global)
    seqs = defaultdict(lambda: defaultdict(list))
    for r in ranks.values():
        for o in r.ops:
            if o.peer is None and not o.pg.startswith("thread"):
                seqs[o.pg][r.rank].append(o)
    for members in seqs.values():
        lengths = {len(v) for v in members.values()}
        if len(lengths) != 1:
            unmatched += sum(len(v) for v in members.values())
            continue
        for k in range(lengths.pop()):
            join = max(v[k].start for v in members.values())
            for v in members.values():
                v[k].join = join
    # p2p: the k-th message from a to b on both sides
    sends, recvs = defaultdict(list), defaultdict(list)
    for r in ranks.values():
        for o in r.ops:
            if o.peer is not None:
                (sends if o.kind == "gloo:send" else recvs)[
                    (r.rank, o.peer) if o.kind == "gloo:send" else (o.peer, r.rank)
                ].append(o)
    for pair in set(sends) | set(recvs):
        s, v = sends.get(pair, []), recvs.get(pair, [])
        unmatched += abs(len(s) - len(v))
        for a, b in zip(s, v, strict=False):
            a.join = b.join = max(a.start, b.start)
    return unmatched


# ---- one rank's steps ----------------------------------------------------------------------
def column(op: Op | None) -> str:
    """The communication column of a transfer: its purpose, else its axis."""
    if op is None:
        return "unmapped"
    return op.purpose if op.purpose != "axis" else SHOWN.get(op.axis, op.axis)


def awaited(r: Rank, a: float, b: float) -> Op | None:
    """The transfer a wait [a, b] waited for: the one ending closest to b (up to MERGE_US
    after it); else the last one that ended before the wait (it returned at once)."""
    ending = [o for o in r.ops if a <= o.end <= b + MERGE_US]
    if ending:
        return min(ending, key=lambda o: abs(o.end - b))
    done = [o for o in r.ops if o.end < a]
    return max(done, key=lambda o: o.end) if done else None


def launched(r: Rank, a: float, b: float) -> Op | None:
    """The transfer a launch op [a, b] started: the first one starting at or after a."""
    later = [o for o in r.ops if a <= o.start <= b + LAUNCH_US]
    return min(later, key=lambda o: o.start) if later else None


def tree(events: list) -> list:
    """[(event, children)] from events sorted by (start, -duration); a child is clipped to
    its parent (the training thread's ranges nest)."""
    root: list = []
    stack: list = []
    for e in events:
        a, b = e["ts"], e["ts"] + e["dur"]
        while stack and a >= stack[-1][1]:
            stack.pop()
        if stack:
            b = min(b, stack[-1][1])
        node = ({**e, "dur": b - a}, [])
        (stack[-1][2] if stack else root).append(node)
        stack.append((a, b, node[1]))
    return root


def overhead_kind(names: list[str]) -> str:
    for name in reversed(names):  # innermost first
        for pattern, kind in OVERHEAD_KINDS:
            if pattern.match(name):
                return kind
    return "python"


class StepLabels:
    """Label every microsecond of one step on one rank (see the module docstring)."""

    def __init__(self, r: Rank):
        self.r, self.time, self.aten = r, defaultdict(float), defaultdict(float)
        self.blocked: list = []  # (start, end) of waits and launches

    def node(self, node, names: list[str], in_wrapper: bool) -> None:
        e, children = node
        name, a, b = e["name"], e["ts"], e["ts"] + e["dur"]
        if name in WAITS:
            return self.wait(a, b)
        if is_launch(name):
            self.blocked.append((a, b))
            self.time["comm:" + column(launched(self.r, a, b))] += b - a
            return None
        if name.startswith("aten::") and not _has_comm(children):
            self.time["compute_wrappers" if in_wrapper else "compute"] += b - a
            self.aten[name] += b - a
            return None
        inner = in_wrapper or bool(WRAPPERS.match(name))
        for child in children:
            self.node(child, [*names, name], inner)
        own = b - a - sum(c[0]["dur"] for c in children)
        if name.startswith("aten::"):
            self.time["compute_wrappers" if in_wrapper else "compute"] += own
        else:
            self.time["overhead:" + overhead_kind([*names, name])] += own

    def wait(self, a: float, b: float) -> None:
        self.blocked.append((a, b))
        op = awaited(self.r, a, b)
        skew = 0.0
        if op is not None:
            skew = max(0.0, min(b, op.join) - max(a, op.start))
            idle = "idle:pipeline" if op.axis == "pp" else "idle:peer"
            self.time[idle] += skew
        self.time["comm:" + column(op)] += b - a - skew


def _has_comm(children: list) -> bool:
    return any(
        c[0]["name"] in WAITS or is_launch(c[0]["name"]) or _has_comm(c[1]) for c in children
    )


def union(intervals: list) -> list:
    out: list = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def minus(intervals: list, cut: list) -> float:
    """Length of union(intervals) outside union(cut)."""
    total = 0.0
    cut = union(cut)
    for a, b in union(intervals):
        total += b - a
        for c, d in cut:
            total -= max(0.0, min(b, d) - max(a, c))
    return total


# ---- a launch: every rank, every profiled step ------------------------------------------
def step_breakdown(r: Rank, step: dict) -> dict:
    """ms per label, communication busy and overlapped ms per column, phase walls."""
    a, b = step["ts"], step["ts"] + step["dur"]
    labels = StepLabels(r)
    root = tree([e for e in r.events if a <= e["ts"] < b])[0]  # the bench_step range
    labels.node(root, [], False)
    spans, moved = defaultdict(list), defaultdict(float)
    for o in r.ops:
        if a <= o.start < b and o.kind != "gloo:recv":  # bytes sent or handed to a collective
            moved[column(o)] += o.nbytes / 2**20
        lo, hi = max(a, o.join), min(b, o.end)
        if hi > lo and o.peer is None:  # a p2p span ends when its work is waited for
            spans[column(o)].append((lo, hi))
    phases = defaultdict(float)
    for e in r.events:
        if a <= e["ts"] < b and (e["name"].startswith(("phase:", "Optimizer.step#"))):
            phases[e["name"].split("#")[0]] += e["dur"]
    ms = 1e-3
    return {
        "wall": step["dur"] * ms,
        "time": {k: v * ms for k, v in labels.time.items()},
        "busy": {k: sum(y - x for x, y in union(v)) * ms for k, v in spans.items()},
        "overlapped": {k: minus(v, labels.blocked) * ms for k, v in spans.items()},
        "phases": {k: v * ms for k, v in phases.items()},
        "MiB": dict(moved),
        "aten": {k: v * ms for k, v in labels.aten.items()},
        "residual": (step["dur"] - sum(labels.time.values())) * ms,
    }


def mean_dicts(ds: list[dict]) -> dict:
    keys = sorted({k for d in ds for k in d})
    return {k: sum(d.get(k, 0.0) for d in ds) / len(ds) for k in keys}


def analyze(case_dir: Path, top: int = 8) -> dict:
    """{"ranks": [per-rank means over the profiled steps], "unmatched": transfers without a
    partner} for one case directory of benchmarks/worker.py (rank*.json, trace_rank*.json)."""
    records = {int(p.stem[4:]): json.loads(p.read_text()) for p in case_dir.glob("rank*.json")}
    ranks = {i: load_rank(case_dir / f"trace_rank{i}.json", rec) for i, rec in records.items()}
    unmatched = match_ops(ranks)
    out = []
    for i in sorted(ranks):
        steps = [step_breakdown(ranks[i], s) for s in ranks[i].steps]
        row = {
            k: mean_dicts([s[k] for s in steps])
            for k in ("time", "busy", "overlapped", "phases", "aten", "MiB")
        }
        row["aten"] = dict(sorted(row["aten"].items(), key=lambda kv: -kv[1])[:top])
        row.update(
            rank=i,
            wall=sum(s["wall"] for s in steps) / len(steps),
            residual=max(abs(s["residual"]) for s in steps),
            unprofiled_step_ms=1e3 * sorted(records[i]["step_s"])[len(records[i]["step_s"]) // 2],
            layout=records[i]["layout"],
        )
        out.append(row)
    return {"ranks": out, "unmatched": unmatched}
