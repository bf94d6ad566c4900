"""HTTP overhead: N concurrent streaming chats over loopback against the same load in-process.

The server runs as `edgeserve serve` in its own process; the in-process run drives
EdgeServer.stream_chat directly. Both serve the demo model with the same requests for
the same time, in alternating rounds. Prints one JSON line with requests/s, TTFT and
inter-token latency p50/p95, errors, and the HTTP/in-process ratio of p50 TTFT, the median
of the rounds' ratios (target: at most 1.10 at 32 streams).

    .venv/bin/python bench/serve.py [--streams 32] [--seconds 8] [--rounds 5] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from edgeserve import EdgeServer
from edgeserve.demo import build_demo

OUT = Path(__file__).parent / "out" / "serve-store"
MODEL = "demo-llama"


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0

    def merge(self, other: Tally) -> None:
        self.ttft += other.ttft
        self.itl += other.itl
        self.requests += other.requests
        self.errors += other.errors

    def summary(self, seconds: float) -> dict[str, float]:
        def pct(xs: list[float], q: float) -> float:
            return round(1000 * statistics.quantiles(xs, n=100)[int(q) - 1], 2) if len(xs) > 1 \
                else float("nan")

        return {"requests_per_s": round(self.requests / seconds, 2), "errors": self.errors,
                "ttft_p50_ms": pct(self.ttft, 50), "ttft_p95_ms": pct(self.ttft, 95),
                "itl_p50_ms": pct(self.itl, 50), "itl_p95_ms": pct(self.itl, 95)}


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Request {i}: tell me about memory pools."}]


async def timed(stream: AsyncIterator[str], tally: Tally, start: float) -> None:
    last = None
    async for _ in stream:
        now = time.perf_counter()
        if last is None:
            tally.ttft.append(now - start)
        else:
            tally.itl.append(now - last)
        last = now
    tally.requests += 1


async def http_stream(session: aiohttp.ClientSession, url: str, i: int,
                      max_tokens: int) -> AsyncIterator[str]:
    body = {"model": MODEL, "messages": messages(i), "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        # The client only measures: it spots content chunks by their bytes rather than
        # parsing each one, so that it takes as little CPU from the server as it can.
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            if line.startswith(b'data: {"error"'):
                raise RuntimeError(json.loads(line[6:])["error"]["message"])
            if b'"content":"' in line and b'"content":""' not in line:
                yield ""


async def local_stream(es: EdgeServer, i: int, max_tokens: int) -> AsyncIterator[str]:
    async for delta in es.stream_chat(MODEL, messages(i), max_tokens=max_tokens,
                                      temperature=0, ignore_eos=True):
        if delta.text:
            yield delta.text


async def load(make: Callable[[int], AsyncIterator[str]], streams: int,
               seconds: float) -> Tally:
    tally = Tally()
    end = time.perf_counter() + seconds
    counter = iter(range(1 << 30))

    async def client() -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            try:
                await timed(make(next(counter)), tally, start)
            except Exception:
                tally.errors += 1

    await asyncio.gather(*[client() for _ in range(streams)])
    return tally


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server_process(port: int, pool_size: str):  # type: ignore[no-untyped-def]
    exe = Path(sys.executable).parent / "edgeserve"
    proc = subprocess.Popen([str(exe), "serve", "--models", str(OUT), "--port", str(port),
                             "--device", "cpu", "--pool-size", pool_size],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError("the server did not start")


async def run(args: argparse.Namespace) -> dict[str, object]:
    """Rounds alternate in-process and HTTP, so that the machine's noise hits both."""
    build_demo(OUT)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    local, remote = Tally(), Tally()
    ratios: list[float] = []
    n, seconds = args.streams, args.seconds
    with server_process(port, args.pool_size):
        await wait_ready(url)
        limits = aiohttp.TCPConnector(limit=n)
        timeout = aiohttp.ClientTimeout(total=300)
        async with EdgeServer(models=OUT, device="cpu", pool_size=args.pool_size) as es, \
                aiohttp.ClientSession(connector=limits, timeout=timeout) as session:
            await es.load(MODEL)
            await load(lambda i: local_stream(es, i, 4), n, 1.0)              # warm-ups
            await load(lambda i: http_stream(session, url, i, 4), n, 1.0)
            for _ in range(args.rounds):
                a = await load(lambda i: local_stream(es, i, args.max_tokens), n, seconds)
                b = await load(lambda i: http_stream(session, url, i, args.max_tokens), n,
                               seconds)
                ratios.append(statistics.median(b.ttft) / statistics.median(a.ttft))
                local.merge(a)
                remote.merge(b)
    total = seconds * args.rounds
    return {"bench": "serve", "streams": n, "seconds": total, "rounds": args.rounds,
            "max_tokens": args.max_tokens, "http": remote.summary(total),
            "in_process": local.summary(total),
            "ttft_p50_ratio": round(statistics.median(ratios), 3),
            "ttft_p50_ratio_rounds": [round(r, 3) for r in ratios]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=8.0, help="per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--pool-size", default="1GiB")
    try:        # the same event loop as `edgeserve serve`, for the client and in-process runs
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        print(json.dumps(runner.run(run(parser.parse_args()))))


if __name__ == "__main__":
    main()
