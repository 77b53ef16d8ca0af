"""Shared by the benchmark scripts: machine facts, a measured matmul peak, torchrun launches
of benchmarks/worker.py, and results/<name>.json + .md (+ a PNG where a picture helps).

Benchmarks are scripts, not tests: each prints a table and writes its results. Timings on
the shared 2-core CPU box are noisy, so every script compares variants measured in the same
run (alternated, best-of-N) and reports ratios next to absolute numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
    }
    return info


def _git_commit() -> str:
    """HEAD's short hash, "+dirty" when tracked files other than results differ from it
    (results of code that is not in that commit)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout

    try:
        dirty = git("status", "--porcelain", "-uno", "--", ".", ":!benchmarks/results").strip()
        return git("rev-parse", "--short", "HEAD").strip() + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def launch(nproc: int, cases: dict, out_dir: Path, timeout: float = 1200) -> dict:
    """Run benchmarks/worker.py on nproc processes (plain python for 1) over `cases`
    ({name: {"args": [...], ...}}); returns {name: [per-rank result dicts]}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = out_dir / f"cases_{nproc}.json"
    spec.write_text(json.dumps(cases))
    worker = str(REPO / "benchmarks" / "worker.py")
    cmd = (
        [sys.executable, worker]
        if nproc == 1
        else [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", worker]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, str(spec), str(out_dir)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    print(
        f"  launch of {nproc} process(es), {len(cases)} case(s): {time.perf_counter() - t0:.0f}s",
        flush=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{nproc}-process launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    results = {}
    for name in cases:
        files = sorted((out_dir / name).glob("rank*.json"), key=lambda p: int(p.stem[4:]))
        results[name] = [json.loads(f.read_text()) for f in files]
    return results


def columns(spec: str) -> list[tuple[str, str, str]]:
    """Table columns from "key:header:format" entries separated by ";" (headers may hold
    spaces, not colons), e.g. columns("layout:layout:s; tokens_per_s:tokens/s:,.0f")."""
    return [tuple(p.strip().split(":", 2)) for p in spec.split(";") if p.strip()]


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table; columns: (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" if f == "s" else "---:" for _, _, f in columns) + "|"
    lines = [head, rule]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("—" if v is None else format(v, fmt) if fmt != "s" else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(
    name: str,
    title: str,
    info: dict,
    config: dict,
    rows: list[dict],
    markdown: str,
    notes: list[str],
    out_dir: Path = RESULTS,
) -> None:
    """results/<name>.json (everything) and results/<name>.md (title, machine, table, notes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "machine": info, "config": config, "rows": rows, "notes": notes}
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    facts = ", ".join(f"{k} {v}" for k, v in info.items() if v is not None)
    md = [
        f"# {title}",
        "",
        f"Measured: {facts}.",
        "",
        f"Config: `{json.dumps(config)}`",
        "",
        markdown,
        "",
    ]
    md += [f"- {n}" for n in notes]
    (out_dir / f"{name}.md").write_text("\n".join(md).rstrip() + "\n")
    print(markdown)
    for n in notes:
        print(f"- {n}")
    print(f"wrote {out_dir / name}.json and .md")


def pyplot():
    """matplotlib.pyplot (Agg), or None with a note when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: no plot (pip install 'gpt3d[plot]')")
        return None
    return plt


def subplots(*args, **kwargs):
    """(fig, axes) of plt.subplots(*args, dpi=120, **kwargs), or None without matplotlib."""
    plt = pyplot()
    return None if plt is None else plt.subplots(*args, dpi=120, **kwargs)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def arg_parser(doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


# ---- layouts and a synthetic model shared by bench_layouts / bench_memory ---------------
from tests.helpers import pp_args  # noqa: E402

TP2, SP, DDP = "--parallel.tp=2", "--parallel.sequence_parallel=true", "--parallel.dp_mode=ddp"
FSDP = "--parallel.dp_mode=fsdp"  # explicit: the default (auto) picks ddp for small models
# name -> (world size, layout overrides); pipeline layouts use 4 microbatches
LAYOUTS = {
    "1 process": (1, []),
    "dp2 FSDP": (2, [FSDP]),
    "dp2 DDP": (2, [DDP]),
    "tp2": (2, [TP2]),
    "tp2+SP": (2, [TP2, SP]),
    "pp2 GPipe": (2, pp_args(2, "GPipe", 4)),
    "pp2 1F1B": (2, pp_args(2, "1F1B", 4)),
    "pp2 Interleaved1F1B": (2, pp_args(2, "Interleaved1F1B", 4, 2)),
    "pp2 LoopedBFS": (2, pp_args(2, "LoopedBFS", 4, 2)),
    "pp2 InterleavedZeroBubble": (2, pp_args(2, "InterleavedZeroBubble", 4, 2)),
    "pp2 ZBVZeroBubble": (2, pp_args(2, "ZBVZeroBubble", 4, 2)),
    "pp2 DualPipeV": (2, pp_args(2, "DualPipeV", 4, 2)),
    "dp2×tp2 FSDP+SP": (4, [FSDP, TP2, SP]),
    "tp2×pp2 1F1B": (4, [TP2, SP, *pp_args(2, "1F1B", 4)]),
    "dp2×pp2×tp2 FSDP+SP": (8, [FSDP, TP2, SP, *pp_args(2, "1F1B", 4)]),
}


def synthetic_data(root: Path, vocab: int, n_train: int = 200_000) -> Path:
    """A token dataset in prepare.py's format (small vocab keeps the lm_head from dominating)."""
    from tests.helpers import make_dataset

    path = root / f"data{vocab}"
    if not (path / "meta.json").exists():
        make_dataset(path, vocab_size=vocab, n_train=n_train, n_val=4_000)
    return path


def gpt2_data(preferred: Path) -> Path:
    """The prepared Shakespeare tokens if present (recipes/prepare.py; not in git), else a
    synthetic dataset with GPT-2's vocabulary: throughput does not depend on the text."""
    if (preferred / "train.bin").exists():
        return preferred
    import tempfile

    print(f"note: {preferred} not prepared; using synthetic GPT-2-vocab tokens", flush=True)
    return synthetic_data(Path(tempfile.mkdtemp(prefix="gpt3d_bench_")), 50257, 2_000_000)


def model_args(data: Path, a, preset: str = "gpt2") -> list[str]:
    """Trainer overrides for the benchmark model; `a` has n_layer, n_head, n_embd, vocab,
    seq, batch."""
    return [
        f"--data.dataset={data}",
        f"--model.preset={preset}",
        f"--model.n_layer={a.n_layer}",
        f"--model.n_head={a.n_head}",
        f"--model.n_embd={a.n_embd}",
        f"--model.block_size={a.seq}",
        f"--model.vocab_size={a.vocab}",
        "--model.pad_vocab_multiple=64",
        f"--training.seq_len={a.seq}",
        f"--training.global_batch_size={a.batch}",
        "--training.steps=1000000",
        "--training.warmup_steps=0",
        "--training.lr=1e-4",
        "--training.eval_interval=0",
    ]


def add_model_flags(p, n_layer=4, n_head=4, n_embd=256, vocab=512, seq=128, batch=8) -> None:
    p.add_argument("--n-layer", type=int, default=n_layer)
    p.add_argument("--n-head", type=int, default=n_head)
    p.add_argument("--n-embd", type=int, default=n_embd)
    p.add_argument("--vocab", type=int, default=vocab, help="synthetic dataset vocabulary")
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--batch", type=int, default=batch, help="global batch (sequences)")


def run_layouts(
    names: list[str], base: list[str], spec: dict, work: Path, layouts=None, fresh=False
) -> dict:
    """Launch every layout (grouped by world size, one launch each; fresh: one launch per
    layout, so that no case inherits an earlier one's heap); {name: [rank dicts]}."""
    layouts = layouts or LAYOUTS
    batches: dict[tuple[int, str], dict] = {}  # (world size, case or "") -> cases
    for name in names:
        world, layout = layouts[name]
        key = name.replace(" ", "_").replace("×", "x").replace("+", "_")
        case = {"args": [*base, *layout], **spec, "_name": name}
        batches.setdefault((world, key if fresh else ""), {})[key] = case
    results = {}
    for (world, _), cases in sorted(batches.items()):
        out = launch(world, cases, work)
        results.update({cases[k]["_name"]: v for k, v in out.items()})
    return results
