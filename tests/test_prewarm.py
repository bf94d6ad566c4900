"""Predictive prewarming: periodic demand, idle-time loads, yielding, never evicting more."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import replace

import pytest
from test_scheduler import wait_for

from edgeserve import EdgeServer
from edgeserve.config import Config, PoolConfig, SchedulerConfig, TierConfig
from edgeserve.demand import DemandHistory


@pytest.fixture
def store(tmp_path, tiny_store):
    root = tmp_path / "store"
    for arch in ("llama", "qwen2"):
        shutil.copytree(tiny_store / arch, root / arch)
    return root


def config(store, pool: int = 16 << 20, host: int = 64 << 20, prewarm: bool = False,
           chunk: int = 32 << 20) -> Config:
    return Config(models=store, device="cpu", pool=PoolConfig(pool_size=pool, block_size=4096),
                  tiers=TierConfig(host_size=host, read_chunk=chunk),
                  scheduler=SchedulerConfig(prewarm=prewarm))


def periodic(es: EdgeServer, model: str, period: float = 1.0, bursts: int = 3) -> None:
    """A history of bursts every `period` s, the next one due now."""
    now = time.monotonic()
    for i in range(bursts, 0, -1):
        es.scheduler.ctx.demand.record(model, now - i * period)




def test_demand_finds_the_period_between_bursts():
    d = DemandHistory(burst_gap=0.5)
    for t in (0.0, 0.1, 0.2, 2.0, 2.05, 4.1, 6.0):
        d.record("a", t)
    assert len(d.bursts["a"]) == 4 and d.period("a") == pytest.approx(2.0, abs=0.11)
    assert d.next_burst("a", now=6.5) == pytest.approx(6.0 + d.period("a"))
    assert d.next_burst("a", now=11.0) == pytest.approx(6.0 + 3 * d.period("a"))
    for t in (0.0, 1.0, 5.0, 5.8):                      # irregular: no period
        d.record("b", t)
    assert d.period("b") is None and d.next_burst("b") is None


async def test_a_periodic_model_is_loaded_in_idle_time(store):
    async with EdgeServer(config=config(store, prewarm=True)) as es:
        periodic(es, "llama")
        # The model is resident a moment before the prewarm that loaded it counts itself.
        await wait_for(lambda: es.stats()["prewarm"]["prewarms"] >= 1)
        assert "llama" in es.models and es.stats()["prewarm"]["prewarms"] == 1
        await es.complete("llama", [1, 2, 3], max_tokens=2)
        assert es.stats()["prewarm"]["hits"] == 1
        assert "qwen2" not in es.models                 # no history, no prewarm
        metrics = es.metrics.render().decode()
        assert "edgeserve:prewarms 1.0" in metrics and "edgeserve:prewarm_hits 1.0" in metrics
        es.pools["cpu"].check_integrity()


async def test_a_prewarm_yields_to_a_real_request_at_once(store, monkeypatch):
    import edgeserve.tiers as tiers

    read = tiers.read_into

    def slow(path, offset, buffer):               # llama's reads crawl: 0.1 s per 4 KiB
        if "llama" in str(path):
            time.sleep(0.1)
        read(path, offset, buffer)

    monkeypatch.setattr(tiers, "read_into", slow)
    async with EdgeServer(config=config(store, chunk=4096)) as es:
        periodic(es, "llama")
        prewarm = asyncio.create_task(es.scheduler.prewarm.prewarm("llama"))
        await wait_for(lambda: es.scheduler.grouping.locked() and es.pools["cpu"].units)
        start = time.monotonic()
        await es.complete("qwen2", [1, 2, 3], max_tokens=2)
        assert time.monotonic() - start < 1.5        # the whole llama read takes > 2.5 s
        assert await prewarm is None and "llama" not in es.models
        stats = es.stats()["prewarm"]
        assert stats["cancelled"] == 1 and stats["prewarms"] == 0
        pool = es.pools["cpu"]
        assert set(pool.bytes_by_owner()) == {"qwen2"}    # what the prewarm took went back
        pool.check_integrity()


def one_model_pool(store) -> int:
    from test_reuse import pool_for_two

    return pool_for_two(store) * 6 // 10


async def test_a_prewarm_never_evicts_a_more_valuable_unit(store):
    # No host room: retained units would come back from disk, at full cost.
    async with EdgeServer(config=config(store, pool=one_model_pool(store), host=4096)) as es:
        for _ in range(8):
            await es.complete("qwen2", [1, 2, 3], max_tokens=1)
        await es.unload("qwen2")                  # retained, and often asked for
        held = es.pools["cpu"].bytes_by_kind()["weight"]
        periodic(es, "llama")                     # asked for less often
        assert await es.scheduler.prewarm.prewarm("llama") is None
        assert "llama" not in es.models and es.pools["cpu"].bytes_by_kind()["weight"] == held
        es.pools["cpu"].check_integrity()


async def test_a_prewarm_unloads_an_idle_model_only_if_worth_less(store):
    async with EdgeServer(config=config(store, pool=one_model_pool(store))) as es:
        await es.load("qwen2")                    # resident, idle, never asked for
        periodic(es, "llama")
        assert await es.scheduler.prewarm.prewarm("llama") == "cpu"
        assert "llama" in es.models and "qwen2" not in es.models
        es.pools["cpu"].check_integrity()


async def test_a_prewarm_without_device_room_goes_to_the_host_tier(store):
    async with EdgeServer(config=config(store, pool=one_model_pool(store))) as es:
        for _ in range(20):                       # resident, idle and much in demand
            await es.complete("qwen2", [1, 2, 3], max_tokens=1)
        periodic(es, "llama")
        assert await es.scheduler.prewarm.prewarm("llama") == "host"
        assert "qwen2" in es.models and "llama" not in es.models
        await es.unload("qwen2")
        report = await es.load("llama")
        assert report.bytes_from_host == report.bytes_total > 0
        es.pools["cpu"].check_integrity()


def bursts(es: EdgeServer, model: str, starts: list[float], size: int) -> None:
    for start in starts:
        for j in range(size):
            es.scheduler.ctx.demand.record(model, start + 0.01 * j)


@pytest.mark.parametrize("qwen2_next", [1.5, 0.2])
async def test_a_prewarm_takes_the_room_of_a_model_asked_for_only_after_it(store, qwen2_next):
    """qwen2 is asked for more (6 requests a burst against 1) but, when its next burst
    comes after llama's, keeping it serves nothing before llama's: llama takes its room.
    When qwen2's burst comes first, its higher rate keeps it."""
    async with EdgeServer(config=config(store, pool=one_model_pool(store))) as es:
        await es.load("qwen2")
        now = time.monotonic()
        bursts(es, "qwen2", [now + qwen2_next - 2.0 * i for i in (3, 2, 1)], 6)
        bursts(es, "llama", [now + 0.3 - i for i in (3, 2, 1)], 1)
        history = es.scheduler.prewarm.history
        assert history.score("qwen2") > history.score("llama")
        where = await es.scheduler.prewarm.prewarm("llama")
        if qwen2_next > 0.3:
            assert where == "cpu" and "qwen2" not in es.models and "llama" in es.models
        else:
            assert where == "host" and "qwen2" in es.models and "llama" not in es.models
        es.pools["cpu"].check_integrity()


async def test_a_prewarm_unloads_every_idle_model_holding_the_room_it_needs(store):
    """A base and its copy share every unit: unloading one frees nothing, so the prewarm
    unloads both (or none), never failing half way for want of room."""
    shutil.copytree(store / "llama", store / "llama-copy")
    async with EdgeServer(config=config(store, pool=one_model_pool(store))) as es:
        await es.load("llama")
        await es.load("llama-copy")
        pool = es.pools["cpu"]
        assert {u.id for u in es.models["llama"].distinct_units} == \
            {u.id for u in es.models["llama-copy"].distinct_units}
        periodic(es, "qwen2")
        assert await es.scheduler.prewarm.prewarm("qwen2") == "cpu"
        assert "qwen2" in es.models
        assert "llama" not in es.models and "llama-copy" not in es.models
        pool.check_integrity()


async def test_a_periodic_model_due_first_keeps_its_room_however_rarely_asked_for(store):
    """qwen2 is asked for less than llama (1 request a burst against 6), but its next burst
    comes first: evicting it would only swap it back in on demand. Its room stays."""
    async with EdgeServer(config=config(store, pool=one_model_pool(store))) as es:
        await es.load("qwen2")
        now = time.monotonic()
        bursts(es, "qwen2", [now + 0.2 - 2.0 * i for i in (3, 2, 1)], 1)
        bursts(es, "llama", [now + 0.6 - i for i in (3, 2, 1)], 6)
        history = es.scheduler.prewarm.history
        assert history.score("llama") > history.score("qwen2")
        assert await es.scheduler.prewarm.prewarm("llama") == "host"
        assert "qwen2" in es.models and "llama" not in es.models
        es.pools["cpu"].check_integrity()


@pytest.mark.parametrize("later", ["cpu:0", "cpu:1"])
async def test_a_prewarm_takes_the_device_whose_models_are_asked_for_latest(
        family_store, later):
    """Two devices, each full with one idle periodic model: llama's prewarm evicts the one
    whose next burst comes later (Belady's choice), whichever device that is, though that
    one is asked for more (placement's eviction loss would pick the other)."""
    pool = one_model_pool(family_store)
    cfg = replace(config(family_store), device="cpu:0,cpu:1",
                  pool=PoolConfig(pool_size=pool, block_size=4096))
    async with EdgeServer(config=cfg) as es:
        sooner = "cpu:1" if later == "cpu:0" else "cpu:0"
        await es.load("qwen2", device=later)
        await es.load("mistral", device=sooner)
        now = time.monotonic()
        bursts(es, "qwen2", [now + 3.0 - 4.0 * i for i in (3, 2, 1)], 4)
        bursts(es, "mistral", [now + 1.0 - 2.0 * i for i in (3, 2, 1)], 1)
        bursts(es, "llama", [now + 0.5 - i for i in (3, 2, 1)], 1)
        assert await es.scheduler.prewarm.prewarm("llama") == later
        assert "qwen2" not in es.models and es.models["mistral"].pool.device == sooner
        for p in es.pools.values():
            p.check_integrity()


async def test_a_request_joining_a_prewarm_that_just_yielded_loads_anew(store):
    """The prewarm's load ended (cancelled) but is still listed, its done callback not yet
    run: a real load that joins it must start its own load, not join it again forever."""
    from edgeserve.tiers import LoadCancelled

    async with EdgeServer(config=config(store)) as es:
        ended: asyncio.Future = asyncio.get_running_loop().create_future()
        ended.set_exception(LoadCancelled("the prewarm yielded"))
        es.scheduler._loading["llama"] = ended        # type: ignore[assignment]
        report = await asyncio.wait_for(es.load("llama"), 30)
        assert "llama" in es.models and report.bytes_total > 0
        assert "llama" not in es.scheduler._loading
        es.pools["cpu"].check_integrity()
