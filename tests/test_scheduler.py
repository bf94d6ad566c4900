"""Model residency: single-flight loads, keep-alive expiry, pinning, graceful shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest

from edgeserve import EdgeServer, GenerationError
from edgeserve.results import ServerClosing


def server(store) -> EdgeServer:
    return EdgeServer(models=store, device="cpu", pool_size="64MiB", block_size="4KiB")


async def wait_for(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


async def test_keep_alive_zero_unloads_after_the_request(tiny_store):
    async with server(tiny_store) as es:
        await es.load("llama")
        es.keep_alive("llama", 0)
        await es.complete("llama", [1, 2, 3], max_tokens=4, ignore_eos=True)
        await wait_for(lambda: "llama" not in es.models)
        stats = es.stats()["devices"]["cpu"]
        assert stats["retained_bytes"] == stats["bytes_by_kind"]["weight"] > 0
        es.pools["cpu"].check_integrity()


async def test_keep_alive_waits_for_running_requests_and_restarts(tiny_store):
    async with server(tiny_store) as es:
        await es.load("llama")
        es.keep_alive("llama", 0.05)
        stream = es.stream_complete("llama", [1, 2], max_tokens=60, ignore_eos=True)
        pieces = [d async for d in stream]            # runs past the 50 ms keep-alive
        assert pieces[-1].finish_reason == "length" and "llama" in es.models
        await wait_for(lambda: "llama" not in es.models)


async def test_negative_keep_alive_and_pins_keep_the_model(tiny_store):
    async with server(tiny_store) as es:
        await es.load("llama")
        await es.load("qwen2")
        es.keep_alive("llama", -1)
        es.pin("qwen2")
        es.keep_alive("qwen2", 0)
        await es.complete("llama", [1, 2], max_tokens=2)
        await es.complete("qwen2", [1, 2], max_tokens=2)
        await asyncio.sleep(0.1)
        assert {"llama", "qwen2"} <= set(es.models)
        es.pin("qwen2", False)
        es.keep_alive("qwen2", 0)
        await wait_for(lambda: "qwen2" not in es.models)


def hold_after_first_token(engine, release: threading.Event) -> None:
    """Hold the step thread once a sequence has its first token, until `release` is set,
    so that the request is surely still running when the test acts."""
    step = engine.step

    def stepping() -> None:
        step()
        if any(s.sampled for s in engine._running):
            release.wait(10)
    engine.step = stepping


async def test_shutdown_lets_running_requests_finish(tiny_store):
    es = await server(tiny_store).start()
    release = threading.Event()
    hold_after_first_token(es.engine, release)
    running = asyncio.create_task(es.complete("llama", [1, 2, 3], max_tokens=30,
                                              ignore_eos=True))
    await wait_for(lambda: es.engine is not None and es.engine.num_running == 1)
    shutting = asyncio.create_task(es.shutdown(deadline=30))
    await wait_for(lambda: es._closing)
    release.set()
    await shutting
    assert (await running).usage.completion_tokens == 30
    with pytest.raises((ServerClosing, RuntimeError)):
        await es.complete("llama", [1], max_tokens=1)


async def test_shutdown_deadline_cancels_what_is_left(tiny_store):
    es = await server(tiny_store).start()
    running = asyncio.create_task(es.complete("llama", [1, 2, 3], max_tokens=100000 // 200,
                                              ignore_eos=True))
    await wait_for(lambda: es.engine is not None and es.engine.num_running == 1)
    await es.shutdown(deadline=0.0)
    with pytest.raises(GenerationError, match="stopped"):
        await running
    assert es.pools["cpu"].bytes_by_kind() == {"weight": 0, "task_block": 0, "expert": 0,
                                               "kv": 0}
