"""The page's routes: the page and its assets, the live feed, the event log, unit details."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from typing import Any

from aiohttp.test_utils import TestClient

from edgeserve.api import EdgeServer
from edgeserve.poolmap import apply, snapshot
from edgeserve.server import board, create_app
from edgeserve.server.board import models_of
from edgeserve.server.live import LiveFeed
from edgeserve.server.web import EVENTS, FEED

MODEL = "demo-llama"


async def next_event(resp: Any, timeout: float = 10.0) -> tuple[str, dict[str, Any]]:
    """The next named SSE event of a response (comments skipped)."""
    name, data = "message", []
    while True:
        line = (await asyncio.wait_for(resp.content.readline(), timeout)).decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            return name, json.loads("".join(data))


async def test_page_and_assets(client: TestClient) -> None:
    resp = await client.get("/")
    assert resp.status == 200 and resp.content_type == "text/html"
    assert '<script type="module" src="/ui/main.js">' in await resp.text()
    for name, kind in (("main.js", "javascript"), ("style.css", "text/css")):
        resp = await client.get(f"/ui/{name}")
        assert resp.status == 200 and kind in resp.content_type
        assert resp.headers["Cache-Control"] == "no-cache"
    assert (await client.get("/ui/nothing.js")).status == 404


async def test_the_key_guards_everything_but_the_page(aiohttp_client: Any,
                                                     edge: EdgeServer) -> None:
    client = await aiohttp_client(create_app(edge, api_key="k"))
    assert (await client.get("/")).status == 200
    assert (await client.get("/ui/api.js")).status == 200
    for path in ("/admin/live", "/admin/events", "/admin/units/cpu/1", "/v1/models"):
        assert (await client.get(path)).status == 401, path
    ok = await client.get("/admin/events", headers={"Authorization": "Bearer k"})
    assert ok.status == 200


async def test_live_feed_sends_a_snapshot_then_diffs(client: TestClient,
                                                     edge: EdgeServer) -> None:
    resp = await client.get("/admin/live")
    assert resp.headers["Content-Type"] == "text/event-stream"
    name, first = await next_event(resp)
    assert name == "snapshot" and first["models"] == {} and first["events"] == []
    assert [p["device"] for p in first["pools"]] == ["cpu"] and first["pools"][0]["units"] == []
    assert first["numbers"]["running"] == 0 and first["tick"] == 0.25
    await edge.load(MODEL)
    page, events, models = first["pools"][0], [], {}
    while not (MODEL in models and any(e["kind"] == "load" for e in events)):
        name, update = await next_event(resp)
        assert name == "update"
        for change in update.get("pools", []):
            page = apply(page, change)
        events += update.get("events", [])
        models = update.get("models", models)
    load = next(e for e in events if e["kind"] == "load")
    assert load["model"] == MODEL and load["bytes_from_disk"] > 0 and load["device"] == "cpu"
    assert models[MODEL]["device"] == "cpu" and models[MODEL]["pinned"] is False
    pool = edge.pools["cpu"]
    assert sorted(page["units"]) == sorted(snapshot(pool, models_of(edge)).to_json()["units"])
    assert all(row[5] == [MODEL] and row[4] > 0 for row in page["units"])
    resp.close()


async def test_feed_update_is_empty_when_nothing_changed(client: TestClient,
                                                         edge: EdgeServer) -> None:
    feed = LiveFeed(edge, client.app[EVENTS])      # driven by hand: no task of its own
    feed.refresh()
    feed.ticks = 100                # 101..103: not a tick that reads the numbers
    assert feed.update() is None
    await edge.load(MODEL)
    assert feed.update() is not None and feed.update() is None


async def test_events_and_unit_details(client: TestClient, edge: EdgeServer) -> None:
    await edge.load(MODEL)
    await edge.unload(MODEL)
    body = await (await client.get("/admin/events?since=0")).json()
    assert [e["kind"] for e in body["events"]] == ["load", "unload"] and body["last_seq"] == 2
    body = await (await client.get("/admin/events?since=1")).json()
    assert [e["kind"] for e in body["events"]] == ["unload"]
    assert body["events"][0]["retained"] is True
    assert (await client.get("/admin/events?since=x")).status == 400
    unit = max(edge.pools["cpu"].units.values(), key=lambda u: u.nbytes)
    detail = await (await client.get(f"/admin/units/cpu/{unit.id}")).json()
    assert detail["models"] == [MODEL] and detail["pins"] == 0 and detail["names"] == []
    assert detail["bytes"] == unit.nbytes and detail["eviction_value"] >= 0
    await edge.load(MODEL)
    detail = await (await client.get(f"/admin/units/cpu/{unit.id}")).json()
    assert detail["pins"] == 1 and detail["eviction_value"] is None and detail["names"]
    assert detail["loaded_by"] == [MODEL]
    for path in ("/admin/units/cpu/999999", "/admin/units/cuda:9/1", "/admin/units/cpu/x"):
        assert (await client.get(path)).status == 404, path


async def test_closing_the_feed_ends_its_streams(client: TestClient) -> None:
    resp = await client.get("/admin/live")
    await next_event(resp)
    feed: LiveFeed = client.app[FEED]
    assert len(feed.subscribers) == 1
    await feed.close()
    assert await asyncio.wait_for(resp.content.read(), 10) == b""     # the stream ended
    assert feed.subscribers == set()


async def test_numbers_after_requests(edge: EdgeServer) -> None:
    await edge.start()
    try:
        messages = [{"role": "user", "content": "memory pools and their blocks " * 40}]
        for _ in range(2):          # the second finds the first's prompt pages
            await edge.chat(MODEL, messages, max_tokens=4, temperature=0)
        n = board.numbers(edge)
        pool = edge.pools["cpu"]
        page = next(u for u in pool.units.values() if u.kind.value == "kv" and u.key)
        detail = board.unit_detail(edge, pool, page)         # a prefix page kept for reuse
        host = board.host_tier(edge)
    finally:
        await edge.close()
    assert n["requests"] == 2 and n["loads"] == 1 and n["running"] == n["waiting"] == 0
    assert 0 < n["ttft_p50"] <= n["ttft_p95"] and n["tokens_per_s"] > 0
    assert 0 < n["prefix_hit_rate"] < 1 and n["expert_hit_rate"] is None
    assert detail["pins"] == 0 and detail["models"] == [MODEL] and detail["names"] == []
    assert detail["comes_back_from"] in ("prefill", "host") and detail["reload_s"] > 0
    assert detail["eviction_value"] > 0 and host is not None and host["kv_bytes"] == 0


async def test_a_costly_update_slows_the_feed_down(client: TestClient, edge: EdgeServer,
                                                   monkeypatch: Any) -> None:
    feed = LiveFeed(edge, client.app[EVENTS], tick=0.01)
    calls: list[float] = []

    def slow_update() -> bytes:
        calls.append(asyncio.get_running_loop().time())
        start = time.perf_counter()
        while time.perf_counter() - start < 0.002:     # 2 ms of work: 0.2 s apart at 1%
            pass
        return b": x\n\n"

    monkeypatch.setattr(feed, "update", slow_update)
    queue, _ = feed.subscribe()
    for _ in range(100):
        if len(calls) >= 3:
            break
        await asyncio.sleep(0.05)
    feed.unsubscribe(queue)
    await feed.close()
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps and min(gaps) >= 0.19, gaps


async def test_a_failed_update_resends_a_snapshot(client: TestClient, edge: EdgeServer,
                                                  monkeypatch: Any) -> None:
    resp = await client.get("/admin/live")
    assert (await next_event(resp))[0] == "snapshot"
    real = board.resident_models
    failures = [RuntimeError("dictionary changed size during iteration")]

    def flaky(es: EdgeServer) -> Any:
        if failures and MODEL in es.models:    # the first update that would show it
            raise failures.pop()
        return real(es)

    monkeypatch.setattr(board, "resident_models", flaky)
    await edge.load(MODEL)
    name, body = await next_event(resp)
    while name == "update" and MODEL not in body.get("models", {}):
        name, body = await next_event(resp)
    assert name == "snapshot" and MODEL in body["models"]      # whole again, not half
    units = body["pools"][0]["units"]
    assert sorted(units) == sorted(snapshot(edge.pools["cpu"], models_of(edge)).to_json()["units"])
    resp.close()
