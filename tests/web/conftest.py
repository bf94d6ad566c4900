"""Fixtures for the web page: a store of two demo models, a server on its own thread, and
Debian's Chromium driven by Playwright (skipped, with the reason, where either is missing)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from edgeserve.api import EdgeServer
from edgeserve.demo import build_demo
from edgeserve.server import create_app
from edgeserve.server.app import url_of

CHROMIUM = Path(os.environ.get("EDGESERVE_CHROMIUM", "/usr/bin/chromium"))   # Debian's
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "test-output" / "web"


@pytest.fixture(scope="session")
def two_model_store(demo_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """demo-llama and demo-other: same architecture and tokenizer, other weights."""
    root = tmp_path_factory.mktemp("two")
    shutil.copytree(demo_store / "demo-llama", root / "demo-llama")
    build_demo(root, "demo-other", seed=1)
    return root


class ServerThread:
    """An EdgeServer behind the HTTP app, served on 127.0.0.1 from a thread of its own, so
    that the browser tests can drive Playwright's synchronous API from the test thread."""

    def __init__(self, es: EdgeServer, **app_options: Any) -> None:
        self.es, self.app_options = es, app_options
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        runner = web.AppRunner(create_app(self.es, **self.app_options),
                               handler_cancellation=True, shutdown_timeout=2)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.url = url_of(runner.addresses[0])
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the server did not start")
        return self

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run a coroutine function on the server's loop and wait for its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(60)

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture
def serve(two_model_store: Path) -> Iterator[Callable[..., ServerThread]]:
    """serve(pool_size=..., api_key=...) -> a running ServerThread, stopped after the test."""
    started: list[ServerThread] = []

    def start(pool_size: str = "64MiB", **app_options: Any) -> ServerThread:
        es = EdgeServer(models=two_model_store, device="cpu", pool_size=pool_size)
        server = ServerThread(es, **app_options).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"Chromium is not installed at {CHROMIUM} (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A browser page that records console errors and page errors."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.errors: list[str] = []
        page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def screenshot(self, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1440, "height": 860})
    try:
        yield Page(context.new_page())
    finally:
        context.close()
