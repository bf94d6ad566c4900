"""Placement across devices (simulated: separate CPU pools) by expected time to first token."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
from hf_models import hf_greedy

from edgeserve import EdgeServer
from edgeserve.demand import DemandHistory
from edgeserve.eviction import CostAware, PolicyContext
from edgeserve.loader import read_spec
from edgeserve.placement import Missing, Placement, Score
from edgeserve.pool import BlockPool, UnitKind
from edgeserve.results import InvalidRequest
from edgeserve.server import create_app


@pytest.fixture
def store(family_store):
    return family_store


def server(store, sizes: str, devices: str = "cpu:0,cpu:1") -> EdgeServer:
    return EdgeServer(models=store, device=devices, pool_size=sizes, block_size="4KiB",
                      host_size="64MiB", prewarm=False)


def check(es: EdgeServer) -> None:
    for pool in es.pools.values():
        pool.check_integrity()


def scores(report) -> dict:
    return report.placement["scores"]


async def test_devices_and_pool_sizes_are_separate_pools(store):
    async with server(store, "2MiB,1MiB,1MiB", "cpu:0,cpu:1,cpu:2") as es:
        assert [p.total_bytes for p in es.pools.values()] == [2 << 20, 1 << 20, 1 << 20]
        assert set(es.stats()["devices"]) == {"cpu:0", "cpu:1", "cpu:2"}
    with pytest.raises(ValueError, match="3 sizes for 2"):
        await server(store, "1MiB,1MiB,1MiB").start()


async def test_a_fine_tune_loads_where_its_base_is(store):
    async with server(store, "2MiB,1MiB") as es:
        await es.load("llama", device="cpu:1")
        report = await es.load("llama-ft")
        assert report.device == "cpu:1" and not report.placement["override"]
        assert scores(report)["cpu:1"]["move_s"] < 0.2 * scores(report)["cpu:0"]["move_s"]
        assert report.bytes_from_device > 0.8 * report.bytes_total
        assert es.models["llama-ft"].pool is es.pools["cpu:1"]
        out = await es.complete("llama-ft", [3, 14, 15], max_tokens=6, temperature=0,
                                ignore_eos=True)
        assert out.token_ids == hf_greedy(store / "llama-ft", [3, 14, 15], 6)
        check(es)


async def test_retained_units_win_over_more_free_memory(store):
    async with server(store, "2MiB,1MiB") as es:
        await es.load("qwen2", device="cpu:1")
        await es.unload("qwen2")                      # its units stay retained on cpu:1
        report = await es.load("qwen2")
        assert report.device == "cpu:1" and report.bytes_from_device == report.bytes_total
        terms = scores(report)
        assert terms["cpu:0"]["free_bytes"] > terms["cpu:1"]["free_bytes"]
        assert terms["cpu:1"]["move_s"] == 0 < terms["cpu:0"]["move_s"]
        check(es)


async def test_the_device_whose_evictions_cost_least_wins(store):
    # Each pool holds one model (and some KV), not two; cpu:0 has more free memory.
    async with server(store, "800KiB,720KiB") as es:
        await es.load("llama", device="cpu:0")
        for _ in range(3):                                  # llama is in demand
            await es.complete("llama", [1, 2, 3], max_tokens=2)
        await es.load("qwen2", device="cpu:1")              # qwen2 never asked for
        await es.unload("llama")
        await es.unload("qwen2")
        held = es.pools["cpu:0"].bytes_by_kind()["weight"]
        report = await es.load("mistral")
        terms = scores(report)
        assert terms["cpu:0"]["free_bytes"] > terms["cpu:1"]["free_bytes"]
        assert terms["cpu:0"]["evict_s"] > 0 == terms["cpu:1"]["evict_s"]
        assert report.device == "cpu:1"
        assert es.pools["cpu:0"].bytes_by_kind()["weight"] == held   # llama kept
        check(es)


async def test_explicit_device_overrides_the_score(store):
    async with server(store, "2MiB,2MiB") as es:
        await es.load("llama", device="cpu:1")
        report = await es.load("llama-ft", device="cpu:0")
        assert report.device == "cpu:0" and report.placement["override"]
        assert report.bytes_from_disk == report.bytes_total
        assert scores(report)["cpu:1"]["total_s"] < scores(report)["cpu:0"]["total_s"]
        with pytest.raises(InvalidRequest, match="resident on cpu:1"):
            await es.load("llama", device="cpu:0")
        with pytest.raises(InvalidRequest, match="not one of"):
            await es.load("qwen2", device="cuda:3")
        check(es)


async def test_device_on_the_admin_route(store, aiohttp_client):
    es = server(store, "2MiB,2MiB")
    client = await aiohttp_client(create_app(es))
    resp = await client.post("/admin/models/qwen2/load?device=cpu:1")
    assert resp.status == 200 and (await resp.json())["device"] == "cpu:1"
    resp = await client.post("/admin/models/mistral/load", json={"device": "cpu:0"})
    body = await resp.json()
    assert body["device"] == "cpu:0" and body["placement"]["override"] is True
    resp = await client.post("/admin/models/llama/load", json={"device": "tpu:0"})
    assert resp.status == 400
    pool = await (await client.get("/admin/pool")).json()
    assert pool["devices"]["cpu:1"]["resident_models"].keys() == {"qwen2"}
    resp = await client.get("/api/ps")
    models = {m["name"]: m["devices"] for m in (await resp.json())["models"]}
    assert models["qwen2"].keys() == {"cpu:1"} and models["mistral"].keys() == {"cpu:0"}


def test_score_terms_and_ties():
    ctx = PolicyContext(DemandHistory())
    placement = Placement(ctx, step_seconds=0.01)
    a = BlockPool("cpu:0", 64 << 10, 4096, storage=False)
    b = BlockPool("cpu:1", 128 << 10, 4096, storage=False)
    missing = [Missing(8192, "disk"), Missing(8192, "host")]
    sa = placement.score(a, missing, set(), [], [], queued_steps=0)
    sb = placement.score(b, missing, set(), [], [], queued_steps=0)
    bw = ctx.bandwidth
    assert sa.move_s == pytest.approx(8192 / bw["disk"] + 8192 / bw["host"])
    assert Placement.choose([sa, sb]).device == "cpu:1"          # tie: more free memory
    # Nothing evicted: a bandwidth measured 3% higher on cpu:0 is no reason to go there.
    placement.measured("cpu:0", "disk", bw["disk"] * 1.1)       # EWMA: +3%
    placement.measured("cpu:0", "host", bw["host"] * 1.1)
    faster = placement.score(a, missing, set(), [], [], queued_steps=0)
    assert sb.total_s / 1.05 < faster.total_s < sb.total_s
    assert Placement.choose([faster, sb]).device == "cpu:1"
    placement.measured("cpu:0", "disk", bw["disk"] * 2)         # far faster: it wins
    placement.measured("cpu:0", "host", bw["host"] * 2)
    much = placement.score(a, missing, set(), [], [], queued_steps=0)
    assert Placement.choose([much, sb]).device == "cpu:0"
    # Another device within 5%, with more free memory but missing more of the model: the
    # one holding most of it (its base there, a queue ahead) wins.
    base_there = placement.score(a, missing[:1], set(), [], [], queued_steps=1)
    slower = Placement(ctx, step_seconds=0.01)
    empty = slower.score(b, missing, set(), [], [], queued_steps=0)
    empty = dataclasses.replace(empty, move_s=base_there.total_s * 1.03)  # a little higher
    assert base_there.total_s < empty.total_s < base_there.total_s * 1.05
    assert empty.free_bytes > base_there.free_bytes
    assert Placement.choose([base_there, empty]).device == "cpu:0"
    busy = placement.score(b, missing, set(), [], [], queued_steps=5)
    assert busy.queue_s == pytest.approx(0.05)
    assert Placement.choose([sa, busy]).device == "cpu:0"        # queued work counts
    # A device that cannot make room scores infinity.
    full = placement.score(a, [Missing(1 << 20, "disk")], set(), [], [], queued_steps=0)
    assert not full.fits and Placement.choose([full, sb]).device == "cpu:1"
    # None fits (busy models hold the room): the device whose own work drains first.
    big = [Missing(1 << 20, "disk")]
    busy_a = placement.score(a, big, set(), [], [], queued_steps=9, own_steps=8)
    busy_b = placement.score(b, big, set(), [], [], queued_steps=9, own_steps=1)
    assert not busy_a.fits and not busy_b.fits and busy_a.queue_s == busy_b.queue_s
    assert Placement.choose([busy_a, busy_b]).device == "cpu:1"


def test_eviction_loss_follows_demand():
    ctx = PolicyContext(DemandHistory())
    placement = Placement(ctx)
    pool = BlockPool("cpu:0", 16 << 10, 4096, storage=False)
    hot = pool.allocate(UnitKind.WEIGHT, 8192, key="hot", owner="h", pin=False)
    cold = pool.allocate(UnitKind.WEIGHT, 8192, key="cold", owner="c", pin=False)
    for _ in range(5):
        ctx.demand.record("h")
    need = [Missing(8192, "disk")]
    only_cold = placement.score(pool, need, set(), [cold, hot], [], 0)
    only_hot = placement.score(pool, need, set(), [hot, cold], [], 0)
    assert only_cold.evict_s == 0 < only_hot.evict_s
    # A load never evicts a unit it needs itself.
    assert not placement.score(pool, [Missing(16384, "disk")], {"hot"}, [hot, cold], [],
                               0).fits
    assert isinstance(only_cold, Score)


def test_eviction_loss_tells_demand_apart_and_counts_waiting_requests():
    ctx = PolicyContext(DemandHistory())
    placement = Placement(ctx)
    pool = BlockPool("cpu:0", 32 << 10, 4096, storage=False)
    units = {m: pool.allocate(UnitKind.WEIGHT, 8192, key=m, owner=m, pin=False)
             for m in ("busy", "rare", "waited")}
    now = time.monotonic()
    for _ in range(20):
        ctx.demand.record("busy", now)
    ctx.demand.record("rare", now)
    reload_s = 8192 / ctx.bandwidth[ctx.comes_back_from(units["busy"])]
    # A decayed count would make both near certain; the rate over the horizon does not.
    assert placement.loss(units["rare"], "cpu:0") < 0.3 * placement.loss(units["busy"], "cpu:0")
    assert placement.loss(units["busy"], "cpu:0") < reload_s
    # A request waiting now for the model: the unit is needed for sure.
    assert placement.loss(units["waited"], "cpu:0") == 0.0
    ctx.waiting = {"waited": [now]}
    assert placement.loss(units["waited"], "cpu:0") == pytest.approx(reload_s)
    assert ctx.reuse(units["waited"]) == 1


def test_a_load_evicts_on_the_device_where_nobody_waits():
    ctx = PolicyContext(DemandHistory())
    placement = Placement(ctx)
    a = BlockPool("cpu:0", 16 << 10, 4096, storage=False)
    b = BlockPool("cpu:1", 16 << 10, 4096, storage=False)
    on_a = a.allocate(UnitKind.WEIGHT, 16 << 10, key="x", owner="x", pin=False)
    on_b = b.allocate(UnitKind.WEIGHT, 16 << 10, key="y", owner="y", pin=False)
    now = time.monotonic()
    for _ in range(3):
        ctx.demand.record("y", now)       # y was asked for more, but nobody waits for it
    ctx.demand.record("x", now)
    ctx.waiting = {"x": [now, now]}       # two requests wait for x (its load is queued)
    need = [Missing(8192, "disk")]
    sa = placement.score(a, need, set(), [on_a], [], 0)
    sb = placement.score(b, need, set(), [on_b], [], 0)
    assert sb.evict_s < sa.evict_s and Placement.choose([sa, sb]).device == "cpu:1"


def test_waiting_requests_keep_their_units_last_in_the_eviction_order():
    ctx = PolicyContext(DemandHistory())
    pool = BlockPool("cpu:0", 32 << 10, 4096, storage=False)
    units = [pool.allocate(UnitKind.WEIGHT, 8192, key=m, owner=m, pin=False)
             for m in ("waited", "asked")]
    for _ in range(2):
        ctx.demand.record("asked")
    ctx.waiting = {"waited": [time.monotonic()] * 3}
    assert [u.key for u in CostAware().unit_order(units, ctx)] == ["asked", "waited"]


async def test_a_queued_load_is_estimated_by_the_bytes_it_misses(store):
    async with server(store, "2MiB,1MiB") as es:
        s = es.scheduler
        for name in ("llama", "llama-ft", "qwen2"):     # hashes cached: keys are known
            s.hashes.get(store / name / "model.safetensors")
        await es.load("llama", device="cpu:1")
        for name in ("llama-ft", "qwen2"):
            path = s.store.path(name)
            cost = await s.placer.queue(name, path, read_spec(path), None, frozenset())
            assert cost() == s.placer.estimate(name)
        fine_tune, other = s.placer.estimate("llama-ft"), s.placer.estimate("qwen2")
        assert 0 < fine_tune < 0.3 * other
        # The base's units now count the fine-tune's waiting requests as their reuse.
        base_key = next(u.key for u in es.models["llama"].distinct_units)
        assert "llama-ft" in s.ctx.users[base_key]
        assert s.placer.estimate("never-queued") == math.inf


def test_reuse_is_counted_over_the_device_s_time_between_swaps():
    ctx = PolicyContext(DemandHistory())
    placement = Placement(ctx)
    pool = BlockPool("cpu:0", 32 << 10, 4096, storage=False)
    hot, warm = (pool.allocate(UnitKind.WEIGHT, 8192, key=m, owner=m, pin=False)
                 for m in ("hot", "warm"))
    now = time.monotonic()
    for _ in range(40):
        ctx.demand.record("hot", now)
    for _ in range(20):
        ctx.demand.record("warm", now)
    # Over the default horizon both are near certain to come back: the same loss.
    assert placement.loss(warm, "cpu:0") > 0.95 * placement.loss(hot, "cpu:0")
    for t in (0.0, 1.0, 2.0, 3.0):        # the device swaps every second
        placement.swapped("cpu:0", now + t)
    assert placement.window["cpu:0"] == pytest.approx(1.0)
    assert placement.loss(warm, "cpu:0") < 0.7 * placement.loss(hot, "cpu:0")
    assert "cpu:1" not in placement.window
