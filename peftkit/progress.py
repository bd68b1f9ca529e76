"""A dependency-free progress line for long loops (Fisher estimation, the demo)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["Progress"]


class Progress:
    """``desc [#####-----] 12/40 3.1 it/s loss=0.52`` redrawn in place, at most ten times a second, on a
    terminal; written once, when done, to a file or pipe (so logs stay short)."""

    def __init__(self, total: int, desc: str, enabled: bool = True, stream: TextIO | None = None, unit: str = "it") -> None:
        self.total, self.desc, self.enabled, self.unit = total, desc, enabled, unit
        self.stream = stream or sys.stderr
        self.count = 0
        self.start = self._last = time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.count += n
        if postfix:
            self.postfix = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in postfix.items())
        now = time.perf_counter()
        live = self.stream.isatty() if hasattr(self.stream, "isatty") else False
        if self.enabled and live and (now - self._last > 0.1 or self.count >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(1.0, self.count / self.total) if self.total else 1.0
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        rate = self.count / max(now - self.start, 1e-9)
        self.stream.write(f"\r{self.desc} [{bar}] {self.count}/{self.total} {rate:.1f} {self.unit}/s  {self.postfix}")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
