"""[profiling]: a torch.profiler trace (Chrome / Perfetto JSON) of a window of training steps
on chosen ranks, and on CUDA a caching-allocator memory snapshot of the same window.

    profiler = StepProfiler(cfg.profiling, cfg.job.output_dir, rank, device, trainer.step, log)
    while ...:
        stats = trainer.train_step()
        profiler.step(trainer.step)   # after each optimizer step
    profiler.stop()

Steps are the logged step numbers (1 = the first). The window [start_step, start_step + steps)
is traced after one warm-up step (the profiler's own start-up cost stays out of the trace);
each traced step is a `ProfilerStep#<step>` range. Files, under <output_dir>/profile/:
    trace_rank<r>_steps<a>-<b>.json    open in https://ui.perfetto.dev or chrome://tracing
    memory_rank<r>_steps<a>-<b>.pickle drag into https://pytorch.org/memory_viz (CUDA only)
A resumed run already past the window traces nothing. Off (the default), every call is a no-op.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, cfg, output_dir: str, rank: int, device: torch.device, step: int, log):
        """cfg: the [profiling] section; step: optimizer steps already taken (resume)."""
        self.first, self.last = cfg.start_step, cfg.start_step + cfg.steps - 1
        self.on = cfg.trace and (not cfg.ranks or rank in cfg.ranks) and step < self.last
        self.cfg, self.rank, self.device, self.log = cfg, rank, device, log
        self.dir = Path(output_dir) / "profile"
        self.prof = None
        self.snapshot = cfg.memory_snapshot and device.type == "cuda"
        if self.on and cfg.memory_snapshot and not self.snapshot:
            log("profiling.memory_snapshot needs CUDA; this run traces without it")
        self._maybe_start(step + 1)

    def _maybe_start(self, next_step: int) -> None:
        """Start before the warm-up step (or the first traced step when none can precede it)."""
        if not self.on or self.prof is not None or not self.first - 1 <= next_step <= self.last:
            return
        warmup = 1 if next_step < self.first else 0
        self.first = max(self.first, next_step)  # a run resumed inside the window
        self.dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        active = self.last - self.first + 1
        with warnings.catch_warnings():  # "won't be using warmup": start_step 1 has none
            warnings.simplefilter("ignore")
            base = torch.profiler.schedule(wait=0, warmup=warmup, active=active, repeat=1)
        self.prof = torch.profiler.profile(
            activities=activities,
            schedule=lambda i: base(max(i - next_step, 0)),  # i: the step about to run
            on_trace_ready=self._save,
            record_shapes=self.cfg.record_shapes,
            profile_memory=self.cfg.profile_memory,
            with_stack=self.cfg.with_stack,
        )
        self.prof.step_num = next_step  # ProfilerStep#<step> ranges carry the training step
        if self.snapshot:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self.prof.start()

    def _name(self, kind: str, ext: str) -> Path:
        return self.dir / f"{kind}_rank{self.rank}_steps{self.first}-{self.last}.{ext}"

    def _save(self, prof) -> None:
        path = self._name("trace", "json")
        prof.export_chrome_trace(str(path))
        self.log(f"profiling: rank {self.rank} wrote {path} (open in https://ui.perfetto.dev)")

    def step(self, step: int) -> None:
        """After optimizer step `step`: advance the trace, end it after the window."""
        if self.prof is not None:
            self.prof.step()
            if step >= self.last:
                self.stop()
        else:
            self._maybe_start(step + 1)

    def stop(self) -> None:
        """End the trace (saving what was recorded); idempotent."""
        if self.prof is None:
            return
        prof, self.prof, self.on = self.prof, None, False
        prof.stop()
        if self.snapshot:
            path = self._name("memory", "pickle")
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.log(f"profiling: rank {self.rank} wrote {path} (https://pytorch.org/memory_viz)")
