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
    from gpt3d.metrics import MetricsWriter, device_peak_flops, flops_per_token, peak_memory_gib
    from gpt3d.pretrained import describe, init_from_pretrained
    from gpt3d.trainer import Trainer

    cfg = load_config(with_default_config(argv))
    pretrained = init_from_pretrained(cfg)  # checkpoint.init_from: its shape, lazy weights
    resume = resolve_resume(cfg)  # a verified checkpoint (or None), before any collective
    trainer = Trainer(cfg, weights=None if resume else pretrained)
    log = Logger(trainer.env.rank, cfg.job.log_all_ranks)
    ckpt = Checkpointer(trainer, log)
    if pretrained is not None:
        log(f"init from {cfg.checkpoint.init_from}: {describe(pretrained.cfg)}")
    if resume is not None:
        ckpt.load(resume)
    t, env = cfg.training, trainer.env
    metrics = MetricsWriter(cfg.job.output_dir, env.is_main, cfg.metrics.tensorboard)
    peak = device_peak_flops(env.device, cfg.metrics.peak_tflops, cfg.metrics.cpu_peak_tflops)
    flops_per_step = flops_per_token(trainer.gpt, t.seq_len) * trainer.tokens_per_step()
    log(f"layout {trainer.dims.describe()} on {env.world_size} x {env.device.type}; "
        f"model {trainer.gpt.n_layer}L/{trainer.gpt.n_embd}d; {t.steps} steps of "
        f"{trainer.tokens_per_step()} tokens")  # fmt: skip
    start = tick = time.perf_counter()
    loss = float("nan")
    stop = StopOnSignal()  # SIGTERM/SIGINT: save at the next step boundary, then exit 0
    while trainer.step < t.steps:
        stats = trainer.train_step()
        step, loss = trainer.step, stats.loss
        if step % t.log_interval == 0 or step == t.steps:
            now = time.perf_counter()
            steps_done = (step - 1) % t.log_interval + 1
            dt = (now - tick) / steps_done
            tick = now
            record = {
                "step": step, "loss": loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                "tokens_per_sec": trainer.tokens_per_step() / dt, "step_time_s": dt,
                "mfu": flops_per_step / dt / (peak * env.world_size),
                "memory_gib": peak_memory_gib(env.device),
            }  # fmt: skip
            eta = (t.steps - step) * dt
            log(f"step {step:5d} | loss {loss:.4f} | lr {stats.lr:.2e} | "
                f"norm {stats.grad_norm:.3f} | {record['tokens_per_sec']:,.0f} tok/s | "
                f"mfu {100 * record['mfu']:.2f}% | mem {record['memory_gib']:.2f} GiB | "
                f"eta {eta:.0f}s")  # fmt: skip
            metrics.write(record)
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.steps):
            val = trainer.evaluate()
            log(f"step {step:5d} | val_loss {val:.4f}")
            metrics.write({"step": step, "val_loss": val})
            tick = time.perf_counter()
        ckpt.maybe_save()
        if stop.on_any_rank():
            log(f"signal {stop.received or 'on another rank'}: saving step {step} and stopping")
            ckpt.save()
            break
    ckpt.finish()  # final save (checkpoint.save_final) and any background write
    elapsed = time.perf_counter() - start
    log(f"done: {trainer.step} steps, {trainer.step * trainer.tokens_per_step():,} tokens, "
        f"{elapsed:.1f}s, final loss {loss:.4f}")  # fmt: skip
    metrics.close()
    if env.is_main and cfg.metrics.plot:  # loss.png next to metrics.jsonl (needs matplotlib)
        from gpt3d.metrics import plot_loss_curve

        png = Path(cfg.job.output_dir) / "loss.png"
        if plot_loss_curve(metrics.path, png, trainer.tokens_per_step()):
            log(f"loss curve: {png}")
    return 0


if __name__ == "__main__":
    guarded_main(train, sys.argv[1:])
