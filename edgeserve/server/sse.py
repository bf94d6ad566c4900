"""Server-sent events: the stream of one request's choices, keep-alives while a model loads,
and errors after the headers as the stream's last event."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from aiohttp import web

from edgeserve.results import Delta, Usage
from edgeserve.server.app import api_error
from edgeserve.server.choices import Choices

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}     # tells proxies not to buffer the stream
KEEPALIVE = b": keep-alive\n\n"       # an SSE comment: clients skip it
KEEPALIVE_S = 1.0
DONE = b"data: [DONE]\n\n"


def event(payload: bytes) -> bytes:
    return b"data: " + payload + b"\n\n"


class Chunks(Protocol):
    """The events of one API's stream format."""

    def start(self, n: int) -> bytes: ...

    def delta(self, index: int, delta: Delta) -> bytes: ...

    def usage(self, usage: Usage) -> bytes: ...


async def stream(request: web.Request, choices: Choices, chunks: Chunks, *,
                 loading: bool, include_usage: bool) -> web.StreamResponse:
    """Answer with the events of `choices`; closing it in any case.

    Normally the headers wait for the first delta, so that a request the server refuses
    (bad prompt, no memory, busy) still gets its own HTTP status. While a model loads
    (`loading`), the headers go at once and keep-alives follow until the first delta.
    """
    try:
        first: tuple[int, Delta] | None
        if not loading:
            choices.read_directly()     # nothing cancels a pending read on this path
            first = await anext(choices)
            resp = await _open(request)
        else:
            resp = await _open(request)
            first = await _first_with_keepalives(resp, choices)
        if first is not None:
            with contextlib.suppress(ConnectionError):  # the client left: aclose cancels
                await _relay(resp, choices, chunks, first, include_usage)
        return resp
    finally:
        await choices.aclose()


async def _open(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers=SSE_HEADERS)
    await resp.prepare(request)
    return resp


async def _first_with_keepalives(resp: web.StreamResponse, choices: Choices
                                 ) -> tuple[int, Delta] | None:
    """The first delta, with a keep-alive every KEEPALIVE_S; None if the stream ended."""
    try:
        while True:
            try:
                # A timeout cancels only the wait on the queue: no delta is lost.
                return await asyncio.wait_for(anext(choices), KEEPALIVE_S)
            except TimeoutError:
                await resp.write(KEEPALIVE)
    except ConnectionError:
        return None
    except Exception as e:
        await send_error(resp, e)
        return None


async def _relay(resp: web.StreamResponse, choices: Choices, chunks: Chunks,
                 first: tuple[int, Delta], include_usage: bool) -> None:
    try:
        await resp.write(chunks.start(choices.n) + chunks.delta(*first))
        async for index, delta in choices:
            data = chunks.delta(index, delta)
            if data:
                await resp.write(data)
    except ConnectionError:
        raise
    except Exception as e:
        await send_error(resp, e)
        return
    await resp.write((chunks.usage(choices.usage()) if include_usage else b"") + DONE)


async def send_error(resp: web.StreamResponse, e: Exception) -> None:
    """The headers are gone: the error becomes the stream's last event."""
    with contextlib.suppress(ConnectionError):
        await resp.write(event(api_error(e).body()))
