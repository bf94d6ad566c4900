"""Fixtures for the HTTP layer: an EdgeServer on the demo store, behind the aiohttp app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from edgeserve.api import EdgeServer
from edgeserve.server import create_app
from edgeserve.server.app import url_of

ServeApp = Callable[[web.Application], Awaitable[str]]


@pytest.fixture
def edge(demo_store: Path) -> EdgeServer:
    return EdgeServer(models=demo_store, device="cpu", pool_size="256MiB")


@pytest.fixture
async def client(aiohttp_client: Any, edge: EdgeServer) -> Any:
    return await aiohttp_client(create_app(edge))


@pytest.fixture
async def serve_app() -> AsyncIterator[ServeApp]:
    """Serves apps on 127.0.0.1 (any free port) in the test's loop; gives each one's URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        runner = web.AppRunner(app, handler_cancellation=True)
        runners.append(runner)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return url_of(runner.addresses[0])

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def live_url(serve_app: ServeApp, edge: EdgeServer) -> str:
    return await serve_app(create_app(edge))
