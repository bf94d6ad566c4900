"""What other work on the CPU costs this process, read from Linux's /proc.

Two counters tell a quiet machine from one where another process holds a core:
- the run-queue wait of this process's threads (second field of each thread's
  `/proc/self/task/<tid>/schedstat`): time a thread was runnable but had no core. With
  torch's OpenMP threads at one per core it is near zero on a quiet machine and about one
  thread's whole time once another process takes a core (bench/RESULTS.md, compute threads);
- the machine's busy CPU time (`/proc/stat`) less this process's own: the cores other
  processes keep busy. Unlike the wait, it says whether a core is free while this process
  uses fewer threads than cores.

Where neither file can be read (not Linux, schedstats off) `read()` returns None and
nothing adapts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

_TASKS = "/proc/self/task"
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class Reading:
    """Cumulative counters at one moment."""

    at: float               # time.monotonic()
    wait: float             # seconds this process's live threads have waited on a run queue
    own: float              # CPU seconds this process has used
    busy: float | None      # CPU seconds the whole machine has used (None: unknown)


@dataclass(frozen=True, slots=True)
class Sample:
    """One window of steps: how long it took, how long threads waited, what others used."""

    wall: float             # seconds
    wait: float             # run-queue wait of this process's threads, seconds (summed)
    others: float | None    # cores other processes kept busy on average (None: unknown)

    def wait_share(self, threads: int) -> float:
        """Run-queue wait per compute thread, as a share of the window."""
        return self.wait / (self.wall * max(1, threads)) if self.wall > 0 else 0.0


def run_queue_wait() -> float | None:
    """Seconds the process's threads (those alive now) have waited for a core; None when
    schedstat cannot be read."""
    total, seen = 0, False
    try:
        tids = os.listdir(_TASKS)
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"{_TASKS}/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[1])
            seen = True
        except (OSError, IndexError, ValueError):
            continue            # a thread that ended meanwhile
    return total / 1e9 if seen else None


def machine_busy() -> float | None:
    """CPU seconds used on the machine since boot (user, nice, system, irq, softirq and
    steal of every core); None when /proc/stat cannot be read."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 5 or fields[0] != b"cpu":
        return None
    ticks = [int(v) for v in fields[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK      # less idle and iowait


def read() -> Reading | None:
    """The counters now; None where this platform has no run-queue wait to read."""
    wait = run_queue_wait()
    if wait is None:
        return None
    return Reading(time.monotonic(), wait, time.process_time(), machine_busy())


def between(a: Reading, b: Reading) -> Sample:
    """The window from a to b. A thread that ended in it takes its wait along, so the
    wait is clamped at zero; so is the others' share (ticks are coarser than own time)."""
    wall = b.at - a.at
    others = None
    if a.busy is not None and b.busy is not None and wall > 0:
        others = max(0.0, ((b.busy - a.busy) - (b.own - a.own)) / wall)
    return Sample(wall, max(0.0, b.wait - a.wait), others)
