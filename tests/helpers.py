"""Shared test helpers: the small models every test trains, synthetic token datasets, real
torchrun launches (one per world size, many cases each), and building a Trainer in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def model_args(n_layer: int, n_head: int, n_embd: int, block: int = 32, vocab: int = 512):
    """--model.* overrides for a tiny GPT on a synthetic vocabulary."""
    return [
        "--model.preset=tiny",
        f"--model.n_layer={n_layer}",
        f"--model.n_head={n_head}",
        f"--model.n_embd={n_embd}",
        f"--model.block_size={block}",
        f"--model.vocab_size={vocab}",
    ]


# 2 layers, 32 wide, 512-token vocabulary: fast enough to launch often (errors, failures).
SMALL_MODEL = [
    *model_args(2, 2, 32),
    "--training.seq_len=16",
    "--training.global_batch_size=8",
    "--training.eval_interval=0",
]


def small_run(steps: int, batch: int = 4, vocab: int = 512) -> list[str]:
    """SMALL_MODEL trained for `steps` steps of `batch` sequences, no plot."""
    return [
        *model_args(2, 2, 32, vocab=vocab),
        "--training.seq_len=16",
        f"--training.global_batch_size={batch}",
        "--training.eval_interval=0",
        f"--training.steps={steps}",
        "--training.warmup_steps=1",
        "--metrics.plot=false",
    ]


# 4 layers, 64 wide: divisible by tp 2/4, pp 2/4, dp 2/4; the parity and checkpoint tests.
# lr 3e-4: Adam turns fp32 rounding in near-zero gradients (~1e-9) into update differences
# proportional to lr; at 3e-4 those stay well below the 1e-5 parameter tolerance.
PARITY_MODEL = [
    *model_args(4, 4, 64),
    "--model.pad_vocab_multiple=1",
    "--training.seq_len=32",
    "--training.global_batch_size=16",
    "--training.warmup_steps=1",
    "--training.lr=3e-4",
    "--training.min_lr=3e-5",
    "--training.eval_interval=0",
]


DEBUG_CONFIG = ["--config", "recipes/configs/debug.toml"]
NO_CHECKPOINTS = ["--checkpoint.interval=0", "--checkpoint.save_final=false"]


def pp_args(n: int, schedule: str, m: int, v: int = 1) -> list[str]:
    return [
        f"--parallel.pp={n}",
        f"--parallel.pp_schedule={schedule}",
        f"--parallel.pp_microbatches={m}",
        f"--parallel.pp_stages_per_rank={v}",
    ]


def make_dataset(path: Path, vocab_size: int = 512, n_train: int = 20_000, n_val: int = 4_000):
    """A learnable synthetic corpus (noisy arithmetic sequence) in prepare.py's format."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        base = np.arange(n) % 97
        tokens = (base * 5 + rng.integers(0, 3, n)) % vocab_size
        tokens.astype(np.uint16).tofile(path / f"{split}.bin")
    meta = {
        "tokenizer": "synthetic",
        "vocab_size": vocab_size,
        "eot_id": 0,
        "dtype": "uint16",
        "train_tokens": n_train,
        "val_tokens": n_val,
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def copy_dataset(src: Path, dst: Path) -> Path:
    """A writable copy of a prepared dataset directory (to damage it)."""
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.pop("RANK", None)
    e.pop("WORLD_SIZE", None)
    e.update(extra)
    return e


def run_script(script, args, nproc: int = 1, timeout: float = 240, extra_launcher=(), **kw):
    """Run a gpt3d script: plain python for nproc=0, torchrun --standalone otherwise."""
    script = str(REPO / script)
    if nproc == 0:
        cmd = [sys.executable, script, *map(str, args)]
    else:
        launcher = [*TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *extra_launcher]
        cmd = [*launcher, script, *map(str, args)]
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=env(**kw.pop("env", {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def launch_per_world(worker: str, launches: dict, root: Path, timeout: float = 400, env=None):
    """One launch of `worker` per world size over its cases ({world: {case: spec}}, world 0 =
    plain python); the worker gets <cases.json> <root/out>. Returns {world: CompletedProcess}."""
    procs = {}
    for world, cases in launches.items():
        spec = root / f"cases{world}.json"
        spec.write_text(json.dumps(cases))
        procs[world] = run_script(
            worker, [spec, root / "out"], nproc=abs(world), timeout=timeout, env=env or {}
        )
    return procs


def failed(procs: dict) -> dict:
    """{world: tail of the output} of the launches that did not exit 0."""
    return {w: p.stdout[-3000:] + p.stderr[-3000:] for w, p in procs.items() if p.returncode != 0}


def cases_main(run_case):
    """main(argv) of a worker launched by launch_per_world: run_case(spec, <out>/<name>) for
    every case of <cases.json>, in one process group."""

    def main(argv: list[str]) -> int:
        cases = json.loads(Path(argv[0]).read_text())
        for name, spec in cases.items():
            run_case(spec, Path(argv[1]) / name)
        return 0

    return main


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def recipe(name: str):
    """The main function of recipes/<name>.py (train, export, sample), imported in process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def trainer_with_checkpointer(args: list[str]):
    """A one-process Trainer and its Checkpointer, resumed if the config says so."""
    from gpt3d.checkpoint import Checkpointer
    from gpt3d.config import load_config
    from gpt3d.preflight import preflight
    from gpt3d.trainer import Trainer

    run = preflight(load_config(args), world_size=1)
    trainer = Trainer(run)
    parts = (trainer.parts, trainer.optimizer, trainer.loader, trainer.state)
    ckpt = Checkpointer(run, *parts, log=lambda msg: None)
    if run.resume is not None:
        ckpt.load(run.resume)
    return trainer, ckpt


def trainer_for(args: list[str]):
    """A one-process Trainer from --section.key=value overrides (preflight included)."""
    from gpt3d.config import load_config
    from gpt3d.trainer import Trainer

    return Trainer.from_config(load_config(args))
