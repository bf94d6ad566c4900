"""Streams over live connections: keep-alives while a model loads, errors after the
headers, and clients that leave (their sequences are cancelled, their KV pages return)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from edgeserve.api import EdgeServer
from edgeserve.server import create_app
from edgeserve.server.app import url_of

MODEL = "demo-llama"
MESSAGES = [{"role": "user", "content": "Tell me about memory pools."}]
GREEDY = {"max_tokens": 5, "temperature": 0}


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, **GREEDY, **extra}


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until condition() holds; fails after timeout."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"still not true after {timeout} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def idle(edge: EdgeServer) -> bool:
    engine = edge.engine
    return engine is not None and engine.num_running + engine.num_waiting == 0


@pytest.fixture
async def url(edge: EdgeServer) -> AsyncIterator[str]:
    """A real server on 127.0.0.1 that cancels the handler of a client that leaves."""
    runner = web.AppRunner(create_app(edge), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield url_of(runner.addresses[0])
    await runner.cleanup()


# ---- loading ------------------------------------------------------------------------------
@pytest.fixture
def slow_load(edge: EdgeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading takes 0.3 s; keep-alives come every 0.05 s."""
    from edgeserve.server import sse

    load = edge.load

    async def slow(model_id: str) -> Any:
        await asyncio.sleep(0.3)
        return await load(model_id)

    monkeypatch.setattr(edge, "load", slow)
    monkeypatch.setattr(sse, "KEEPALIVE_S", 0.05)


@pytest.mark.usefixtures("slow_load")
async def test_keepalives_while_the_model_loads(client: Any, edge: EdgeServer) -> None:
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    raw = await resp.text()
    head, _, rest = raw.partition("data: ")
    assert head.count(": keep-alive\n\n") >= 3 and head == ": keep-alive\n\n" * head.count(":")
    assert rest.endswith("data: [DONE]\n\n")
    await edge.unload(MODEL)
    async with openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="none",
                                  max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                                   stream=True, **GREEDY)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == (await edge.chat(MODEL, MESSAGES, **GREEDY)).text


@pytest.mark.usefixtures("slow_load")
async def test_errors_after_keepalives_are_events(client: Any, edge: EdgeServer) -> None:
    too_long = [{"role": "user", "content": "memory " * 3000}]
    resp = await client.post("/v1/chat/completions",
                             json=chat_body(stream=True, messages=too_long))
    assert resp.status == 200
    raw = await resp.text()
    assert raw.startswith(": keep-alive\n\n")
    error = json.loads(raw.rpartition("data: ")[2])["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "messages")
    # Now resident: the same request gets a real status, streamed or not.
    for stream in (True, False):
        resp = await client.post("/v1/chat/completions",
                                 json=chat_body(stream=stream, messages=too_long))
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "messages"


# ---- clients that leave --------------------------------------------------------------------
async def test_dropped_streams_give_their_memory_back(url: str, edge: EdgeServer) -> None:
    await edge.load(MODEL)
    baseline = {name: pool.bytes_by_kind() for name, pool in edge.pools.items()}

    async def one(session: aiohttp.ClientSession, i: int) -> str | None:
        drop = i % 2 == 0
        # A dropped stream would run for 2000 tokens if it were not cancelled.
        resp = await session.post(f"{url}/v1/chat/completions", json=chat_body(
            stream=True, temperature=1, seed=i, ignore_eos=True,
            max_tokens=2000 if drop else 16))
        assert resp.status == 200
        if drop:
            await resp.content.readline()       # the first event: its sequence runs
            resp.close()
            return None
        return await resp.text()

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(one(session, i) for i in range(50)))
    finished = [r for r in results if r is not None]
    assert len(finished) == 25
    for raw in finished:
        events = raw.rstrip("\n").split("\n\n")
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["choices"][0][
            "finish_reason"] == "length"
    # Cancellations land at the next engine step.
    await eventually(lambda: idle(edge) and all(
        pool.bytes_by_kind() == baseline[name] for name, pool in edge.pools.items()))
    for pool in edge.pools.values():
        assert pool.peak_by_kind()["kv"] > 0
        pool.check_integrity()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_a_client_that_leaves_cancels_its_request(url: str, edge: EdgeServer,
                                                        path: str) -> None:
    await edge.load(MODEL)
    body = json.dumps(chat_body(prompt="Pools", max_tokens=1500, ignore_eos=True, n=2))
    host, port = url.removeprefix("http://").rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    await writer.drain()
    engine = edge.engine
    assert engine is not None
    await eventually(lambda: engine.num_running == 2)
    writer.close()          # not streamed: nothing is written that could fail
    # 1500 tokens take seconds; the cancelled sequences end at the next step.
    assert await eventually(lambda: idle(edge)) < 1.0
    for pool in edge.pools.values():
        assert pool.bytes_by_kind()["kv"] == 0
        pool.check_integrity()
