"""Events of the pool's life: loads, unloads, evictions, demotions, prewarms.

Each pool may have one `EventLog` attached: a bounded, numbered record that readers poll
with `since(seq)`. Code anywhere publishes by calling one function,

    events.publish(pool, "load", model="demo-llama", bytes_from_disk=...)

which costs a dictionary lookup when no log is attached. Evictions are recorded by the
log itself through the pool's `on_evict` hook. Publishers may run on any thread (the
engine's step thread evicts, the event loop loads); the log takes a lock.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from edgeserve.pool import BlockPool, Unit

CAPACITY = 500      # events kept per log; older ones are dropped

_logs: weakref.WeakKeyDictionary[BlockPool, EventLog] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, slots=True)
class Event:
    seq: int                # increases by one per event of a log
    time: float             # seconds since the epoch
    kind: str               # load, unload, evict, demote, prewarm, ...
    device: str
    model: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": round(self.time, 3), "kind": self.kind,
                "device": self.device, "model": self.model, **self.data}


class EventLog:
    """The last CAPACITY events of the pools it is attached to."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self.last_seq = 0

    def attach(self, pools: Iterable[BlockPool]) -> None:
        """Record what happens to these pools (evictions included) from now on; a pool has
        one log at a time, so another log attached to it stops recording it."""
        for pool in pools:
            current = _logs.get(pool)
            if current is self:
                continue
            if current is not None:
                current.detach([pool])
            _logs[pool] = self
            pool.on_evict.append(_EvictRecorder(self, pool.device))

    def detach(self, pools: Iterable[BlockPool]) -> None:
        for pool in pools:
            if _logs.get(pool) is self:
                del _logs[pool]
            pool.on_evict[:] = [h for h in pool.on_evict
                                if not (isinstance(h, _EvictRecorder) and h.log is self)]

    def add(self, kind: str, device: str, model: str | None = None, /, **data: Any) -> Event:
        data.pop("device", None)        # the pool's, already in the event
        with self._lock:
            seq = next(self._seq)
            event = Event(seq, time.time(), kind, device, model, data)
            self._events.append(event)
            self.last_seq = seq
        return event

    def since(self, seq: int, limit: int | None = None) -> list[Event]:
        """Events numbered above seq, oldest first (at most `limit`, the newest ones)."""
        if seq >= self.last_seq:
            return []
        with self._lock:
            out = [e for e in self._events if e.seq > seq]
        return out[-limit:] if limit else out


@dataclass(frozen=True, slots=True)
class _EvictRecorder:
    log: EventLog
    device: str

    def __call__(self, unit: Unit) -> None:
        self.log.add("evict", self.device, unit.owner, unit=unit.id, unit_kind=unit.kind.value,
                     bytes=unit.nbytes)


def publish(pool: BlockPool, kind: str, /, model: str | None = None, **data: Any) -> None:
    """Record an event of `pool` in its log, if one is attached (else nothing happens)."""
    log = _logs.get(pool)
    if log is not None:
        log.add(kind, pool.device, model, **data)


def log_of(pool: BlockPool) -> EventLog | None:
    return _logs.get(pool)
