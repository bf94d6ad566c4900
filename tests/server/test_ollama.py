"""The Ollama-compatible routes, through aiohttp's test client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

import edgeserve
from edgeserve.results import Delta, GenerationError, InvalidRequest
from edgeserve.server import SERVER
from edgeserve.server.ollama_wire import keep_alive_seconds

MODEL = "demo-llama"
MESSAGES = [{"role": "user", "content": "Tell me about memory pools."}]
GREEDY = {"temperature": 0, "num_predict": 5}
STATS = ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
         "eval_count", "eval_duration")


def ndjson(raw: str) -> list[dict[str, Any]]:
    assert raw.endswith("\n")
    return [json.loads(line) for line in raw.splitlines()]


def check_final(line: dict[str, Any], reason: str, prompt_tokens: int, tokens: int) -> None:
    assert line["done"] is True and line["done_reason"] == reason and line["model"] == MODEL
    assert all(isinstance(line[k], int) and line[k] > 0 for k in STATS)
    assert (line["prompt_eval_count"], line["eval_count"]) == (prompt_tokens, tokens)
    assert line["total_duration"] >= line["prompt_eval_duration"] + line["eval_duration"]
    datetime.fromisoformat(line["created_at"])


async def resident(client: Any) -> list[str]:
    body = await (await client.get("/api/ps")).json()
    return [m["name"] for m in body["models"]]


async def wait_unloaded(client: Any) -> None:
    for _ in range(200):
        if MODEL not in await resident(client):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{MODEL} is still resident")


async def test_chat_stream(client: Any) -> None:
    resp = await client.post("/api/chat", json={"model": MODEL, "messages": MESSAGES,
                                                "options": GREEDY})
    assert resp.status == 200 and resp.content_type == "application/x-ndjson"
    lines = ndjson(await resp.text())
    expected = await client.app[SERVER].chat(MODEL, MESSAGES, max_tokens=5, temperature=0)
    *pieces, final = lines
    assert pieces and all(p.keys() == {"model", "created_at", "message", "done"} for p in pieces)
    assert all(p["message"]["role"] == "assistant" and not p["done"] for p in pieces)
    assert "".join(p["message"]["content"] for p in pieces) == expected.text != ""
    assert final["message"] == {"role": "assistant", "content": ""}
    check_final(final, "length", expected.usage.prompt_tokens, 5)


async def test_chat_not_streamed(client: Any) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": False, "options": GREEDY}
    out = await (await client.post("/api/chat", json=body)).json()
    expected = await client.app[SERVER].chat(MODEL, MESSAGES, max_tokens=5, temperature=0)
    assert out["message"] == {"role": "assistant", "content": expected.text}
    check_final(out, "length", expected.usage.prompt_tokens, 5)


async def test_generate(client: Any) -> None:
    es = client.app[SERVER]
    prompt, system = "Memory pools are", "Answer briefly."
    body = {"model": MODEL, "prompt": prompt, "system": system, "options": GREEDY}
    lines = ndjson(await (await client.post("/api/generate", json=body)).text())
    *pieces, final = lines
    expected = await es.chat(MODEL, [{"role": "system", "content": system},
                                     {"role": "user", "content": prompt}],
                             max_tokens=5, temperature=0)
    assert "".join(p["response"] for p in pieces) == expected.text
    assert final["response"] == "" and "message" not in final
    check_final(final, "length", expected.usage.prompt_tokens, 5)
    # raw: the prompt as it is, no template
    raw = {"model": MODEL, "prompt": prompt, "raw": True, "stream": False, "options": GREEDY}
    out = await (await client.post("/api/generate", json=raw)).json()
    expected = await es.complete(MODEL, prompt, max_tokens=5, temperature=0)
    assert out["response"] == expected.text
    check_final(out, "length", expected.usage.prompt_tokens, 5)


async def test_options(client: Any) -> None:
    async def generate(**options: Any) -> dict[str, Any]:
        body = {"model": MODEL, "prompt": "Once", "stream": False, "options": options}
        resp = await client.post("/api/generate", json=body)
        assert resp.status == 200
        return dict(await resp.json())

    seeded = {"temperature": 0.9, "seed": 7, "top_p": 0.95, "top_k": 40, "num_predict": 6}
    first, second = await generate(**seeded), await generate(**seeded)
    assert first["response"] == second["response"] and first["eval_count"] == 6
    greedy = [await generate(temperature=0, seed=s, num_predict=4) for s in (1, 2)]
    assert greedy[0]["response"] == greedy[1]["response"]
    assert (await generate(num_predict=2, num_ctx=99, mirostat=1))["eval_count"] == 2
    assert (await generate(num_predict=3, stop=["\n"], top_p=0))["eval_count"] <= 3


async def test_keep_alive(client: Any) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": False, "options": GREEDY}
    resp = await client.post("/api/chat", json={**body, "keep_alive": -1})
    assert resp.status == 200
    await asyncio.sleep(0.05)
    (entry,) = (await (await client.get("/api/ps")).json())["models"]
    assert datetime.fromisoformat(entry["expires_at"]).year > 2100
    resp = await client.post("/api/chat", json={**body, "keep_alive": "5m"})
    (entry,) = (await (await client.get("/api/ps")).json())["models"]
    left = datetime.fromisoformat(entry["expires_at"]) - datetime.now(UTC)
    assert 290 < left.total_seconds() <= 300
    resp = await client.post("/api/chat", json={**body, "keep_alive": 0})
    assert resp.status == 200 and (await resp.json())["eval_count"] == 5
    await wait_unloaded(client)


def test_keep_alive_durations() -> None:
    cases = {"5m": 300, "1h": 3600, "30s": 30, "0": 0, "1h30m": 5400, "1.5s": 1.5,
             "250ms": 0.25, "-1": -1, "-5m": -300, "300": 300}
    assert {k: keep_alive_seconds(k) for k in cases} == cases
    assert keep_alive_seconds(None) is None and keep_alive_seconds(12) == 12
    assert keep_alive_seconds(1e300) == -1        # beyond any timer: forever
    for bad in ("5 minutes", "m", "", "5d", "nan"):
        with pytest.raises(InvalidRequest):
            keep_alive_seconds(bad)


@pytest.mark.parametrize("route, empty", [("/api/chat", {"messages": []}),
                                          ("/api/generate", {"prompt": ""})])
async def test_empty_request_loads_and_unloads(client: Any, route: str, empty: dict) -> None:
    out = await (await client.post(route, json={"model": MODEL, **empty})).json()
    assert out["done"] is True and out["done_reason"] == "load"
    assert MODEL in await resident(client)
    out = await (await client.post(route, json={"model": MODEL, "keep_alive": 0})).json()
    assert out["done_reason"] == "unload"
    await wait_unloaded(client)


async def test_tags_ps_show_version(client: Any) -> None:
    (tag,) = (await (await client.get("/api/tags")).json())["models"]
    assert tag.keys() == {"name", "model", "modified_at", "size", "digest", "details"}
    assert tag["name"] == tag["model"] == MODEL and tag["size"] > 0 and len(tag["digest"]) == 64
    datetime.fromisoformat(tag["modified_at"])
    details = tag["details"]
    assert details["format"] == "safetensors" and details["family"] == "llama"
    assert details["quantization_level"] == "F32" and details["parameter_size"].endswith("M")
    assert await resident(client) == []
    await client.app[SERVER].load(MODEL)
    (entry,) = (await (await client.get("/api/ps")).json())["models"]
    cpu = client.app[SERVER].stats()["devices"]["cpu"]["resident_models"][MODEL]
    assert entry["devices"] == {"cpu": cpu} and entry["size"] == cpu > 0
    assert entry["size_vram"] == 0 and entry["digest"] == tag["digest"]
    assert entry["context_length"] == 2048 and entry["pinned"] is False
    show = await (await client.post("/api/show", json={"model": MODEL})).json()
    assert show["details"] == details and "<|start_header_id|>" in show["template"]
    info = show["model_info"]
    assert info["general.architecture"] == "llama" and info["llama.context_length"] == 2048
    assert info["llama.block_count"] == 4 and info["general.parameter_count"] > 0
    assert "num_ctx" in show["parameters"]
    assert (await (await client.post("/api/show", json={"name": MODEL})).json()) == show
    version = await (await client.get("/api/version")).json()
    assert version == {"version": edgeserve.__version__}


async def test_latest_tag_names_the_model(client: Any) -> None:
    body = {"model": f"{MODEL}:latest", "prompt": "hi", "stream": False, "options": GREEDY}
    out = await (await client.post("/api/generate", json=body)).json()
    assert out["model"] == f"{MODEL}:latest" and out["eval_count"] == 5


@pytest.mark.parametrize("route, body, status", [
    ("/api/chat", {"model": "nope", "messages": MESSAGES}, 404),
    ("/api/generate", {"model": "nope:latest", "prompt": "hi"}, 404),
    ("/api/show", {"model": "../demo-llama"}, 404),
    ("/api/chat", {"model": "nope", "keep_alive": 0}, 404),
    ("/api/chat", b"{not json", 400),
    ("/api/chat", [1, 2], 400),
    ("/api/chat", {"messages": MESSAGES}, 400),
    ("/api/chat", {"model": "", "messages": MESSAGES}, 400),
    ("/api/chat", {"model": MODEL, "messages": "hi"}, 400),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "bot", "content": "x"}]}, 400),
    ("/api/chat", {"model": MODEL, "messages": MESSAGES, "options": {"temperature": "hot"}}, 400),
    ("/api/chat", {"model": MODEL, "messages": MESSAGES, "options": {"temperature": -1}}, 400),
    ("/api/chat", {"model": MODEL, "messages": MESSAGES, "options": {"num_predict": 0}}, 400),
    ("/api/chat", {"model": MODEL, "messages": MESSAGES, "options": {"top_k": 2**40}}, 400),
    ("/api/chat", {"model": MODEL, "messages": MESSAGES, "keep_alive": "soon"}, 400),
    ("/api/chat", {"model": MODEL, "messages": MESSAGES, "keep_alive": True}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400),
    ("/api/generate", {"model": MODEL, "prompt": "word " * 3000, "stream": True}, 400),
    ("/api/show", {}, 400),
])
async def test_errors(client: Any, route: str, body: Any, status: int) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(route, data=data, headers={"Content-Type": "application/json"})
    assert resp.status == status
    error = await resp.json()
    assert error.keys() == {"error"} and isinstance(error["error"], str) and error["error"]
    if status == 404:
        assert "not found" in error["error"]


async def test_error_after_the_stream_started(client: Any, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    async def failing(*args: Any, **kwargs: Any) -> AsyncIterator[Delta]:
        yield Delta("Hello", [1])
        raise GenerationError("the engine stopped")

    monkeypatch.setattr(client.app[SERVER], "stream_chat", failing)
    resp = await client.post("/api/chat", json={"model": MODEL, "messages": MESSAGES})
    assert resp.status == 200
    first, last = ndjson(await resp.text())
    assert first["message"]["content"] == "Hello" and not first["done"]
    assert last.keys() == {"error"}


async def test_disconnect_cancels_the_sequence(client: Any) -> None:
    es = client.app[SERVER]
    body = {"model": MODEL, "messages": MESSAGES, "options": {"num_predict": 1500}}
    resp = await client.post("/api/chat", json=body)
    await resp.content.readline()
    resp.close()
    for _ in range(200):
        if es.stats()["requests"] == {"running": 0, "waiting": 0}:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"the sequence still runs: {es.stats()['requests']}")
