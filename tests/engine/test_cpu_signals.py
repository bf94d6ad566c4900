"""Contention counters from /proc: a window's figures, and nothing where they are missing."""

from __future__ import annotations

import sys
import threading

import pytest

from edgeserve.engine import cpu_signals
from edgeserve.engine.cpu_signals import Reading, Sample, between


def test_a_window_s_figures() -> None:
    a = Reading(at=10.0, wait=1.0, own=5.0, busy=100.0)
    b = Reading(at=10.5, wait=1.2, own=5.9, busy=101.4)
    s = between(a, b)
    assert s.wall == pytest.approx(0.5)
    assert s.wait == pytest.approx(0.2)
    assert s.others == pytest.approx(1.0)                   # (1.4 - 0.9) / 0.5
    assert s.wait_share(2) == pytest.approx(0.2)            # 0.2 s over 2 threads x 0.5 s


def test_a_thread_that_ended_takes_its_wait_along() -> None:
    a = Reading(at=0.0, wait=3.0, own=0.0, busy=None)
    s = between(a, Reading(at=1.0, wait=1.0, own=0.5, busy=None))
    assert s.wait == 0.0 and s.others is None


def test_an_empty_window_has_no_share() -> None:
    assert Sample(wall=0.0, wait=0.1, others=None).wait_share(2) == 0.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_the_counters_are_read_on_linux() -> None:
    first = cpu_signals.read()
    if first is None:
        pytest.skip("this kernel keeps no schedstat")
    spin = threading.Thread(target=lambda: sum(range(200_000)))
    spin.start()
    spin.join()
    second = cpu_signals.read()
    assert second is not None and first.busy is not None and second.busy is not None
    assert second.at > first.at and second.own > first.own and second.busy >= first.busy


def test_nothing_is_read_without_proc(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(cpu_signals, "_TASKS", str(tmp_path / "missing"))
    assert cpu_signals.read() is None
    (tmp_path / "tasks" / "1").mkdir(parents=True)          # a task without its schedstat
    monkeypatch.setattr(cpu_signals, "_TASKS", str(tmp_path / "tasks"))
    assert cpu_signals.run_queue_wait() is None
