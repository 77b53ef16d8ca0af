"""Train a GPT on any dp x pp x tp layout. The same script runs one process or many:

    python recipes/train.py                                   # 1 process, debug-sized
    torchrun --standalone --nproc_per_node=4 recipes/train.py # tp2 x pp2 (the default config)
    torchrun --nproc_per_node=8 recipes/train.py --config recipes/configs/dp2_pp2_tp2.toml
    python recipes/train.py --help                            # every config field

Config: recipes/configs/*.toml plus --section.key=value overrides.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from gpt3d.launch import Logger, guarded_main, with_default_config  # noqa: E402


def train(argv: list[str]) -> int:
    from gpt3d.checkpoint import Checkpointer, StopOnSignal, resolve_resume
    from gpt3d.config import load_config
    from gpt3d.metrics import MetricsWriter, ProgressMeter, plot_loss_curve
    from gpt3d.pretrained import describe, init_from_pretrained
    from gpt3d.trainer import Trainer

    cfg = load_config(with_default_config(argv))
    pretrained = init_from_pretrained(cfg)  # checkpoint.init_from: its shape, lazy weights
    resume = resolve_resume(cfg)  # a verified checkpoint (or None), before any collective
    trainer = Trainer(cfg, weights=None if resume else pretrained)
    t, env = cfg.training, trainer.env
    log = Logger(env.rank, cfg.job.log_all_ranks)
    ckpt = Checkpointer(trainer, log)
    if pretrained is not None:
        log(f"init from {cfg.checkpoint.init_from}: {describe(pretrained.cfg)}")
    if resume is not None:
        ckpt.load(resume)
    metrics = MetricsWriter(cfg.job.output_dir, env.is_main, cfg.metrics.tensorboard)
    meter = ProgressMeter(trainer, log, metrics)
    log(
        f"layout {trainer.dims.describe()} on {env.world_size} x {env.device.type}; "
        f"model {trainer.gpt.n_layer}L/{trainer.gpt.n_embd}d; {t.steps} steps of "
        f"{trainer.tokens_per_step()} tokens"
    )
    start, first_step, loss = time.perf_counter(), trainer.step, float("nan")
    stop = StopOnSignal()  # SIGTERM/SIGINT: save at the next step boundary, then exit 0
    while trainer.step < t.steps:
        stats = trainer.train_step()
        step, loss = trainer.step, stats.loss
        meter.step(step, stats)
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
            meter.eval(step, trainer.evaluate())
        ckpt.maybe_save()
        if stop.on_any_rank():
            log(f"signal {stop.received or 'on another rank'}: saving step {step} and stopping")
            ckpt.save()
            break
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
