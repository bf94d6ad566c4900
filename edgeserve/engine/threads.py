"""The step thread's compute threads: a fixed count, or fewer while other work holds cores.

torch's OpenMP threads (and the C kernels of kernels/cpu, which take torch's count of the
calling thread) meet at a barrier at the end of every parallel region. When another process
holds a core, a region waits for whichever of its threads was descheduled, and forwards
slow down 10-50x; with fewer threads than free cores they do not. So with the setting
`auto`, windows of steps are watched (engine/cpu_signals.py): when the threads wait on the
run queue for a share of the window above `wait_high` for `down_after` windows in a row
(or above `wait_severe` once), the count drops to what the cores other processes leave
free. While lower, the full count is tried again (a probe) once the other processes' use
leaves room, at most every `interval` seconds; a probe that meets contention again
doubles the interval (up to `probe_max`), one that holds a quiet window keeps the full
count. A wait share between `wait_low` and `wait_high` changes nothing, nor does a wait
while other processes use less than `others_min` cores (the process's own threads, such as
the event loop, make it): together with the strikes and the probe interval this keeps the
count from flapping.

torch.set_num_threads called on the step thread sets that thread's OpenMP count (and
torch's default for threads that have not run torch ops yet): other threads that already
did keep theirs. CUDA kernels do not use these threads; on CUDA devices nothing adapts.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from edgeserve.engine.cpu_signals import Reading, Sample, between
from edgeserve.engine.cpu_signals import read as read_signals

log = logging.getLogger("edgeserve.engine.threads")


@dataclass(frozen=True, slots=True)
class Tuning:
    # Measured on the project's 2-core VM (bench/RESULTS.md, compute threads): two threads'
    # wait share is 0.02-0.05 (rarely 0.15) while other processes use under 0.25 cores,
    # 0.23-0.33 at 0.25-0.6 cores, 0.5-0.7 when they hold a core.
    wait_high: float = 0.15     # wait share of a window (per compute thread): contended
    wait_low: float = 0.06      # below it: quiet
    wait_severe: float = 0.3    # a window this contended drops the count at once
    others_min: float = 0.2     # cores other processes must use for a wait to be theirs
    down_after: int = 2         # contended windows in a row before the count drops
    probe_first: float = 1.0    # seconds before the first probe of the full count
    probe_max: float = 60.0     # the longest interval between probes
    slack: float = 0.25         # cores: other processes' use may leave this much short of one


class ThreadController:
    """Decides the thread count from windows of steps; no clock or I/O of its own."""

    def __init__(self, full: int, cpus: int, tuning: Tuning | None = None) -> None:
        self.full, self.cpus = full, cpus
        self.tuning = tuning or Tuning()
        self.threads = full
        self.changes = 0
        self.interval = self.tuning.probe_first
        self._strikes = 0
        self._next_probe = 0.0
        self._probing = False

    def observe(self, sample: Sample, now: float) -> int:
        """The count for the next window, after this one (now: when it ended, seconds)."""
        share, t = sample.wait_share(self.threads), self.tuning
        # The process's own threads (the event loop, loaders) make waits too: they count
        # only when other processes use the CPU as well.
        theirs = sample.others is None or sample.others >= t.others_min
        if share > t.wait_high and theirs:
            self._strikes += 1
            if self.threads > 1 and (self._probing or self._strikes >= t.down_after
                                     or share > t.wait_severe):
                self._lower(sample, now)
        elif share < t.wait_low:
            self._strikes = 0
            if self._probing:           # the probe held a quiet window: the count stays
                self._probing = False
                self.interval = max(t.probe_first, self.interval / 2)
            elif self.threads < self.full and now >= self._next_probe:
                room = self.room(sample)
                if room is None or room > self.threads:
                    self._set(min(self.full, room or self.full))
                    self._probing = True
        return self.threads

    def room(self, sample: Sample) -> int | None:
        """Threads the cores other processes leave free can run (None: unknown)."""
        if sample.others is None:
            return None
        return max(1, int(self.cpus - sample.others + self.tuning.slack))

    def _lower(self, sample: Sample, now: float) -> None:
        room = self.room(sample)
        if self._probing:               # the full count met contention again: wait longer
            self.interval = min(self.tuning.probe_max, self.interval * 2)
            self._probing = False
        self._set(max(1, min(self.threads - 1, room if room is not None else self.threads // 2)))
        self._next_probe = now + self.interval
        self._strikes = 0

    def _set(self, threads: int) -> None:
        if threads != self.threads:
            self.threads = threads
            self.changes += 1


def cpu_count() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ComputeThreads:
    """The step thread's compute threads. `setting`: a fixed count, or None for auto (the
    count torch has when the step thread starts, lowered while contended). Call `begin()`
    and `end()` on the step thread around its loop, and `stepped(began)` after each step."""

    def __init__(self, setting: int | None, *, adaptive: bool = True, window: float = 0.1,
                 tuning: Tuning | None = None,
                 read: Callable[[], Reading | None] = read_signals,
                 apply: Callable[[int], None] = torch.set_num_threads,
                 clock: Callable[[], float] = time.monotonic, cpus: int | None = None) -> None:
        if setting is not None and setting < 1:
            raise ValueError(f"compute threads must be at least 1, got {setting}")
        self.setting, self.adaptive, self.window = setting, adaptive, window
        self.tuning = tuning
        self._read, self._apply, self._clock = read, apply, clock
        self._cpus = cpus or cpu_count()
        self.threads: int | None = None       # the step thread's count once it started
        self.controller: ThreadController | None = None
        self._original: int | None = None
        self._window: Reading | None = None
        self._last = float("-inf")

    def begin(self) -> None:
        """On the step thread, before its first step: the fixed count applied, or the
        controller set up over the count torch has now."""
        self._original = self.threads = torch.get_num_threads()
        if self.setting is not None:
            self._set(self.setting)
        elif self.adaptive and self._original > 1 and self._read() is not None:
            self.controller = ThreadController(self._original, self._cpus, self.tuning)

    def end(self) -> None:
        """On the step thread, after its last step: torch's count as it found it."""
        if self._original is not None and self.threads != self._original:
            self._set(self._original)

    def stepped(self, began: float) -> None:
        """After a step that began at `began` (the clock's seconds): close the window when it
        is long enough, and apply the count the controller decides."""
        if self.controller is None:
            return
        now = self._clock()
        idle, self._last = began - self._last > self.window, now
        if self._window is None or idle:      # idle since the last step: a new window
            self._window = self._read()
            return
        if now - self._window.at < self.window or (end := self._read()) is None:
            return
        sample, self._window = between(self._window, end), end
        threads = self.controller.observe(sample, end.at)
        if threads != self.threads:
            log.info("compute threads %s -> %d (run-queue wait %.0f%% of a window, other "
                     "processes %s cores)", self.threads, threads,
                     100 * sample.wait_share(self.threads or 1),
                     "?" if sample.others is None else f"{sample.others:.1f}")
            self._set(threads)

    def _set(self, threads: int) -> None:
        self._apply(threads)
        self.threads = threads

    def stats(self) -> dict[str, Any]:
        ctl = self.controller
        return {"setting": "auto" if self.setting is None else self.setting,
                "threads": self.threads, "configured": ctl.full if ctl else self.threads,
                "adaptive": ctl is not None, "changes": ctl.changes if ctl else 0}
