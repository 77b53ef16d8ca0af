"""Which rank stopped answering? A rank that is stopped (SIGSTOP, a debugger, a frozen node)
rather than dead keeps its sockets open. Its peers then wait: gloo times most collectives out
after parallel.timeout_s without naming anyone ("Timed out waiting 10000ms for recv
operation to complete"), and in torch 2.13 two waits gpt3d relies on never time out on gloo
at all: batched point-to-point ops (every pipeline schedule's sends and receives) and
functional collectives (DTensor redistribution in tensor parallelism); measured in
docs/operations.md ("A rank that stops answering").

So every rank of a multi-process run keeps a heartbeat: a daemon thread bumps a counter in
<output_dir>/heartbeat/rank-<r> once a second and watches the counters of the next WATCH
ranks (all of them up to WATCH + 1 ranks). A counter that stands still for the collective
timeout means that rank stopped answering: the watching rank prints one line naming it and
exits, and torchrun ends the rest. Counters, not clocks, so nodes with skewed clocks on a
shared file system compare fine; the thread beats while the main thread waits in C++, so a
slow collective, a long save or a compile never looks silent.

    start_heartbeat(output_dir, rank, world, stall_s)   # once the process group exists
    stall_note(exc)                                     # for a timed-out collective's report
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

PERIOD_S = 1.0  # one beat per second
WATCH = 16  # peers each rank watches: the next ones, cyclically
NOTE_SILENCE_S = 3.0  # stall_note names ranks silent at least this long
EXIT_CODE = 1  # a failure, like a dead peer (torchrun restarts it with --max-restarts)
WIDTH = 20  # counter digits, written in place (one pwrite, no new files)

_active: Heartbeat | None = None


class Heartbeat:
    """This rank's beating counter, and the watch over its next peers (a daemon thread)."""

    def __init__(self, folder: Path, rank: int, world: int, stall_s: float, period=PERIOD_S):
        self.folder, self.rank, self.stall_s, self.period = Path(folder), rank, stall_s, period
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.folder / f"rank-{rank}", os.O_WRONLY | os.O_CREAT, 0o644)
        self.count = 0
        now = time.monotonic()
        peers = [(rank + i) % world for i in range(1, min(world, WATCH + 1))]
        self.seen = {r: (None, now) for r in peers}  # rank -> (last counter, when it changed)
        self._beat()
        threading.Thread(target=self._run, name="gpt3d-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        self.count += 1
        os.pwrite(self.fd, f"{self.count:0{WIDTH}d}\n".encode(), 0)

    def _run(self) -> None:
        while True:
            time.sleep(self.period)
            try:
                self._beat()
                self._watch()
            except OSError:  # the directory went away (a test cleaned up): stop
                return

    def _watch(self) -> None:
        now = time.monotonic()
        for r, (value, _) in self.seen.items():
            current = _read(self.folder / f"rank-{r}")
            if current != value:
                self.seen[r] = (current, now)
        silent = self.silent(self.stall_s)
        if silent:
            print(
                f"[rank {self.rank}] error: rank(s) {', '.join(map(str, silent))} stopped "
                f"answering: no heartbeat for {self.stall_s:.0f} s (parallel.timeout_s); the "
                "process is stopped, hung or gone. Ending the job; the last complete "
                "checkpoint is untouched",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_CODE)

    def silent(self, for_s: float) -> list[int]:
        """Watched ranks whose counter has not moved for more than `for_s` seconds."""
        now = time.monotonic()
        return sorted(r for r, (_, changed) in self.seen.items() if now - changed > for_s)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def start_heartbeat(output_dir, rank: int, world: int, stall_s: float) -> Heartbeat | None:
    """Start this rank's heartbeat and watch (multi-process runs only; once per process)."""
    global _active
    if world > 1 and _active is None:
        _active = Heartbeat(Path(output_dir) / "heartbeat", rank, world, stall_s)
    return _active


def stall_note(exc: BaseException) -> str:
    """For a collective that timed out: a line naming the watched ranks that went silent."""
    text = str(exc).lower()
    if _active is None or not ("timed out" in text or "timeout" in text):
        return ""
    silent = _active.silent(NOTE_SILENCE_S)
    if not silent:
        return ""
    return (
        f"\n[rank {_active.rank}] rank(s) {', '.join(map(str, silent))} stopped answering "
        f"(no heartbeat for over {NOTE_SILENCE_S:.0f} s): stopped, hung or gone"
    )
