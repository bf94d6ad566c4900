"""The live feed behind `GET /admin/live`: one task computes what changed, every subscriber
gets the same bytes.

A subscriber first receives a `snapshot` (every pool's units, resident models, the host
tier, the numbers, the latest events), then `update`s, at most one per tick, carrying
only what changed: per pool the unit rows set and the unit ids dropped, new events, and
models, host tier or numbers when they differ. Nothing is computed while nobody listens.
A subscriber that falls QUEUE updates behind is dropped (it reconnects for a snapshot).
An update costs about a quarter of a millisecond per thousand units; where the pools hold
so many that 4 a second would take over SHARE of the time, updates come less often.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
from aiohttp import web

from edgeserve.api import EdgeServer
from edgeserve.events import EventLog
from edgeserve.poolmap import PoolSnapshot, diff, snapshot
from edgeserve.server import board

logger = logging.getLogger("edgeserve.server")
TICK = 0.25             # seconds between updates: 4 a second at most
SHARE = 0.01            # of the event loop's time the feed may take: huge pools tick slower
NUMBERS_EVERY = 4       # ticks between two readings of the numbers panel
QUEUE = 64              # updates a subscriber may fall behind before it is dropped
KEEPALIVE_S = 15.0      # an SSE comment when nothing changed for this long (proxies)
SNAPSHOT_EVENTS = 100   # events a new subscriber receives


class LiveFeed:
    def __init__(self, es: EdgeServer, log: EventLog, tick: float = TICK) -> None:
        self.es, self.log, self.tick = es, log, tick
        self.subscribers: set[asyncio.Queue[bytes | None]] = set()
        self.pools: dict[str, PoolSnapshot] = {}
        self.state: dict[str, Any] = {}          # models, host, numbers as last sent
        self.seq = 0                             # the last event sent
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    # ---- subscribers -------------------------------------------------------------------
    def subscribe(self) -> tuple[asyncio.Queue[bytes | None], bytes]:
        """A queue of encoded updates, and the snapshot they apply to."""
        if self._task is None or self._task.done():
            self.refresh()
            self._task = asyncio.create_task(self._run())
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE)
        self.subscribers.add(queue)
        return queue, self._snapshot()

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.subscribers.discard(queue)

    async def close(self) -> None:
        for queue in list(self.subscribers):
            self._drop(queue)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _drop(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.subscribers.discard(queue)
        while True:                     # make room for the end mark
            try:
                queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                queue.get_nowait()

    # ---- computing ---------------------------------------------------------------------
    def refresh(self) -> None:
        of = board.models_of(self.es)
        self.pools = {name: snapshot(p, of) for name, p in self.es.pools.items()}
        self.state = self._state(numbers=True)
        self.seq = self.log.last_seq

    def _state(self, numbers: bool) -> dict[str, Any]:
        state = {"models": board.resident_models(self.es), "host": board.host_tier(self.es)}
        if numbers:
            state["numbers"] = board.numbers(self.es)
        return state

    def _snapshot(self) -> bytes:
        events = [e.to_json() for e in self.log.since(0, SNAPSHOT_EVENTS) if e.seq <= self.seq]
        body = {"time": time.time(), "tick": self.tick,
                "pools": [s.to_json() for s in self.pools.values()], "events": events,
                **self.state}
        return _sse("snapshot", body)

    def update(self) -> bytes | None:
        """The next update (advancing the feed's state), or None when nothing changed."""
        self.ticks += 1
        of = board.models_of(self.es)
        body: dict[str, Any] = {}
        changes = []
        for name, pool in self.es.pools.items():
            new = snapshot(pool, of)
            old = self.pools.get(name)
            change = diff(old, new) if old is not None else {**new.to_json(), "full": True}
            if change is not None:
                changes.append(change)
            self.pools[name] = new
        if changes:
            body["pools"] = changes
        events = self.log.since(self.seq)
        if events:
            self.seq = events[-1].seq
            body["events"] = [e.to_json() for e in events]
        numbers = self.ticks % NUMBERS_EVERY == 0 or bool(events)    # loads count at once
        for key, value in self._state(numbers).items():
            if self.state.get(key) != value:
                self.state[key] = body[key] = value
        if not body:
            return None
        body["time"] = time.time()
        return _sse("update", body)

    async def _run(self) -> None:
        quiet, pause = 0.0, self.tick
        while self.subscribers:
            await asyncio.sleep(pause)
            start = time.perf_counter()
            try:
                frame = self.update()
            except Exception:   # a model released under our feet, say
                logger.exception("the live feed could not compute an update")
                frame = self._resync()
            pause = max(self.tick, (time.perf_counter() - start) / SHARE)
            if frame is None:
                quiet += pause
                if quiet < KEEPALIVE_S:
                    continue
                frame, quiet = b": keep-alive\n\n", 0.0
            else:
                quiet = 0.0
            for queue in list(self.subscribers):
                try:
                    queue.put_nowait(frame)
                except asyncio.QueueFull:
                    self._drop(queue)


    def _resync(self) -> bytes | None:
        """A snapshot for everyone after a failed update (whose changes may be half taken);
        if even that fails, subscribers are dropped and reconnect."""
        try:
            self.refresh()
            return self._snapshot()
        except Exception:
            logger.exception("the live feed could not take a snapshot")
            for queue in list(self.subscribers):
                self._drop(queue)
            return None


def _sse(name: str, body: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(body) + b"\n\n"


async def stream(request: web.Request, feed: LiveFeed) -> web.StreamResponse:
    """`GET /admin/live`: the feed as server-sent events, until the client leaves."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    queue, first = feed.subscribe()
    try:
        await resp.write(first)
        while (frame := await queue.get()) is not None:
            await resp.write(frame)
    except ConnectionError:
        pass
    finally:
        feed.unsubscribe(queue)
    return resp
