"""A throttled progress line printed by the driver while rows arrive.

    [progress  42.0 s] clips 120/400 done, 3 failed, 280 remaining, 1 model call retried | 2.86 clips/s, 91.4 output tokens/s
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from pipeline._summary import RunStats

PRINT_EVERY_S = 5.0


@dataclass
class Progress:
    total: int  # planned rows: clips to run, plus one per skipped or unreadable video
    stats: RunStats
    every_s: float = PRINT_EVERY_S
    out: Callable[[str], None] = field(default=lambda line: print(line, flush=True))
    _started: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            self.out(self.line(now - self._started))

    def line(self, elapsed_s: float) -> str:
        done, failed = self.stats.clips_done, len(self.stats.failed_clips)
        rate = len(self.stats.ok_clip_seconds) / max(elapsed_s, 1e-9)
        tokens = self.stats.output_tokens / max(elapsed_s, 1e-9)
        retried = sum(self.stats.fallbacks_by_reason.values())
        return (f"[progress {elapsed_s:6.1f} s] clips {done}/{self.total} done, {failed} failed, "
                f"{max(self.total - done, 0)} remaining, {retried} model call{'s' * (retried != 1)} retried | "
                f"{rate:.2f} clips/s, {tokens:.1f} output tokens/s")
