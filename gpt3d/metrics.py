"""Throughput, MFU, memory, the metrics.jsonl / TensorBoard writers and the loss-curve plot."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gpt3d.errors import missing_extra
from gpt3d.host_memory import peak_rss_gib
from gpt3d.model import GPTConfig, count_params_formula

# Peak dense bf16 TFLOP/s per device (vendor datasheets, without sparsity).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; PCIe is 756
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "V100": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def flops_per_token(cfg: GPTConfig, seq_len: int) -> float:
    """Training FLOPs per token (PaLM appendix B / nanoGPT): 6N + 12·L·C·T.

    N counts every parameter that takes part in a matmul: position embeddings are a lookup,
    so they are left out; a tied wte/lm_head counts once (its matmul is the lm_head); a MoE
    block counts its router and the top-k experts a token uses (the active parameters)."""
    n = count_params_formula(cfg, active=True) - cfg.block_size * cfg.n_embd
    return 6 * n + 12 * cfg.n_layer * cfg.n_embd * seq_len


@dataclass(frozen=True)
class Peak:
    """Peak dense FLOP/s of one device for MFU, and where the number comes from."""

    flops: float
    source: str


def device_peak(device: torch.device, dtype: torch.dtype, configured_tflops: float = 0.0):
    """metrics.peak_tflops when set; on a GPU the datasheet table by name; on a CPU the
    matmul peak measured here, now, for this dtype and thread count (~0.3 s)."""
    if configured_tflops > 0:
        return Peak(configured_tflops * 1e12, f"metrics.peak_tflops = {configured_tflops}")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return Peak(tflops * 1e12, f"the {key} datasheet ({tflops:.0f} TFLOP/s bf16)")
        print(f"warning: no peak FLOP/s for {name!r}; set metrics.peak_tflops", file=sys.stderr)
        return Peak(float("nan"), f"unknown ({name})")
    flops = matmul_peak_flops(dtype, n=512, seconds=0.3)
    kind = str(dtype).removeprefix("torch.")
    threads = torch.get_num_threads()
    return Peak(
        flops,
        f"{flops / 1e9:.0f} GFLOP/s, the {kind} matmul peak measured on this "
        f"CPU with {threads} thread{'s' * (threads > 1)}",
    )


def matmul_peak_flops(dtype=torch.float32, n: int = 1024, seconds: float = 1.0, device="cpu"):
    """Measured dense matmul FLOP/s of this device (best of three timed windows): the
    realistic ceiling for MFU on a CPU, where no datasheet number applies."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    for _ in range(3):
        a @ b
        _sync(device)
        t0, k = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds / 3:
            a @ b
            k += 1
        _sync(device)
        best = max(best, 2 * n**3 * k / (time.perf_counter() - t0))
    return best


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def progress_meter(run, env, log, writer: MetricsWriter) -> ProgressMeter:
    """The ProgressMeter of a run on this process's device (MFU over all world_size devices);
    logs once what the MFU is measured against."""
    t, m = run.config.training, run.config.metrics
    tokens = t.global_batch_size * t.seq_len
    flops = flops_per_token(run.model, t.seq_len) * tokens
    dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    peak = device_peak(env.device, dtype, m.peak_tflops)
    memory = "peak GPU memory allocated" if env.device.type == "cuda" else "peak RSS"
    log(f"mfu is against {peak.source}, per process; mem is the {memory} of the fullest rank")
    return ProgressMeter(log, writer, t, tokens, flops, peak.flops * env.world_size, env.device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated device memory (GPU) or peak resident set size of this process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gib()


def memory_record(device: torch.device) -> dict[str, float]:
    """Per logged step: this rank's peak memory and the maximum over all ranks (collective:
    every rank calls it), plus the CUDA caching allocator's reserved peak on a GPU.
    memory_gib is peak device memory allocated on a GPU, peak resident set size on a CPU."""
    mine = peak_memory_gib(device)
    values = [mine, torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else 0]
    if torch.distributed.is_initialized():  # NCCL reduces CUDA tensors only; gloo takes CPU
        t = torch.tensor(values, device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        values = t.tolist()
    record = {"memory_gib": mine, "memory_max_gib": values[0]}
    if device.type == "cuda":
        record["memory_reserved_max_gib"] = values[1]
    return record


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl (and TensorBoard / W&B if asked).

    wandb: wandb.init arguments (wandb_settings(cfg)) to log every record there too, same
    fields and step, with the run's config."""

    def __init__(
        self, output_dir: str, enabled: bool, tensorboard: bool = False, wandb: dict | None = None
    ):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self.tb = _tensorboard_writer(Path(output_dir) / "tensorboard")
        if wandb is not None:
            self.wandb = _wandb_run(wandb)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # tensorboard is optional
        raise missing_extra("metrics.tensorboard", "tensorboard", "tensorboard") from e
    return SummaryWriter(log_dir=str(log_dir))


def wandb_settings(cfg) -> dict | None:
    """wandb.init arguments for a run with metrics.wandb = true (else None): project, the run
    named after job.name, files under <output_dir>/wandb, the whole config."""
    if not cfg.metrics.wandb:
        return None
    from gpt3d.config import config_to_dict

    return {
        "project": cfg.metrics.wandb_project,
        "name": cfg.job.name,
        "dir": cfg.job.output_dir,
        "config": config_to_dict(cfg),
    }


def _wandb_run(settings: dict):
    try:
        import wandb
    except ImportError as e:  # wandb is optional
        raise missing_extra("metrics.wandb", "wandb", "wandb") from e
    Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
    return wandb.init(**settings)


class ProgressMeter:
    """Times training between log lines; turns each logged step into one metrics record
    (metrics.jsonl / TensorBoard) and one log line with tokens/s, MFU, memory and ETA.

    flops_per_step: model FLOPs of one optimizer step (flops_per_token x tokens);
    peak_flops: the peak of every device together, for MFU."""

    def __init__(
        self,
        log,
        writer: MetricsWriter,
        training,
        tokens_per_step: int,
        flops_per_step: float,
        peak_flops: float,
        device: torch.device,
    ):
        self.log, self.writer, self.device = log, writer, device
        self.interval, self.total = training.log_interval, training.steps
        self.tokens, self.flops, self.peak = tokens_per_step, flops_per_step, peak_flops
        self.tick = time.perf_counter()

    def step(self, step: int, stats) -> None:
        if step % self.interval and step != self.total:
            return
        now = time.perf_counter()
        dt = (now - self.tick) / ((step - 1) % self.interval + 1)  # seconds per step
        self.tick = now
        r = {
            "step": step,
            "loss": stats.loss,
            "lr": stats.lr,
            "grad_norm": stats.grad_norm,
            "tokens_per_sec": self.tokens / dt,
            "step_time_s": dt,
            "mfu": self.flops / dt / self.peak,
            **memory_record(self.device),
        }
        moe = getattr(stats, "moe", None) or {}  # MoE balance (expert_parallel.py)
        r.update(moe)
        moe_text = (
            f" | load {moe['moe_load_max']:.2f} | aux {moe['moe_aux_loss']:.2e} | "
            f"bias spread {moe['moe_bias_spread']:.4f}"
            if moe
            else ""
        )
        self.log(
            f"step {step:5d} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"norm {r['grad_norm']:.3f}{moe_text} | {r['tokens_per_sec']:,.0f} tok/s | "
            f"mfu {100 * r['mfu']:.2f}% | mem {r['memory_max_gib']:.2f} GiB | "
            f"eta {(self.total - step) * dt:.0f}s"
        )
        self.writer.write(r)

    def eval(self, step: int, val_loss: float) -> None:
        self.log(f"step {step:5d} | val_loss {val_loss:.4f}")
        self.writer.write({"step": step, "val_loss": val_loss})
        self.tick = time.perf_counter()  # evaluation time is not training time


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curve(metrics_jsonl: str | Path, out_png: str | Path, tokens_per_step: int = 0):
    """Train and val loss vs step (tokens on a second axis) from metrics.jsonl, as a PNG.

    Returns the PNG path, or None (with a note on stderr) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: loss-curve plot skipped: pip install 'gpt3d[plot]'", file=sys.stderr)
        return None
    records = read_metrics(metrics_jsonl)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for key, style in (("loss", "-"), ("val_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points, strict=True), style, label=key.replace("_", " "), ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if tokens_per_step:
        top = ax.secondary_xaxis(
            "top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step)
        )
        top.set_xlabel("tokens")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return Path(out_png)
