"""A small progress bar (no dependency): percent, amount done, throughput and ETA.

    prepare  42% |########............| 21.0/50.0 MB | 3.20 MB/s | 5.1M tokens | 6s, eta 9s

On a terminal the line is redrawn in place (\\r) at most every `redraw_s`; elsewhere (a log
file, CI) a full line is printed every `every_s`. With total=None (a stream of unknown
length) there is no bar, percent or ETA.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

WIDTH = 20


def _duration(seconds: float) -> str:
    s = int(seconds)
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


class Progress:
    """Counts work done (in `unit`: "MB" counts input bytes, anything else items), input bytes
    (for MB/s) and tokens; draws one line."""

    def __init__(
        self,
        total: float | None,
        unit: str = "MB",
        label: str = "prepare",
        stream: TextIO | None = None,
        every_s: float = 10.0,
        redraw_s: float = 0.2,
        clock=time.monotonic,
    ):
        self.total, self.unit, self.label = total, unit, label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = redraw_s if self.tty else every_s
        self.clock = clock
        self.start = self.last_draw = clock()
        self.done = self.bytes = self.tokens = self._width = 0

    def update(self, n_bytes: int, items: int = 0, tokens: int = 0) -> None:
        self.bytes += n_bytes
        self.tokens += tokens
        self.done += n_bytes if self.unit == "MB" else items
        if self.clock() - self.last_draw >= self.interval:
            self.draw()

    def line(self) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        scale = 2**20 if self.unit == "MB" else 1
        fmt = "{:,.1f}" if self.unit == "MB" else "{:,.0f}"
        amount = fmt.format(self.done / scale)
        parts = [self.label]
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * round(frac * WIDTH) + "." * (WIDTH - round(frac * WIDTH))
            parts[0] += f" {100 * frac:3.0f}% [{bar}]"
            amount += "/" + fmt.format(self.total / scale)
        rate = self.done / elapsed
        eta = (
            f", eta {_duration((self.total - self.done) / rate)}"
            if self.total and rate > 0 and self.done < self.total
            else ""
        )
        parts += [
            f"{amount} {self.unit}",
            f"{self.bytes / 2**20 / elapsed:,.2f} MB/s",
            f"{self.tokens / 1e6:,.1f}M tokens",
            f"{_duration(elapsed)}{eta}",
        ]
        return " | ".join(parts)

    def draw(self, final: bool = False) -> None:
        self.last_draw = self.clock()
        if self.tty:  # pad over the rest of a longer previous line
            line = self.line()
            line, self._width = line.ljust(self._width), len(line)
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        """The final line (100% when the total was right)."""
        self.draw(final=True)
