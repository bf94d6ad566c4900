"""Request grouping against swap thrash, with a bound on how long a request is passed over.

When loads compete for memory, serving requests strictly in arrival order swaps models
on every change (A B A C: four loads). Instead:

- requests for resident models run first, without waiting for loads queued behind them;
- a load waits its turn among the loads queued for its device (placed before it waits:
  loads onto different devices run side by side), and the turn goes to the load that serves
  the most waiting requests per second it costs (requests waiting / (estimated seconds to
  move its missing bytes + LOAD_OVERHEAD): the weighted-shortest-first order, which
  minimises the summed wait), oldest first among equals. Each load serves a whole group,
  admitted together in one residency window; a fine-tune whose base is resident costs
  little, so it goes before a swap that would evict that base. Without an estimate a load
  counts its waiting requests alone;
- a load that finds most of its units resident, pins none another load is still reading,
  and fits in the free memory the loads copying there leave (the rules: `Placer.beside`)
  copies beside the load holding its device's turn instead of after it: a burst of
  fine-tunes of a resident base pays its loads' fixed costs side by side, not in turn;
- no request is passed over for longer than `bound` seconds: once the oldest request
  waiting for a load has waited that long, that load goes next, and new requests for
  other models on its device (any device, for a turn taken without one) are held back
  until it is done, so that the models holding the memory drain.

With bound 0, every request is served in arrival order (the thrashing baseline).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edgeserve.model import ResidentModel

POLL = 0.005         # seconds between two looks while waiting
LOAD_OVERHEAD = 0.02  # seconds a load costs besides moving bytes (placement, views, steps)


@dataclass(slots=True)
class _Load:
    model: str
    since: float
    real: bool = True             # False: a prewarm, which never holds requests back
    device: str | None = None     # once placed
    cost: Callable[[], float] | None = None   # estimated seconds to move its missing bytes
    # whether it may copy beside the loads holding its device's turn (their models) now
    beside: Callable[[list[str]], bool] | None = None

    def rank(self, waiting: int) -> float:
        cost = self.cost() if self.cost is not None else 0.0
        return waiting / (min(cost, 1e6) + LOAD_OVERHEAD)


class Grouping:
    def __init__(self, bound: float = 5.0) -> None:
        self.bound = bound
        self.waiting: dict[str, list[float]] = {}     # model -> arrival of each waiter
        self.queue: list[_Load] = []
        self.holders: dict[str, _Load] = {}   # device -> the load copying into it
        self.holder: _Load | None = None      # a turn taken without a device: holds all
        self.sharing: dict[str, list[_Load]] = {}   # device -> loads copying beside its holder
        self.chosen: dict[str | None, _Load | None] = {}   # per device: its next turn,
        #                                                  decided once its last one ends
        self.changes = 0     # turns ended and unloads: the pools may differ from a placement

    # ---- requests ----------------------------------------------------------------------
    def arrived(self, model: str, at: float) -> None:
        self.waiting.setdefault(model, []).append(at)

    def served(self, model: str, at: float) -> None:
        arrivals = self.waiting.get(model, [])
        if at in arrivals:
            arrivals.remove(at)
        if not arrivals:
            self.waiting.pop(model, None)

    def may_run(self, device: str, model: str, arrival: float) -> bool:
        """Whether a request (arrived at `arrival`) for a resident model may start now: not
        while a load for its device (or one taken without a device), asked for before it,
        has been passed over for longer than the bound."""
        now = time.monotonic()
        pending = self.queue + list(self.holders.values()) + \
            [q for lane in self.sharing.values() for q in lane] + \
            ([self.holder] if self.holder is not None else [])
        for q in pending:
            first = self.oldest(q.model, q.since)
            if q.real and q.model != model and q.device in (None, device) and \
                    first < arrival and now - first > self.bound:
                return False
        return True

    def oldest(self, model: str, default: float) -> float:
        return min(self.waiting.get(model, ()), default=default)

    # ---- loads -------------------------------------------------------------------------
    def locked(self) -> bool:
        return self.holder is not None or bool(self.holders) or any(self.sharing.values())

    def unloaded(self) -> None:
        self.changes += 1

    def _next(self, device: str | None) -> _Load | None:
        lane = [q for q in self.queue if q.device == device]
        if not lane:
            return None
        now = time.monotonic()
        overdue = [q for q in lane if now - self.oldest(q.model, q.since) > self.bound]
        if overdue:
            return min(overdue, key=lambda q: self.oldest(q.model, q.since))
        return max(lane, key=lambda q: (q.rank(len(self.waiting.get(q.model, ()))),
                                        -self.oldest(q.model, q.since)))

    def _free(self, device: str | None) -> bool:
        if self.holder is not None:
            return False
        if device is None:
            return not self.holders and not any(self.sharing.values())
        return device not in self.holders and not self.sharing.get(device)

    def _goes_beside(self, entry: _Load) -> bool:
        """Whether entry may copy beside the load holding its device's turn, now."""
        device = entry.device
        if device is None or entry.beside is None or self.holder is not None or \
                device not in self.holders:
            return False
        holding = [self.holders[device], *self.sharing.get(device, [])]
        return entry.beside([q.model for q in holding])

    def _up(self, entry: _Load) -> bool:
        """Whether entry's turn on its device has come; the choice is made once per free
        turn."""
        if not self._free(entry.device):
            return False
        chosen = self.chosen.get(entry.device)
        if chosen is None or chosen not in self.queue:
            chosen = self.chosen[entry.device] = self._next(entry.device)
        return chosen is entry

    @contextlib.asynccontextmanager
    async def turn(self, model: str, real: bool = True,
                   cost: Callable[[], float] | None = None,
                   device: str | None = None,
                   beside: Callable[[list[str]], bool] | None = None
                   ) -> AsyncIterator[bool]:
        """One load at a time on `device` (nothing moves in its pool while a load copies),
        in grouping order; loads on other devices go side by side. Without a device the
        turn holds every device. cost: the load's estimated seconds of moving bytes (None:
        unknown); beside: whether it may copy beside the load holding the turn (None:
        never). Yields whether it went beside."""
        entry = _Load(model, time.monotonic(), real, device, cost, beside)
        self.queue.append(entry)
        shared = False
        try:
            while not self._up(entry):
                if self._goes_beside(entry):
                    shared = True
                    break
                await asyncio.sleep(POLL)
        finally:
            self.queue.remove(entry)
        if shared and device is not None:
            self.sharing.setdefault(device, []).append(entry)
        else:
            if device is None:
                self.holder = entry
            else:
                self.holders[device] = entry
            self.chosen.pop(device, None)
        try:
            yield shared
        finally:
            if shared and device is not None:
                self.sharing[device].remove(entry)
            elif device is None:
                self.holder = None
            else:
                del self.holders[device]
            self.changes += 1

    async def ready(self, models: Mapping[str, ResidentModel], model_id: str,
                    load: Callable[[str], Awaitable[object]]) -> ResidentModel:
        """The resident model once a request for it may start (loaded if need be)."""
        arrival = time.monotonic()
        self.arrived(model_id, arrival)
        try:
            while True:
                model = models.get(model_id)
                if model is None:
                    await load(model_id)
                elif self.may_run(model.pool.device, model_id, arrival):
                    return model
                else:
                    await asyncio.sleep(POLL)
        finally:
            self.served(model_id, arrival)
