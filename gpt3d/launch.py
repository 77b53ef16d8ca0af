"""Entry-point plumbing for the recipes: rank-aware logging, preemption signals, the torchrun
restart warning, and one clear error message + exit code instead of a hang or eight
tracebacks."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

EXIT_USER_ERROR = 2  # gpt3d.errors.UserError: bad config/layout/plan/data/checkpoint
EXIT_DIVERGED = 3  # gpt3d.errors.TrainingDiverged: loss or parameters became NaN/Inf
UNIFORM_ERROR_GRACE_S = 5.0


class Logger:
    """Prints from rank 0 only (or every rank, prefixed, with job.log_all_ranks)."""

    def __init__(self, rank: int, all_ranks: bool = False):
        self.rank, self.enabled = rank, all_ranks or rank == 0
        self.prefix = f"[rank {rank}] " if all_ranks else ""

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"{self.prefix}{message}", flush=True)


def _rank() -> int:
    return int(os.environ.get("RANK", 0))


# ---------------------------------------------------------------- preemption and restarts


class StopOnSignal:
    """SIGTERM/SIGINT set a flag that the training loop checks between steps; a second
    SIGINT aborts at once. Install from the main thread."""

    def __init__(self):
        self.received = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def on_any_rank(self) -> bool:
        """True on every rank once any rank got a signal (ranks may get it a step apart)."""
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            return bool(self.received)
        # NCCL reduces only CUDA tensors; gloo takes CPU ones.
        device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([int(bool(self.received))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def warn_if_restarts_may_hang(log) -> None:
    """torchrun --max-restarts with the shared rendezvous store hangs in torch 2.13."""
    env = os.environ
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", 0)) > 0
    if restarts and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        log(
            "warning: torchrun --max-restarts with the shared rendezvous TCPStore reuses "
            "stale keys on restart and can hang in torch 2.13 (pytorch#135712); launch "
            "with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
        )


# ---------------------------------------------------------------- errors and exit codes


def report_error(exc: BaseException) -> int:
    """Print one readable message and return the exit code.

    User errors raised before any process group exists are the same on every rank, so only
    rank 0 prints them; anything later is printed by each failing rank."""
    import torch.distributed as dist

    from gpt3d.errors import TrainingDiverged, UserError

    # Same on every rank: checks before any process group exists, the (all-reduced) loss,
    # and errors every rank raised from one collective decision (same_on_every_rank).
    uniform = (
        isinstance(exc, TrainingDiverged)
        or getattr(exc, "same_on_every_rank", False)
        or not (dist.is_available() and dist.is_initialized())
    )
    who = "" if uniform else f"[rank {_rank()}] "
    if isinstance(exc, TrainingDiverged):
        code, text = EXIT_DIVERGED, f"{who}error: {exc}"
    elif isinstance(exc, UserError):
        code, text = EXIT_USER_ERROR, f"{who}error: {exc}"
    else:  # a bug or a dead peer: one line per failing rank, the traceback for torchrun
        code, uniform = 1, False
        text = f"[rank {_rank()}] failed: {type(exc).__name__}: {exc}"
        text += _stall_note(exc)
        if not _record_for_torchrun(exc):
            text += "\n" + traceback.format_exc()
    if not uniform or _rank() == 0:
        print(text, file=sys.stderr, flush=True)
    elif _rank() != 0:
        # Rank 0 prints the shared message; exiting first would let torchrun kill it
        # before it does. Wait a moment (torchrun ends us as soon as rank 0 exits).
        time.sleep(UNIFORM_ERROR_GRACE_S)
    return code


def _stall_note(exc: BaseException) -> str:
    """A timed-out collective: which ranks stopped answering (gpt3d/heartbeat.py)."""
    from gpt3d.heartbeat import stall_note

    return stall_note(exc)


def _record_for_torchrun(exc: BaseException) -> bool:
    """Under torchrun, hand the traceback to its error file: the launcher then prints the
    root cause (first failing rank) once instead of every rank's traceback."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return False
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(exc)
    return True


def guarded_main(fn, argv: list[str]) -> None:
    """Run fn(argv) and exit: 0 on success, a clear message and non-zero code on failure."""
    from gpt3d.parallel.utils import clean_exit

    try:
        code = fn(argv)
    except SystemExit as e:  # --help
        code = e.code if isinstance(e.code, int) else 0
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:  # noqa: BLE001 - incl. DCP CheckpointException (BaseException)
        code = report_error(e)
    if code != 0:  # never wait on peers that may be gone: torchrun ends the rest
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    clean_exit(0)
