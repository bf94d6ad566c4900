"""The OpenAI-compatible routes, through aiohttp's test client and the real openai SDK."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from edgeserve.api import EdgeServer
from edgeserve.engine import QueueFull
from edgeserve.results import Delta, GenerationError
from edgeserve.server import SERVER, create_app
from edgeserve.server.app import url_of

MODEL = "demo-llama"
MESSAGES = [{"role": "user", "content": "Tell me about memory pools."}]
GREEDY = {"max_tokens": 5, "temperature": 0}
ERROR_KEYS = {"message", "type", "param", "code"}
ServeApp = Callable[[web.Application], Awaitable[str]]


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, **GREEDY, **extra}


def sse_events(raw: str) -> list[str]:
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e.removeprefix("data: ") for e in events]


async def expected_text(edge: EdgeServer) -> str:
    return (await edge.chat(MODEL, MESSAGES, **GREEDY)).text


async def test_health_and_models(client: Any) -> None:
    resp = await client.get("/health")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    listing = await (await client.get("/v1/models")).json()
    assert listing["object"] == "list"
    (card,) = listing["data"]
    assert card.keys() == {"id", "object", "created", "owned_by", "parent"}
    assert (card["id"], card["object"], card["owned_by"], card["parent"]) == (
        MODEL, "model", "edgeserve", None)
    assert await (await client.get(f"/v1/models/{MODEL}")).json() == card
    missing = await client.get("/v1/models/nope")
    assert missing.status == 404 and (await missing.json())["error"]["code"] == "model_not_found"


async def test_chat_completion(client: Any) -> None:
    resp = await client.post("/v1/chat/completions", json=chat_body(user="u1", presence_penalty=0))
    assert resp.status == 200
    body = await resp.json()
    assert body.keys() == {"id", "object", "created", "model", "choices", "usage"}
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == MODEL and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice == {"index": 0, "message": {"role": "assistant", "content": choice["message"]
                      ["content"]}, "finish_reason": "length", "logprobs": None}
    expected = await client.app[SERVER].chat(MODEL, MESSAGES, **GREEDY)
    assert choice["message"]["content"] == expected.text != ""
    usage = expected.usage
    assert body["usage"] == {"prompt_tokens": usage.prompt_tokens, "completion_tokens": 5,
                             "total_tokens": usage.prompt_tokens + 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}


async def test_chat_stream(client: Any) -> None:
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    events = sse_events(await resp.text())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {(c["id"], c["created"], c["object"], c["model"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "chat.completion.chunk", MODEL)}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length",
                                      "logprobs": None}]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == await expected_text(client.app[SERVER])


async def test_chat_stream_usage(client: Any) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    events = sse_events(await (await client.post("/v1/chat/completions", json=body)).text())
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b"[]", None),
    (chat_body(temperature=-1), "temperature"),
    (chat_body(temperature="hot"), "temperature"),
    (chat_body(max_tokens=0), "max_tokens"),
    (chat_body(max_completion_tokens=0), "max_completion_tokens"),
    (chat_body(top_p=2), "top_p"),
    (chat_body(stop=["x"] * 17), "stop"),
    (chat_body(top_k=10**20), "top_k"),
    (chat_body(stop="x" * 513), "stop"),
    (chat_body(n=0), "n"),
    (chat_body(n=17), "n"),
    (chat_body(top_k=-2), "top_k"),
    (chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat_body(top_logprobs=2), "top_logprobs"),
    (chat_body(ignore_eos="yes"), "ignore_eos"),
    ({"model": MODEL}, "messages"),
    (chat_body(messages=[]), "messages"),
    (chat_body(messages=[{"role": "robot", "content": "hi"}]), "messages[0].role"),
    (chat_body(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
     "messages[0].content"),
])
async def test_invalid_requests(client: Any, body: Any, param: str | None) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body)
    resp = await client.post("/v1/chat/completions", data=data)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error.keys() == ERROR_KEYS and error["type"] == "invalid_request_error"
    if param is None or error["param"] is None:
        assert error["param"] == param
    else:
        assert error["param"].startswith(param)


async def test_extreme_sampling_values_mean_their_limit(client: Any) -> None:
    # float32 rounds these to 0: the server must not let them reach the sampler as 0.
    texts = []
    for extra in ({"temperature": 1e-300}, {"top_p": 1e-300, "temperature": 1}):
        resp = await client.post("/v1/chat/completions", json=chat_body(**extra))
        assert resp.status == 200
        texts.append((await resp.json())["choices"][0]["message"]["content"])
    assert texts == [await expected_text(client.app[SERVER])] * 2


async def test_http_errors_have_the_openai_shape(client: Any) -> None:
    unknown = await client.post("/v1/chat/completions", json=chat_body(model="nope"))
    assert unknown.status == 404
    assert (await unknown.json())["error"]["code"] == "model_not_found"
    for resp, status in [(await client.get("/v2/nothing"), 404),
                         (await client.get("/v1/chat/completions"), 405),
                         (await client.post("/v1/chat/completions", data=b"x" * (9 << 20)),
                          413)]:
        assert resp.status == status
        assert (await resp.json())["error"].keys() == ERROR_KEYS


async def test_server_faults(client: Any, edge: EdgeServer,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    async def busy(*args: Any, **kwargs: Any) -> AsyncIterator[Delta]:
        raise QueueFull("1024 requests are already waiting")
        yield

    async def broken(*args: Any, **kwargs: Any) -> AsyncIterator[Delta]:
        raise KeyError("internal detail")
        yield

    await edge.load(MODEL)      # resident: errors before the first token keep their status
    monkeypatch.setattr(edge, "stream_chat", busy)
    for stream in (False, True):
        resp = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
        assert resp.status == 503 and resp.headers["Retry-After"]
    monkeypatch.setattr(edge, "stream_chat", broken)
    resp = await client.post("/v1/chat/completions", json=chat_body())
    assert resp.status == 500
    assert (await resp.json())["error"]["message"] == "internal server error"


async def test_error_after_the_stream_started(client: Any, edge: EdgeServer,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing(*args: Any, **kwargs: Any) -> AsyncIterator[Delta]:
        yield Delta("Hello", [1])
        raise GenerationError("the engine stopped")

    monkeypatch.setattr(edge, "stream_chat", failing)
    resp = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status == 200
    events = sse_events(await resp.text())
    assert json.loads(events[1])["choices"][0]["delta"] == {"content": "Hello"}
    assert json.loads(events[-1])["error"]["type"] == "server_error"


async def test_disconnect_cancels_the_sequence(client: Any, edge: EdgeServer) -> None:
    resp = await client.post("/v1/chat/completions",
                             json=chat_body(stream=True, max_tokens=1500))
    await resp.content.readline()
    resp.close()
    for _ in range(200):
        requests = edge.stats()["requests"]
        if requests == {"running": 0, "waiting": 0}:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the sequence still runs: {requests}")


async def test_shutdown_lets_running_streams_finish(edge: EdgeServer) -> None:
    runner = web.AppRunner(create_app(edge, shutdown_deadline=30), handler_cancellation=True)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = url_of(runner.addresses[0])
    async with aiohttp.ClientSession() as session:
        resp = await session.post(f"{url}/v1/chat/completions",
                                  json=chat_body(stream=True, max_tokens=40))
        await resp.content.readline()
        cleanup = asyncio.create_task(runner.cleanup())
        events = sse_events((await resp.text()).lstrip("\n"))    # the rest of event 1
        await cleanup
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"]
    assert edge.engine is None      # closed once drained


async def test_api_key(aiohttp_client: Any, edge: EdgeServer) -> None:
    client = await aiohttp_client(create_app(edge, api_key="sekrit"))
    assert (await client.get("/health")).status == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
        resp = await client.get("/v1/models", headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "invalid_api_key"
    ok = await client.get("/v1/models", headers={"Authorization": "Bearer sekrit"})
    assert ok.status == 200


# ---- the openai SDK against a real server -------------------------------------------------
async def test_openai_sdk(live_url: str, edge: EdgeServer) -> None:
    expected = await expected_text(edge)
    sync = openai.OpenAI(base_url=f"{live_url}/v1", api_key="none", max_retries=0)

    def sync_calls() -> tuple[str | None, str]:
        out = sync.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                           **GREEDY)
        stream = sync.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                              stream=True, **GREEDY)
        return out.choices[0].message.content, "".join(
            c.choices[0].delta.content or "" for c in stream if c.choices)

    assert await asyncio.to_thread(sync_calls) == (expected, expected)
    async with openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="none",
                                  max_retries=0) as client:
        assert [m.id async for m in client.models.list()] == [MODEL]
        out = await client.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                                   seed=1, **GREEDY)
        assert out.choices[0].message.content == expected
        assert out.choices[0].finish_reason == "length" and out.usage is not None
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                                      stream=True, **GREEDY)
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == expected


async def test_openai_sdk_errors(live_url: str, serve_app: ServeApp,
                                 demo_store: Any) -> None:
    client = openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                             temperature=-1)
    assert bad.value.param == "temperature"
    keyed = EdgeServer(models=demo_store, device="cpu", pool_size="64MiB")
    url = await serve_app(create_app(keyed, api_key="sekrit"))
    with pytest.raises(openai.AuthenticationError):
        await openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="wrong",
                                 max_retries=0).models.list()
    good = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sekrit", max_retries=0)
    assert [m.id async for m in good.models.list()] == [MODEL]
    await client.close()
    await good.close()


# ---- n and logprobs ------------------------------------------------------------------
async def test_chat_n_choices(client: Any, edge: EdgeServer) -> None:
    body = chat_body(n=3, seed=7, temperature=1, max_tokens=4)
    resp = await client.post("/v1/chat/completions", json=body)
    out = await resp.json()
    # Choice i draws with seed + i: it is what a single request with that seed gets.
    singles = [await edge.chat(MODEL, MESSAGES, max_tokens=4, temperature=1, seed=7 + i)
               for i in range(3)]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in out["choices"]] == [s.text for s in singles]
    prompt = singles[0].usage.prompt_tokens
    assert out["usage"] == {"prompt_tokens": prompt, "completion_tokens": 12,
                            "total_tokens": prompt + 12,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    streamed = sse_events(await (await client.post("/v1/chat/completions", json={
        **body, "stream": True, "stream_options": {"include_usage": True}})).text())
    chunks = [json.loads(e) for e in streamed[:-1]]
    texts, reasons = ["", "", ""], [None, None, None]
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        reasons[choice["index"]] = reasons[choice["index"]] or choice["finish_reason"]
    assert texts == [s.text for s in singles] and reasons == ["length"] * 3
    assert chunks[-1]["usage"] == out["usage"]


async def test_chat_logprobs_with_the_sdk(live_url: str, edge: EdgeServer) -> None:
    async with openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="none",
                                  max_retries=0) as client:
        out = await client.chat.completions.create(  # type: ignore[call-overload]
            model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=2, n=2, **GREEDY)
        stream = await client.chat.completions.create(  # type: ignore[call-overload]
            model=MODEL, messages=MESSAGES, logprobs=True, stream=True, **GREEDY)
        streamed = [t async for c in stream if c.choices and c.choices[0].logprobs
                    for t in c.choices[0].logprobs.content or []]
    expected = await edge.chat(MODEL, MESSAGES, logprobs=2, **GREEDY)
    tokenizer = edge.tokenizer(MODEL)
    assert tokenizer is not None and expected.logprobs is not None
    names = [tokenizer.decode([t], skip_special_tokens=False) for t in expected.token_ids]
    for choice in out.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        content = choice.logprobs.content
        assert [t.token for t in content] == names
        assert [t.bytes for t in content] == [list(n.encode()) for n in names]
        for token, want in zip(content, expected.logprobs, strict=True):
            assert token.logprob == pytest.approx(want.logprob)
            # Greedy: the chosen token is the most likely one.
            assert len(token.top_logprobs) == 2
            assert token.top_logprobs[0].token == token.token
    assert [t.token for t in streamed] == names
    assert all(t.top_logprobs == [] for t in streamed)      # top_logprobs defaults to 0
