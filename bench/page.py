"""The web page's cost: decode throughput with 8 streams, with and without the live feed open.

The server runs as `edgeserve serve` in its own process, on the demo model. In alternating
rounds, 8 clients stream chats (fixed length, ignore_eos) for the same time, either alone
or with the page's live feed (`GET /admin/live`) open and read, as the page reads it; with
`--browser`, the page itself is open in headless Chromium instead (the browser then shares
the CPU with the server, as it would on a one-box set-up). Throughput is the tokens
streamed during a round, counted as they arrive. Prints one JSON line
with tokens/s per mode, the feed's updates and bytes per second, the on/off throughput
ratio, the median of the rounds' ratios (target: at least 0.97), and, measured in-process
while the same 8 streams decode, the CPU time of computing one update and the share of
the time it takes (thread CPU time: hardly touched by other work on the machine).

    .venv/bin/python bench/page.py [--streams 8] [--seconds 8] [--rounds 5] [--browser]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
from serve import MODEL, OUT, free_port, server_process, wait_ready

from edgeserve import EdgeServer
from edgeserve.demo import build_demo
from edgeserve.events import EventLog
from edgeserve.server.live import LiveFeed

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


async def one_chat(session: aiohttp.ClientSession, url: str, i: int, max_tokens: int,
                   tally: list[int]) -> None:
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Request {i}: tell me about pools."}]}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:        # one chunk per token and sequence
            if line.startswith(b"data: {") and b'"content":"' in line \
                    and b'"content":""' not in line:
                tally[0] += 1


async def decode(session: aiohttp.ClientSession, url: str, streams: int, seconds: float,
                 max_tokens: int) -> float:
    """Tokens per second streamed to `streams` clients during `seconds` (each client
    starts a new request when one ends; those still running at the end are cut)."""
    tally = [0]
    counter = iter(range(1 << 30))

    async def client() -> None:
        while True:
            await one_chat(session, url, next(counter), max_tokens, tally)

    tasks = [asyncio.create_task(client()) for _ in range(streams)]
    start = time.perf_counter()
    await asyncio.sleep(seconds)
    tokens, elapsed = tally[0], time.perf_counter() - start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await settle(session, url)
    return tokens / elapsed


async def settle(session: aiohttp.ClientSession, url: str) -> None:
    """Wait until the server has no request left (cut streams end at its next step), so
    that no round inherits the previous one's work."""
    for _ in range(600):
        async with session.get(f"{url}/admin/pool") as resp:
            requests = (await resp.json())["requests"]
        if requests["running"] + requests["waiting"] == 0:
            return
        await asyncio.sleep(0.1)


class FeedReader:
    """Reads the live feed as the page does, counting updates and bytes."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session, self.url = session, url
        self.updates = 0
        self.bytes = 0

    async def run(self) -> None:
        async with self.session.get(f"{self.url}/admin/live") as resp:
            async for line in resp.content:
                self.bytes += len(line)
                if line.startswith(b"data: "):
                    json.loads(line[6:])          # the page parses every update
                    self.updates += 1


@contextlib.contextmanager
def browser_page(url: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 860})
        page.goto(url + "/")
        page.wait_for_selector("#conn.ok")
        try:
            yield page
        finally:
            browser.close()


async def with_feed(session: aiohttp.ClientSession, url: str, args: argparse.Namespace,
                    feeds: list[tuple[int, int, float]]) -> float:
    if args.browser:
        # Playwright's sync API runs on a thread of its own; the page lives while we decode.
        opened, done = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()

        def hold() -> None:
            with browser_page(url):
                loop.call_soon_threadsafe(opened.set)
                asyncio.run_coroutine_threadsafe(done.wait(), loop).result()

        holder = asyncio.create_task(asyncio.to_thread(hold))
        await opened.wait()
        try:
            return await decode(session, url, args.streams, args.seconds, args.max_tokens)
        finally:
            done.set()
            await holder
    reader = FeedReader(session, url)
    task = asyncio.create_task(reader.run())
    await asyncio.sleep(0.5)            # the snapshot is in
    first = (reader.updates, reader.bytes)
    start = time.perf_counter()
    rate = await decode(session, url, args.streams, args.seconds, args.max_tokens)
    feeds.append((reader.updates - first[0], reader.bytes - first[1],
                  time.perf_counter() - start))
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return rate


async def update_cost(args: argparse.Namespace) -> dict[str, float]:
    """In-process, the CPU time of computing one update while `streams` requests decode:
    a figure the machine's noise hardly touches (thread CPU time, not wall time)."""
    es = EdgeServer(models=OUT, device="cpu", pool_size=args.pool_size)
    async with es:
        await es.load(MODEL)
        log = EventLog()
        log.attach(es.pools.values())
        feed = LiveFeed(es, log)
        feed.refresh()
        costs: list[float] = []
        changed = 0
        end = time.perf_counter() + args.seconds

        async def chats() -> None:
            while time.perf_counter() < end:
                await es.chat(MODEL, [{"role": "user", "content": "tell me about pools"}],
                              max_tokens=args.max_tokens, temperature=0, ignore_eos=True)

        async def ticks() -> None:
            nonlocal changed
            while time.perf_counter() < end:
                await asyncio.sleep(feed.tick)
                start = time.thread_time()
                changed += feed.update() is not None
                costs.append(time.thread_time() - start)

        start = time.perf_counter()
        await asyncio.gather(ticks(), *[chats() for _ in range(args.streams)])
        wall = time.perf_counter() - start
    return {"update_cpu_ms_p50": round(1000 * statistics.median(costs), 3),
            "update_cpu_ms_max": round(1000 * max(costs), 3),
            "updates_with_changes": changed, "updates": len(costs),
            "update_cpu_share": round(sum(costs) / wall, 5)}


async def run(args: argparse.Namespace) -> dict[str, object]:
    build_demo(OUT)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    off: list[float] = []
    on: list[float] = []
    feeds: list[tuple[int, int, float]] = []
    with server_process(port, args.pool_size):
        await wait_ready(url)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=timeout) as session:
            await decode(session, url, args.streams, 1.0, 4)           # warm-up
            for _ in range(args.rounds):
                await asyncio.sleep(0.5)        # as long as the feed's start below
                off.append(await decode(session, url, args.streams, args.seconds,
                                        args.max_tokens))
                on.append(await with_feed(session, url, args, feeds))
    cost = await update_cost(args)
    ratios = [b / a for a, b in zip(off, on, strict=True)]
    out: dict[str, object] = {
        "bench": "page", "mode": "browser" if args.browser else "feed",
        "streams": args.streams, "seconds": args.seconds, "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "tokens_per_s_off": round(statistics.median(off), 1),
        "tokens_per_s_on": round(statistics.median(on), 1),
        "ratio": round(statistics.median(ratios), 4),
        "ratio_rounds": [round(r, 4) for r in ratios], **cost}
    if feeds:
        out["feed_updates_per_s"] = round(sum(u for u, _, _ in feeds) /
                                          sum(s for _, _, s in feeds), 2)
        out["feed_bytes_per_s"] = round(sum(b for _, b, _ in feeds) /
                                        sum(s for _, _, s in feeds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--pool-size", default="1GiB")
    parser.add_argument("--browser", action="store_true",
                        help="open the page in headless Chromium rather than reading the feed")
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        print(json.dumps(runner.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
