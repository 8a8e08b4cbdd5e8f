"""A minimal progress bar on stderr (no tqdm dependency).

Shown when stderr is a terminal, or when forced (`progress=always`, or CDSR_PROGRESS=1), so
logs of batch jobs and CI stay free of carriage-return noise.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO


def progress_enabled(mode: str = "auto", stream: Optional[TextIO] = None) -> bool:
    if mode == "never":
        return False
    if mode == "always" or os.environ.get("CDSR_PROGRESS") == "1":
        return True
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream: Optional[TextIO] = None,
                 width: int = 24, min_interval: float = 0.1):
        self.total, self.desc, self.enabled = max(1, total), desc, enabled
        self.stream = stream or sys.stderr
        self.width, self.min_interval = width, min_interval
        self.n = 0
        self.start = time.perf_counter()
        self._last = 0.0
        self.postfix = ""

    def update(self, n: int = 1, **postfix: float) -> None:
        self.n += n
        if postfix:
            self.postfix = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                     for k, v in postfix.items())
        now = time.perf_counter()
        if self.enabled and (now - self._last >= self.min_interval or self.n >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        filled = int(self.width * min(self.n, self.total) / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        line = (f"\r{self.desc} {self.n}/{self.total} [{bar}] {rate:.1f} it/s "
                f"{_fmt_time(elapsed)}<{_fmt_time(eta)}  {self.postfix}")
        self.stream.write(line)
        self.stream.flush()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.n / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
