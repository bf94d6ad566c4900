"""Events from the step thread to request coroutines, one event-loop wake-up per burst.

A decode step finishes a token for every running sequence at once. Handing each to its
request's queue with its own `call_soon_threadsafe` wakes the event loop once per token;
the mailbox collects them and wakes it once for all that arrive before it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class Mailbox:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []
        self._scheduled = False

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """Put item in queue on the loop's thread (callable from any thread)."""
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):     # the loop closed: nobody listens
            self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)
