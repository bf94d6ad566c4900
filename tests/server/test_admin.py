"""Admin routes (load, unload, pin, pool) and /metrics, through aiohttp's test client."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from edgeserve.api import EdgeServer
from edgeserve.config import from_env
from edgeserve.metrics import CONTENT_TYPE
from edgeserve.server import SERVER, create_app

MODEL = "demo-llama"
REPORT_KEYS = {"model", "device", "seconds", "bytes_total", "bytes_from_device",
               "bytes_from_host", "bytes_from_disk", "bytes_released", "placement",
               "scheme", "quantize_seconds", "turn_seconds", "room_seconds", "beside",
               "source", "converted"}


async def cpu_pool(client: Any) -> dict[str, Any]:
    resp = await client.get("/admin/pool")
    assert resp.status == 200
    return dict((await resp.json())["devices"]["cpu"])


async def test_load_report_and_pool(client: Any) -> None:
    resp = await client.post(f"/admin/models/{MODEL}/load")
    assert resp.status == 200
    report = await resp.json()
    assert report.keys() == REPORT_KEYS and (report["model"], report["device"]) == (MODEL, "cpu")
    assert report["bytes_total"] == report["bytes_from_disk"] > 0 and report["seconds"] > 0
    assert 0 <= report["turn_seconds"] < report["seconds"] and report["room_seconds"] == 0
    pool = await cpu_pool(client)
    assert pool["resident_models"][MODEL] >= report["bytes_total"]
    assert pool["bytes_by_kind"]["weight"] >= report["bytes_total"]
    assert pool == client.app[SERVER].stats()["devices"]["cpu"]
    again = await (await client.post(f"/admin/models/{MODEL}/load")).json()
    assert again["bytes_from_disk"] == 0            # already resident: nothing read


async def test_unload_keeps_the_weights_cached(client: Any) -> None:
    await client.post(f"/admin/models/{MODEL}/load")
    weights = (await cpu_pool(client))["bytes_by_kind"]["weight"]
    resp = await client.post(f"/admin/models/{MODEL}/unload")
    assert resp.status == 200 and await resp.json() == {"model": MODEL, "resident": False}
    pool = await cpu_pool(client)
    # edgeserve's policy retains unloaded weights, unpinned, until the space is needed
    assert pool["resident_models"] == {} and pool["retained_bytes"] == weights > 0
    report = await (await client.post(f"/admin/models/{MODEL}/load")).json()
    assert report["bytes_from_device"] == report["bytes_total"] > 0


async def test_unload_frees_the_weights(aiohttp_client: Any, demo_store: Path) -> None:
    config = from_env(models=demo_store, device="cpu")
    config = replace(config, tiers=replace(config.tiers, policy="ollama"))   # retains nothing
    client = await aiohttp_client(create_app(EdgeServer(pool_size="256MiB", config=config)))
    await client.post(f"/admin/models/{MODEL}/load")
    assert (await cpu_pool(client))["bytes_by_kind"]["weight"] > 0
    await client.post(f"/admin/models/{MODEL}/unload")
    pool = await cpu_pool(client)
    assert pool["bytes_by_kind"]["weight"] == 0 and pool["resident_models"] == {}


async def test_pin_outlives_keep_alive(client: Any) -> None:
    es = client.app[SERVER]
    resp = await client.post(f"/admin/models/{MODEL}/pin")
    assert await resp.json() == {"model": MODEL, "pinned": True, "resident": False}
    body = {"model": MODEL, "prompt": "hi", "stream": False, "keep_alive": 0,
            "options": {"num_predict": 2}}
    assert (await client.post("/api/generate", json=body)).status == 200
    await asyncio.sleep(0.1)
    assert MODEL in es.models
    (entry,) = (await (await client.get("/api/ps")).json())["models"]
    assert entry["pinned"] is True
    unload = {"model": MODEL, "keep_alive": 0}
    assert (await (await client.post("/api/generate", json=unload)).json())["done_reason"] == \
        "unload"
    await asyncio.sleep(0.1)
    assert MODEL in es.models
    resp = await client.post(f"/admin/models/{MODEL}/unpin")
    assert await resp.json() == {"model": MODEL, "pinned": False, "resident": True}
    assert (await client.post("/api/generate", json=body)).status == 200
    for _ in range(200):
        if MODEL not in es.models:
            break
        await asyncio.sleep(0.01)
    assert MODEL not in es.models


async def test_unknown_model(client: Any) -> None:
    for action in ("load", "unload", "pin", "unpin"):
        resp = await client.post(f"/admin/models/nope/{action}")
        assert resp.status == 404
        error = (await resp.json())["error"]
        assert error.keys() == {"message", "type", "param", "code"}
        assert error["code"] == "model_not_found"
    assert (await client.post("/admin/models/..%2Fdemo-llama/load")).status == 404


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics(client: Any) -> None:
    counts = []
    for route, body in (("/api/chat", {"messages": [{"role": "user", "content": "hi"}]}),
                        ("/api/generate", {"prompt": "Memory pools"})):
        out = await (await client.post(route, json={"model": MODEL, "stream": False,
                                                    "options": {"num_predict": 3}, **body})).json()
        counts.append((out["prompt_eval_count"], out["eval_count"]))
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"] == CONTENT_TYPE
    text = await resp.text()
    values = samples(text)
    label = (("model_name", MODEL),)
    assert values["vllm:prompt_tokens_total", label] == sum(p for p, _ in counts)
    assert values["vllm:generation_tokens_total", label] == sum(n for _, n in counts) == 6
    assert values["vllm:e2e_request_latency_seconds_count", label] == 2
    assert values["vllm:time_to_first_token_seconds_count", label] == 2
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                  "vllm:kv_cache_usage_perc"):
        assert f"# TYPE {gauge} gauge" in text
    assert values["edgeserve:model_loads_total", (("device", "cpu"), *label)] == 1
    assert values["edgeserve:pool_bytes", (("device", "cpu"), ("kind", "weight"))] > 0


async def test_metrics_behind_the_api_key(aiohttp_client: Any, edge: EdgeServer) -> None:
    client = await aiohttp_client(create_app(edge, api_key="secret"))
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/admin/pool")).status == 401
    assert (await client.get("/health")).status == 200
    resp = await client.get("/metrics", headers={"Authorization": "Bearer secret"})
    assert resp.status == 200 and "vllm:" in await resp.text()
