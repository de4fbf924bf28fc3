"""The one progress display: a throttled log line while rows arrive, with rate and ETA.

    [progress 42 s] 120/400 clips (30 %), 3 failed, 1 model call retried | 2.86 clips/s, 91.4 output tokens/s | ETA 1 min 38 s

Ray Data's own progress bars are off unless `run.ray_progress_bars` asks for them (pipeline.run),
so this is the only progress a terminal or `ray job logs` shows. The rate is over the whole run
so far (clips finished / elapsed), the ETA the remaining clips at that rate; before the first row
it says 'ETA unknown'.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline._summary import RunStats


@dataclass
class Progress:
    total: int  # planned clips: clips to run, plus one per skipped or unreadable video
    stats: RunStats
    every_s: float = 10.0  # run.progress_every_s
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
        rate = done / max(elapsed_s, 1e-9)
        tokens = self.stats.output_tokens / max(elapsed_s, 1e-9)
        retried = sum(self.stats.fallbacks_by_reason.values())
        percent = f"{100 * done / self.total:.0f} %" if self.total else "-"
        return (f"[progress {elapsed_s:.0f} s] {done}/{self.total} clips ({percent}), {failed} failed, "
                f"{retried} model call{'s' * (retried != 1)} retried | {rate:.2f} clips/s, {tokens:.1f} output tokens/s "
                f"| ETA {eta(self.total - done, rate)}")


def eta(remaining: int, rate_per_s: float) -> str:
    """Example: eta(280, 2.86) -> '1 min 38 s'; nothing left -> 'done'; no rate yet -> 'unknown'."""
    if remaining <= 0:
        return "done"
    if rate_per_s <= 0:
        return "unknown"
    return duration(remaining / rate_per_s)


def duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"
