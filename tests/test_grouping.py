"""Request grouping: fewer swaps than arrival order on A B A C, with the wait bounded."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
from test_reuse import pool_for_two

from edgeserve import EdgeServer
from edgeserve.config import Config, PoolConfig, SchedulerConfig, TierConfig
from edgeserve.grouping import Grouping


@pytest.fixture
def store(tmp_path, tiny_store):
    root = tmp_path / "store"
    for arch in ("llama", "qwen2", "mistral"):
        shutil.copytree(tiny_store / arch, root / arch)
    return root


def config(store, bound: float) -> Config:
    # One model fits, not two: every change of model is a swap.
    return Config(models=store, device="cpu",
                  pool=PoolConfig(pool_size=pool_for_two(store) * 6 // 10, block_size=4096),
                  tiers=TierConfig(host_size=64 << 20),
                  scheduler=SchedulerConfig(prewarm=False, group_wait=bound))


async def replay(store, bound: float, pattern: str, gap: float = 0.002
                 ) -> tuple[int, list[float]]:
    """Loads and each request's latency for the pattern (A = llama, B = qwen2, C = mistral)."""
    names = {"A": "llama", "B": "qwen2", "C": "mistral"}
    async with EdgeServer(config=config(store, bound)) as es:
        await es.load("llama")
        latencies: list[float] = []

        async def one(i: int, model: str) -> None:
            await asyncio.sleep(i * gap)
            start = time.monotonic()
            await es.complete(model, [1, 2, 3], max_tokens=16, ignore_eos=True)
            latencies.append(time.monotonic() - start)

        await asyncio.gather(*(one(i, names[c]) for i, c in enumerate(pattern)))
        es.pools["cpu"].check_integrity()
        return int(es.stats()["loads"]["loads"]), latencies


async def test_grouping_cuts_swaps_on_a_b_a_c(store):
    pattern = "ABAC" * 3
    fifo, _ = await replay(store, 0.0, pattern)
    grouped, latencies = await replay(store, 5.0, pattern)
    assert grouped < fifo
    assert grouped <= 4                 # the first load, then B and C once each (+1 slack)
    assert max(latencies) < 5.0 + 2.0   # nobody passed over beyond the bound (+ its work)


async def test_a_stream_of_requests_cannot_starve_a_load(store):
    async with EdgeServer(config=config(store, 0.3)) as es:
        await es.load("llama")
        stop = asyncio.Event()

        async def stream_of_a() -> int:
            n = 0
            while not stop.is_set():
                await es.complete("llama", [1, 2], max_tokens=4, ignore_eos=True)
                n += 1
            return n

        streams = [asyncio.create_task(stream_of_a()) for _ in range(3)]
        await asyncio.sleep(0.1)
        start = time.monotonic()
        await es.complete("qwen2", [1, 2], max_tokens=2)
        waited = time.monotonic() - start
        stop.set()
        assert min(await asyncio.gather(*streams)) > 0
        assert waited < 0.3 + 1.5          # the bound, plus the draining requests and a load
        es.pools["cpu"].check_integrity()


async def test_turns_go_to_the_biggest_group_then_the_overdue():
    g = Grouping(bound=10.0)
    g.holder = object()  # type: ignore[assignment]     # a load is running
    now = time.monotonic()
    g.arrived("b", now)
    for _ in range(3):
        g.arrived("c", now + 0.01)
    order: list[str] = []

    async def load(model: str) -> None:
        async with g.turn(model):
            order.append(model)

    tasks = [asyncio.create_task(load(m)) for m in ("b", "c")]
    await asyncio.sleep(0.02)
    g.holder = None
    await asyncio.gather(*tasks)
    assert order == ["c", "b"]          # three requests wait for c, one for b
    g.bound = 0.0                       # now every waiter is overdue: the oldest first
    g.holder = object()  # type: ignore[assignment]
    order.clear()
    tasks = [asyncio.create_task(load(m)) for m in ("c", "b")]
    await asyncio.sleep(0.02)
    g.holder = None
    await asyncio.gather(*tasks)
    assert order == ["b", "c"]


async def test_a_cheap_load_goes_before_a_costly_one_with_more_waiters():
    g = Grouping(bound=10.0)
    g.holder = object()  # type: ignore[assignment]     # a load is running
    now = time.monotonic()
    for _ in range(2):
        g.arrived("swap", now)            # two requests for a model that evicts another
    g.arrived("fine-tune", now + 0.01)    # one for a fine-tune of a resident base
    order: list[str] = []

    async def load(model: str, cost: float) -> None:
        async with g.turn(model, cost=lambda: cost):
            order.append(model)

    tasks = [asyncio.create_task(load("swap", 0.5)),
             asyncio.create_task(load("fine-tune", 0.001))]
    await asyncio.sleep(0.02)
    g.holder = None
    await asyncio.gather(*tasks)
    assert order == ["fine-tune", "swap"]     # 1 / 0.021 s beats 2 / 0.52 s
    # Overdue requests still go first, whatever their load costs.
    g.bound = 0.0
    g.holder = object()  # type: ignore[assignment]
    order.clear()
    tasks = [asyncio.create_task(load("fine-tune", 0.001)),
             asyncio.create_task(load("swap", 0.5))]
    await asyncio.sleep(0.02)
    g.holder = None
    await asyncio.gather(*tasks)
    assert order == ["swap", "fine-tune"]
