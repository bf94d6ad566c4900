"""The compute-thread controller, fed windows: fewer threads when contended, the full count
again after a probe on a quiet machine, and no flapping on a window or two of noise."""

from __future__ import annotations

import pytest

from edgeserve.engine.cpu_signals import Reading, Sample
from edgeserve.engine.threads import ComputeThreads, ThreadController, Tuning

QUIET = Sample(wall=0.25, wait=0.0, others=0.0)
HELD = Sample(wall=0.25, wait=0.1, others=1.0)          # two threads waited a fifth of it
SEVERE = Sample(wall=0.25, wait=0.25, others=1.0)       # ... half of it
ALONE = Sample(wall=0.25, wait=0.005, others=1.0)       # one thread, a core held by another
NOISE = Sample(wall=0.25, wait=0.05, others=0.3)        # between wait_low and wait_high
OWN = Sample(wall=0.25, wait=0.25, others=0.05)         # the process's own threads waited


def feed(ctl: ThreadController, samples: list[Sample], start: float = 0.0,
         step: float = 0.25) -> list[int]:
    return [ctl.observe(s, start + i * step) for i, s in enumerate(samples)]


def test_contended_windows_drop_to_the_free_cores() -> None:
    ctl = ThreadController(full=2, cpus=2)
    assert feed(ctl, [HELD, HELD, ALONE]) == [2, 1, 1]
    assert ctl.changes == 1
    wide = ThreadController(full=8, cpus=8)                 # one core held: seven left
    assert feed(wide, [Sample(0.25, 0.4, 1.0)] * 2) == [8, 7]


def test_a_severe_window_drops_the_count_at_once() -> None:
    ctl = ThreadController(full=2, cpus=2)
    assert feed(ctl, [SEVERE, ALONE]) == [1, 1]


def test_waits_of_the_process_s_own_threads_change_nothing() -> None:
    ctl = ThreadController(full=2, cpus=2)
    assert feed(ctl, [OWN] * 10) == [2] * 10


def test_one_contended_window_changes_nothing() -> None:
    ctl = ThreadController(full=2, cpus=2)
    assert feed(ctl, [HELD, QUIET, NOISE, HELD, QUIET, NOISE] * 5) == [2] * 30
    assert ctl.changes == 0


def test_a_window_of_noise_neither_counts_nor_clears_a_strike() -> None:
    ctl = ThreadController(full=2, cpus=2)
    assert feed(ctl, [HELD, NOISE, NOISE, HELD]) == [2, 2, 2, 1]
    # Lowered, noise is no reason to probe even when the probe is due.
    assert feed(ctl, [NOISE] * 40, start=10.0) == [1] * 40


def test_the_full_count_comes_back_after_the_probe_interval_once_quiet() -> None:
    ctl = ThreadController(full=2, cpus=2, tuning=Tuning(probe_first=2.0))
    feed(ctl, [HELD, HELD])                                 # lowered at t=0.25
    # Quiet machine, but before the probe is due: stays at one thread.
    assert ctl.observe(QUIET, 1.0) == 1
    # Another process still holds a core: no probe even when it is due.
    assert ctl.observe(ALONE, 3.0) == 1
    assert ctl.observe(QUIET, 3.25) == 2                    # probe: the full count
    assert ctl.observe(QUIET, 3.5) == 2                     # it held a quiet window: stays
    assert feed(ctl, [QUIET] * 20, start=3.75) == [2] * 20
    assert ctl.changes == 2


def test_a_probe_meeting_contention_goes_back_down_and_waits_longer() -> None:
    ctl = ThreadController(full=2, cpus=2, tuning=Tuning(probe_first=2.0, probe_max=8.0))
    feed(ctl, [HELD, HELD])                                 # lowered at 0.25: probe at 2.25
    assert ctl.observe(QUIET, 2.5) == 2                     # the probe
    assert ctl.observe(HELD, 2.75) == 1                     # one window is enough to go back
    assert ctl.interval == 4.0
    assert ctl.observe(QUIET, 6.0) == 1                     # next probe not before 6.75
    assert ctl.observe(QUIET, 7.0) == 2
    assert ctl.observe(HELD, 7.25) == 1
    assert ctl.interval == 8.0
    assert ctl.observe(QUIET, 7.5 + 8.0) == 2
    assert ctl.observe(HELD, 16.0) == 1
    assert ctl.interval == 8.0                              # capped at probe_max
    assert ctl.changes == 7


def test_without_the_machine_s_use_the_probe_is_timed_only() -> None:
    blind = Sample(wall=0.25, wait=0.0, others=None)
    ctl = ThreadController(full=4, cpus=4)
    assert feed(ctl, [Sample(0.25, 0.2, None)] * 2) == [4, 2]     # halved
    assert ctl.observe(blind, 1.0) == 2
    assert ctl.observe(blind, 2.5) == 4


def test_a_single_thread_has_nothing_to_lower() -> None:
    ctl = ThreadController(full=1, cpus=2)
    assert feed(ctl, [HELD] * 5) == [1] * 5
    assert ctl.changes == 0


class FakeProc:
    """Counters a test moves: the clock, the threads' wait, the machine's use."""

    def __init__(self) -> None:
        self.now, self.wait, self.busy, self.readable = 100.0, 0.0, 0.0, True

    def read(self) -> Reading | None:
        return Reading(self.now, self.wait, 0.0, self.busy) if self.readable else None

    def run(self, seconds: float, wait: float, others: float) -> None:
        self.now += seconds
        self.wait += wait
        self.busy += others * seconds


def stepper(proc: FakeProc, applied: list[int], setting: int | None = None
            ) -> ComputeThreads:
    threads = ComputeThreads(setting, window=0.25, read=proc.read, apply=applied.append,
                             clock=lambda: proc.now, cpus=2)
    threads.begin()
    return threads


def step(threads: ComputeThreads, proc: FakeProc, wait: float, others: float,
         seconds: float = 0.0625) -> None:
    began = proc.now
    proc.run(seconds, wait, others)
    threads.stepped(began)


@pytest.fixture
def two_threads(monkeypatch):
    monkeypatch.setattr("torch.get_num_threads", lambda: 2)


def test_steps_make_windows_and_the_count_is_applied(two_threads) -> None:
    proc, applied = FakeProc(), []
    threads = stepper(proc, applied)
    for _ in range(9):                      # two windows of four steps, after the first
        step(threads, proc, wait=0.05, others=1.0)
    assert applied == [1]
    for _ in range(8):                      # one thread, a core to itself: no change
        step(threads, proc, wait=0.0, others=1.0)
    assert applied == [1]
    assert threads.stats() == {"setting": "auto", "threads": 1, "configured": 2,
                               "adaptive": True, "changes": 1}
    threads.end()
    assert applied == [1, 2]                # torch's count as found


def test_an_idle_gap_starts_a_new_window(two_threads) -> None:
    proc, applied = FakeProc(), []
    threads = stepper(proc, applied)
    for _ in range(8):
        step(threads, proc, wait=0.05, others=1.0)
        proc.run(1.0, 0.0, 0.0)             # idle between steps: no window closes
    assert applied == []
    assert threads.controller is not None and threads.controller.changes == 0


def test_a_fixed_count_is_applied_and_never_adapted(two_threads) -> None:
    proc, applied = FakeProc(), []
    threads = stepper(proc, applied, setting=1)
    for _ in range(30):
        step(threads, proc, wait=0.05, others=1.5)
    assert applied == [1]
    assert threads.stats()["threads"] == 1 and not threads.stats()["adaptive"]


def test_nothing_adapts_without_the_signal_or_on_cuda(two_threads) -> None:
    proc, applied = FakeProc(), []
    proc.readable = False
    blind = stepper(proc, applied)
    cuda = ComputeThreads(None, adaptive=False, read=FakeProc().read, apply=applied.append)
    cuda.begin()
    for _ in range(30):
        step(blind, proc, wait=0.05, others=1.5)
        cuda.stepped(proc.now)
    assert applied == [] and blind.controller is None and cuda.controller is None
