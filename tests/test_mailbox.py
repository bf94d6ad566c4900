"""The mailbox: items posted from another thread arrive in order, with one wake-up per burst."""

from __future__ import annotations

import asyncio
import threading

from edgeserve.mailbox import Mailbox


async def test_items_arrive_in_order_and_bursts_share_a_wakeup(monkeypatch):
    loop = asyncio.get_running_loop()
    box = Mailbox(loop)
    queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(4)]
    wakeups = 0
    real = loop.call_soon_threadsafe

    def counting(*args):  # type: ignore[no-untyped-def]
        nonlocal wakeups
        wakeups += 1
        return real(*args)

    monkeypatch.setattr(loop, "call_soon_threadsafe", counting)

    def burst(start: int) -> None:
        for i in range(start, start + 100):
            box.post(queues[i % 4], i)

    thread = threading.Thread(target=burst, args=(0,))
    thread.start()
    thread.join()                       # the loop did not run meanwhile: one wake-up
    assert wakeups == 1
    got = [[await q.get() for _ in range(25)] for q in queues]
    assert got == [list(range(k, 100, 4)) for k in range(4)]
    burst(100)                          # a later burst wakes the loop again
    assert wakeups == 2
    assert await queues[0].get() == 100


async def test_posting_after_the_loop_closed_is_harmless():
    loop = asyncio.new_event_loop()
    box = Mailbox(loop)
    loop.close()
    box.post(asyncio.Queue(), 1)        # nobody listens: dropped, no error
