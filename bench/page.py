"""The web page's cost: decode throughput with 8 streams, with and without the live feed open.

The server runs as `edgeserve serve` in its own process, on the demo model. 8 clients
stream chats (fixed length, ignore_eos) without pause for the whole run; meanwhile the
run alternates windows of the same length without the page and with it: the page's live
feed (`GET /admin/live`) open and parsed as the page parses it, or with `--browser` the page
itself open in headless Chromium (the browser then shares the CPU with the server, as on
a one-box set-up). Windows alternate off-on, on-off, ... so that a drift of the machine's
load hits both alike. Per window: tokens streamed (counted as they arrive) and the server
process's CPU time (from /proc). Prints one JSON line: tokens/s per mode, the on/off
throughput ratio (the median of the pairs' ratios; target: at least 0.97), the same for
CPU time per token, the feed's updates and bytes per second, and, measured in-process
while 8 streams decode, the CPU time of computing one update and its share of the time
(thread CPU time: hardly touched by other work on the machine). The server's event loop
thread's CPU time per second, on and off, shows what the feed adds there (HTTP included).

    .venv/bin/python bench/page.py [--streams 8] [--seconds 3] [--rounds 20] [--browser]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from serve import MODEL, OUT, free_port, server_process, wait_ready

from edgeserve import EdgeServer
from edgeserve.demo import build_demo
from edgeserve.events import EventLog
from edgeserve.server.live import LiveFeed

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


async def chats(session: aiohttp.ClientSession, url: str, max_tokens: int,
                tally: list[int]) -> None:
    """One client: a streamed chat after another, its tokens counted as they arrive."""
    for i in range(1 << 30):
        body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Request {i}: tell me about pools."}]}
        async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.content:        # one chunk per token and sequence
                if line.startswith(b"data: {") and b'"content":"' in line \
                        and b'"content":""' not in line:
                    tally[0] += 1


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU seconds a process has used (all its threads), or one of its threads, from /proc."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class FeedReader:
    """Reads the live feed as the page does: every update parsed."""

    updates: int = 0
    bytes: int = 0
    snapshot: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, session: aiohttp.ClientSession, url: str) -> None:
        async with session.get(f"{url}/admin/live") as resp:
            async for line in resp.content:
                self.bytes += len(line)
                if line.startswith(b"data: "):
                    json.loads(line[6:])
                    self.updates += 1
                    self.snapshot.set()


@contextlib.asynccontextmanager
async def feed_open(session: aiohttp.ClientSession, url: str) -> AsyncIterator[FeedReader]:
    reader = FeedReader()
    task = asyncio.create_task(reader.run(session, url))
    await asyncio.wait_for(reader.snapshot.wait(), 30)
    try:
        yield reader
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class Window:
    on: bool
    tokens_per_s: float
    cpu_per_token: float
    loop_cpu: float                 # the event loop thread's CPU seconds per second
    updates: int = 0
    bytes: int = 0


async def window(on: bool, measure: float, pid: int, tally: list[int],
                 reader: FeedReader | None = None) -> Window:
    tokens, cpu, start = tally[0], cpu_seconds(pid), time.perf_counter()
    loop = cpu_seconds(pid, pid)            # the main thread runs the event loop
    updates, nbytes = (reader.updates, reader.bytes) if reader else (0, 0)
    await asyncio.sleep(measure)
    elapsed, n = time.perf_counter() - start, tally[0] - tokens
    out = Window(on, n / elapsed, (cpu_seconds(pid) - cpu) / max(1, n),
                 (cpu_seconds(pid, pid) - loop) / elapsed)
    if reader is not None:
        out.updates, out.bytes = reader.updates - updates, reader.bytes - nbytes
    return out


async def measure_on(args: argparse.Namespace, session: aiohttp.ClientSession, url: str,
                     pid: int, tally: list[int], browser: object | None) -> Window:
    if browser is not None:
        page = await browser.new_page(viewport={"width": 1440, "height": 860})  # type: ignore[attr-defined]
        await page.goto(url + "/")
        await page.wait_for_selector("#conn.ok")
        try:
            return await window(True, args.seconds, pid, tally)
        finally:
            await page.close()
    async with feed_open(session, url) as reader:
        return await window(True, args.seconds, pid, tally, reader)


@contextlib.asynccontextmanager
async def chromium(wanted: bool) -> AsyncIterator[object | None]:
    if not wanted:
        yield None
        return
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path="/usr/bin/chromium",
                                          args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


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
        end = time.perf_counter() + 4 * args.seconds

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
    windows: list[Window] = []
    tally = [0]
    with server_process(port, args.pool_size) as proc:
        await wait_ready(url)
        timeout = aiohttp.ClientTimeout(total=None)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=timeout) as session, \
                chromium(args.browser) as browser:
            clients = [asyncio.create_task(chats(session, url, args.max_tokens, tally))
                       for _ in range(args.streams)]
            await asyncio.sleep(3.0)            # every client streaming, caches warm
            for r in range(args.rounds):
                for on in ((False, True) if r % 2 == 0 else (True, False)):
                    windows.append(await measure_on(args, session, url, proc.pid, tally,
                                                    browser) if on else
                                   await window(False, args.seconds, proc.pid, tally))
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
    cost = await update_cost(args)
    off = [w for w in windows if not w.on]
    on = [w for w in windows if w.on]
    pairs = [(a, b) for a, b in zip(off, on, strict=True) if a.tokens_per_s and b.tokens_per_s]
    ratio = [b.tokens_per_s / a.tokens_per_s for a, b in pairs]
    cpu = [b.cpu_per_token / a.cpu_per_token for a, b in pairs]
    out: dict[str, object] = {
        "bench": "page", "mode": "browser" if args.browser else "feed",
        "streams": args.streams, "seconds": args.seconds, "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "tokens_per_s_off": round(statistics.median(w.tokens_per_s for w in off), 1),
        "tokens_per_s_on": round(statistics.median(w.tokens_per_s for w in on), 1),
        "ratio": round(statistics.median(ratio), 4),
        "ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratio, n=4)],
        "server_cpu_ms_per_token_off": round(1000 * statistics.median(
            w.cpu_per_token for w in off), 3),
        "server_cpu_ms_per_token_on": round(1000 * statistics.median(
            w.cpu_per_token for w in on), 3),
        "cpu_per_token_ratio": round(statistics.median(cpu), 4),
        "cpu_ratio_quartiles": [round(q, 3) for q in statistics.quantiles(cpu, n=4)],
        "loop_cpu_ms_per_s_off": round(1000 * statistics.median(w.loop_cpu for w in off), 1),
        "loop_cpu_ms_per_s_on": round(1000 * statistics.median(w.loop_cpu for w in on), 1),
        "pairs_without_tokens": len(off) - len(pairs),
        "tokens_per_s_windows": [round(w.tokens_per_s, 1) for w in windows], **cost}
    if not args.browser:
        seconds = args.seconds * len(on)
        out["feed_updates_per_s"] = round(sum(w.updates for w in on) / seconds, 2)
        out["feed_bytes_per_s"] = round(sum(w.bytes for w in on) / seconds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0, help="per window")
    parser.add_argument("--rounds", type=int, default=20, help="pairs of windows")
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
