"""Layout planner: for a model, a cluster and a batch, rank every valid layout by predicted
memory and step time.

    from gpt3d.planner import Cluster, Workload, get_profile, plan, format_report
    w = Workload.from_preset("gpt2-xl", seq_len=1024, global_batch=512, dtype="bfloat16")
    result = plan(w, Cluster(32, 8, get_profile("h100")))
    print(format_report(result))

Modules: hardware (device profiles, links, the cluster), layout (Workload, Layout, the search
space, gpt3d's validation, the torchrun command), schedules (pipeline bubble and residency),
memory (MemoryBreakdown and the analytic estimator), cost (TimeBreakdown and the cost model),
search (enumerate, score, rank, smallest feasible cluster/batch), report (the table),
calibrate (measure a CPU profile). recipes/plan.py is the command line.
"""

from gpt3d.planner.cost import TimeBreakdown, estimate_time
from gpt3d.planner.hardware import Cluster, HardwareProfile, Link, get_profile, load_profile
from gpt3d.planner.layout import Layout, SearchSpace, Workload, gpt3d_layout_error
from gpt3d.planner.memory import MemoryBreakdown, estimate_memory, memory_by_rank
from gpt3d.planner.report import format_report
from gpt3d.planner.search import Candidate, PlanResult, plan

__all__ = [
    "Candidate",
    "Cluster",
    "HardwareProfile",
    "Layout",
    "Link",
    "MemoryBreakdown",
    "PlanResult",
    "SearchSpace",
    "TimeBreakdown",
    "Workload",
    "estimate_memory",
    "estimate_time",
    "format_report",
    "get_profile",
    "gpt3d_layout_error",
    "load_profile",
    "memory_by_rank",
    "plan",
]
