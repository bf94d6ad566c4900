"""Events from the step thread to request coroutines, one event-loop wake-up per burst.

A decode step finishes a token for every running sequence at once. Handing each to its
request's queue with its own `call_soon_threadsafe` wakes the event loop once per token;
the mailbox collects them and wakes it once for all that arrive before it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
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


def resolve(future: asyncio.Future[Any], call: Callable[[], Any]) -> None:
    """Run call here and hand its outcome to the future on its own event loop."""
    loop = future.get_loop()
    result, error = None, None
    try:
        result = call()
    except BaseException as e:  # handed to the awaiting coroutine
        error = e
    with contextlib.suppress(RuntimeError):     # a closed loop: nobody is waiting any more
        loop.call_soon_threadsafe(settle, future, result, error)


def settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
