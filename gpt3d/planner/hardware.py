"""Hardware profiles (datasheet numbers, or measured on CPU) and the cluster they form.

A profile gives one device's dense peak FLOP/s per dtype, its memory and memory bandwidth,
and two links: `intra` (inside a node: NVLink / PCIe) and `inter` (between nodes: InfiniBand /
Ethernet). A link holds the *effective bus bandwidth* of each collective (NCCL-tests
"busbw" convention: time = latency + factor * bytes / busbw with factor 2(n-1)/n for
all-reduce, (n-1)/n for all-gather and reduce-scatter, 1 for send/recv).

GPU links are the datasheet's one-direction bandwidth times COMM_EFFICIENCY; the `cpu`
profile has no built-in numbers: `recipes/plan.py --calibrate` measures them
(gpt3d/planner/calibrate.py) and saves a JSON profile that `--profile FILE` loads.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

GB = 1e9  # link and memory bandwidths are in GB/s (1e9 bytes/s), as datasheets state them
GiB = 2**30
COMM_EFFICIENCY = 0.8  # NCCL reaches ~80 % of the link in all-reduce busbw (nccl-tests, H100/A100)
GPU_COMPUTE_EFFICIENCY = 0.5  # well-tuned LLM training reaches 40-55 % MFU; an assumption


@dataclass(frozen=True)
class Link:
    """Effective bus bandwidths in GB/s per collective, and a fixed cost per call (seconds)."""

    all_reduce: float
    all_gather: float
    reduce_scatter: float
    p2p: float
    latency_s: float = 10e-6

    @classmethod
    def uniform(cls, gbps: float, latency_s: float) -> Link:
        return cls(gbps, gbps, gbps, gbps, latency_s)

    def time(self, op: str, n: int, nbytes: float) -> float:
        """Seconds for one collective over n ranks; nbytes is the full (unsharded) tensor
        for all_gather / reduce_scatter, the tensor itself for all_reduce and p2p."""
        if n <= 1 or nbytes <= 0:
            return 0.0
        factor = {"all_reduce": 2 * (n - 1) / n, "p2p": 1.0}.get(op, (n - 1) / n)
        return self.latency_s + factor * nbytes / (getattr(self, op) * GB)


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_tflops: dict = field(default_factory=dict)  # dtype name -> dense TFLOP/s per device
    mem_gib: float = 80.0  # device memory (GPU: what the driver reports; CPU: the node's RAM)
    mem_gbps: float = 1000.0  # memory bandwidth (bounds the optimizer step)
    intra: Link = field(default_factory=lambda: Link.uniform(100.0, 10e-6))
    inter: Link = field(default_factory=lambda: Link.uniform(10.0, 25e-6))
    compute_efficiency: float = GPU_COMPUTE_EFFICIENCY  # achieved / peak in model matmuls
    comm_overlap: float = 1.0  # share of compute time that can hide FSDP/DDP traffic
    shared_memory: bool = False  # CPU: mem_gib is shared by the processes of a node
    cores: int = 0  # CPU: cores per node; processes beyond it time-slice
    source: str = ""
    # CPU (--calibrate): gloo's collectives measured with twice as many processes as cores,
    # used when a node runs more processes than it has cores (time-sliced peers answer late)
    crowded: Link | None = None
    # CPU (--calibrate): framework seconds per step / block / action (gpt3d/planner/overheads.py)
    overhead_s: dict = field(default_factory=dict)
    efficiency_alone: float = 0.0  # CPU: compute_efficiency of one process on an idle node

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.peak_tflops:
            raise ValueError(f"profile {self.name!r} has no peak for {dtype}; use --profile")
        return self.peak_tflops[dtype] * 1e12

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, d: dict) -> HardwareProfile:
        links = {k: Link(**d[k]) for k in ("intra", "inter", "crowded") if d.get(k)}
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"hardware profile: unknown keys {sorted(unknown)}")
        return cls(**{**d, **links})


def _gpu(name, bf16, fp32, mem_gib, mem_gbps, nvlink, network, source) -> HardwareProfile:
    """A GPU from datasheet numbers; nvlink/network are one-direction GB/s per GPU."""
    e = COMM_EFFICIENCY
    return HardwareProfile(
        name=name,
        peak_tflops={"bfloat16": bf16, "float32": fp32},
        mem_gib=mem_gib,
        mem_gbps=mem_gbps,
        intra=Link.uniform(nvlink * e, 10e-6),  # NCCL small-message latency inside a node
        inter=Link.uniform(network * e, 25e-6),  # and across an InfiniBand fabric
        source=source,
    )


# Dense (no 2:4 sparsity) tensor-core bf16 and plain fp32 TFLOP/s; memory in GiB as the driver
# reports it (nvidia-smi MiB / 1024); NVLink is the datasheet's total / 2 (one direction);
# network is the per-GPU NIC of the vendor's reference system (DGX / HGX / OVX).
PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        # NVIDIA H100 datasheet (SXM5): BF16 1979 TF sparse -> 989; FP32 67; 80 GB HBM3 at
        # 3.35 TB/s; NVLink 900 GB/s; DGX H100: 8x ConnectX-7 400 Gb/s = 50 GB/s per GPU.
        _gpu("h100", 989.0, 67.0, 79.6, 3350, 450, 50, "NVIDIA H100 SXM5 datasheet, DGX H100"),
        # H100 PCIe: BF16 756 dense, FP32 51, 2.0 TB/s; GPUs talk over PCIe Gen5 x16 (64 GB/s).
        _gpu("h100-pcie", 756.0, 51.0, 79.6, 2000, 64, 50, "NVIDIA H100 PCIe datasheet"),
        # H200 SXM: same compute as H100 SXM, 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s,
        # DGX H200: 8x 400 Gb/s.
        _gpu("h200", 989.0, 67.0, 140.4, 4800, 450, 50, "NVIDIA H200 datasheet, DGX H200"),
        # A100 SXM4: BF16 624 TF sparse -> 312; FP32 19.5; NVLink3 600 GB/s; DGX A100:
        # 8x ConnectX-6 200 Gb/s = 25 GB/s per GPU. 80 GB at 2.04 TB/s, 40 GB at 1.56 TB/s.
        _gpu("a100-80gb", 312.0, 19.5, 80.0, 2039, 300, 25, "NVIDIA A100 datasheet, DGX A100"),
        _gpu("a100-40gb", 312.0, 19.5, 40.0, 1555, 300, 25, "NVIDIA A100 datasheet, DGX A100"),
        # L40S: BF16 362 dense, FP32 91.6, 48 GB GDDR6 at 864 GB/s, no NVLink: PCIe Gen4 x16
        # (32 GB/s); OVX reference: one 400 Gb/s NIC per 2 GPUs = 25 GB/s per GPU.
        _gpu("l40s", 362.0, 91.6, 45.0, 864, 32, 25, "NVIDIA L40S datasheet, OVX L40S"),
        # B200 (HGX B200): BF16 2.25 PF dense, FP32 ~80 (approximate), 180 GB HBM3e at
        # 8 TB/s, NVLink5 1.8 TB/s; DGX B200: 8x 400 Gb/s.
        _gpu("b200", 2250.0, 80.0, 179.0, 8000, 900, 50, "NVIDIA HGX/DGX B200 datasheet"),
    )
}
ALIASES = {"h100-sxm": "h100", "a100": "a100-80gb", "h200-sxm": "h200"}


def get_profile(name: str) -> HardwareProfile:
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        raise ValueError(
            "the cpu profile is measured: run with --calibrate (saves a JSON profile), "
            "or pass --profile FILE from an earlier --calibrate"
        )
    if key not in PROFILES:
        raise ValueError(f"unknown GPU {name!r}; choose one of {sorted(PROFILES)} or cpu")
    return PROFILES[key]


def load_profile(path: str | Path) -> HardwareProfile:
    return HardwareProfile.from_dict(json.loads(Path(path).read_text()))


def save_profile(profile: HardwareProfile, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile.to_json() + "\n")
    return path


def override(profile: HardwareProfile, **changes) -> HardwareProfile:
    """The profile with CLI overrides (None = keep): mem_gib, intra_gbps, inter_gbps,
    compute_efficiency."""
    intra, inter = changes.pop("intra_gbps", None), changes.pop("inter_gbps", None)
    kept = {k: v for k, v in changes.items() if v is not None}
    if "compute_efficiency" in kept:
        kept["efficiency_alone"] = 0.0  # the override holds for every process count
    if intra is not None:
        kept["intra"] = Link.uniform(intra, profile.intra.latency_s)
    if inter is not None:
        kept["inter"] = Link.uniform(inter, profile.inter.latency_s)
    return replace(profile, **kept)


@dataclass(frozen=True)
class Cluster:
    """n_devices processes, per_node on each node, all of one hardware profile."""

    n_devices: int
    per_node: int
    hw: HardwareProfile
    usable_fraction: float = 0.9  # of device memory: CUDA context, NCCL buffers, fragmentation

    def __post_init__(self):
        if self.n_devices < 1 or self.per_node < 1:
            raise ValueError("--gpus and --gpus-per-node must be >= 1")

    @property
    def nodes(self) -> int:
        return -(-self.n_devices // self.per_node)

    @property
    def memory_budget(self) -> float:
        """Bytes one rank may use."""
        per_rank = self.hw.mem_gib / (
            min(self.per_node, self.n_devices) if self.hw.shared_memory else 1
        )
        return per_rank * GiB * self.usable_fraction

    @property
    def compute_share(self) -> float:
        """Fraction of a device each process gets (CPU: cores shared when oversubscribed)."""
        if not self.hw.cores:
            return 1.0
        return min(1.0, self.hw.cores / min(self.per_node, self.n_devices))

    @property
    def comm_share(self) -> float:
        """What communication times are divided by: the compute share, except when the link
        was itself measured crowded (time-slicing is already in its numbers)."""
        return 1.0 if self.crowded and self.hw.crowded is not None else self.compute_share

    @property
    def crowded(self) -> bool:
        """More processes on a node than cores (CPU): peers are time-sliced."""
        return bool(self.hw.cores) and min(self.per_node, self.n_devices) > self.hw.cores

    @property
    def efficiency(self) -> float:
        """Achieved / peak FLOP/s: CPU nodes running fewer processes than cores reach the
        single-process figure (no neighbour shares caches and memory bandwidth)."""
        alone = self.hw.efficiency_alone and min(self.per_node, self.n_devices) < self.hw.cores
        return self.hw.efficiency_alone if alone else self.hw.compute_efficiency

    def link(self, stride: int, size: int) -> Link:
        """The link a mesh axis uses: ranks base + k*stride (k < size) stay in one node when
        the group's span tiles a node; otherwise its ring crosses the network."""
        if self.crowded and self.hw.crowded is not None:
            return self.hw.crowded
        span = stride * size
        inside = span <= self.per_node and self.per_node % span == 0
        return self.hw.intra if inside or self.nodes == 1 else self.hw.inter
