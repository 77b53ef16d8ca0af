"""Train a GPT on any dp x pp x tp layout. The same script runs one process or many:

    python recipes/train.py                                   # 1 process: shakespeare.toml
    torchrun --standalone --nproc_per_node=4 recipes/train.py # tp2 x pp2: tp2_pp2.toml
    torchrun --nproc_per_node=8 recipes/train.py --config recipes/configs/dp2_pp2_tp2.toml
    python recipes/train.py --help                            # every config field

Config: recipes/configs/*.toml plus --section.key=value overrides. The flow:
config -> preflight (every check) -> Trainer (mesh, parallelize, optimizer) -> loop
(train_step, eval, checkpoint, metrics).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent
sys.path.insert(0, str(RECIPES.parent))  # run from a source checkout

from gpt3d.launch import Logger, guarded_main  # noqa: E402


def with_default_config(argv: list[str]) -> list[str]:
    """No --config given: shakespeare.toml for one process, the tp2 x pp2 recipe for more."""
    if any(a == "--config" or a.startswith("--config=") for a in argv):
        return argv
    name = "shakespeare.toml" if int(os.environ.get("WORLD_SIZE", 1)) == 1 else "tp2_pp2.toml"
    return ["--config", str(RECIPES / "configs" / name), *argv]


def reused_blocks(mmap_threshold: int) -> str:
    """What a pinned glibc mmap threshold (bytes; 0 = not pinned) means, for the log."""
    if not mmap_threshold:
        return "glibc's default"
    return f"blocks up to {mmap_threshold // 1024} KiB reused"


def train(argv: list[str]) -> int:
    from gpt3d.checkpoint import Checkpointer
    from gpt3d.config import load_config
    from gpt3d.launch import StopOnSignal, warn_if_restarts_may_hang
    from gpt3d.metrics import MetricsWriter, plot_loss_curve, progress_meter, wandb_settings
    from gpt3d.parallel.utils import dist_env
    from gpt3d.planner.check import check_memory
    from gpt3d.preflight import preflight
    from gpt3d.profiling import StepProfiler
    from gpt3d.trainer import Trainer

    env = dist_env()
    run = preflight(load_config(with_default_config(argv)), env.world_size, env.rank)
    cfg, t = run.config, run.config.training
    log = Logger(env.rank, cfg.job.log_all_ranks)
    warn_if_restarts_may_hang(log)
    check_memory(run, env.device, log)  # training.memory_check: refuse a run that cannot fit
    trainer = Trainer(run)
    threshold, startup = trainer.malloc_mmap_threshold, trainer.malloc_mmap_startup
    if threshold or trainer.env.device.type == "cpu":
        kept = reused_blocks(threshold)
        if startup != threshold:
            kept = f"{reused_blocks(startup)} while the model was built, then {kept}"
        log(f"host memory: {kept} ({trainer.malloc_why}; job.malloc_mmap_threshold_kb)")
    ckpt = Checkpointer(run, trainer.parts, trainer.optimizer, trainer.loader, trainer.state, log)
    if run.resume is not None:
        ckpt.load(run.resume)
    metrics = MetricsWriter(
        cfg.job.output_dir, env.is_main, cfg.metrics.tensorboard, wandb_settings(cfg)
    )
    meter = progress_meter(run, env, log, metrics)
    log(
        f"{run.describe()}; {env.world_size} x {env.device.type}; "
        f"{t.steps} steps of {trainer.tokens_per_step()} tokens"
    )
    start, first_step, loss = time.perf_counter(), trainer.step, float("nan")
    stop = StopOnSignal()  # SIGTERM/SIGINT: save at the next step boundary, then exit 0
    profiler = StepProfiler(
        cfg.profiling, cfg.job.output_dir, env.rank, env.device, trainer.step, log
    )
    while trainer.step < t.steps:
        stats = trainer.train_step()
        step, loss = trainer.step, stats.loss
        meter.step(step, stats)
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
            meter.eval(step, trainer.evaluate())
        ckpt.maybe_save()
        profiler.step(step)  # [profiling]: a trace of the chosen steps, else nothing
        if stop.on_any_rank():
            log(f"signal {stop.received or 'on another rank'}: saving step {step} and stopping")
            ckpt.save()
            break
    profiler.stop()
    ckpt.finish()  # final save (checkpoint.save_final) and any background write
    steps = trainer.step - first_step
    log(
        f"done: {steps} steps ({first_step} -> {trainer.step}), "
        f"{steps * trainer.tokens_per_step():,} tokens, {time.perf_counter() - start:.1f}s, "
        f"final loss {loss:.4f}, checkpoint {ckpt.latest_path() or 'none'}"
    )
    metrics.close()
    if env.is_main and cfg.metrics.plot:  # loss.png next to metrics.jsonl (needs matplotlib)
        png = Path(cfg.job.output_dir) / "loss.png"
        if plot_loss_curve(metrics.path, png, trainer.tokens_per_step()):
            log(f"loss curve: {png}")
    return 0


if __name__ == "__main__":
    guarded_main(train, sys.argv[1:])
