"""POST /v1/completions, through aiohttp's test client and the real openai SDK."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest

from edgeserve.api import EdgeServer

MODEL = "demo-llama"
PROMPT = "The block pool keeps"
GREEDY = {"max_tokens": 5, "temperature": 0}
DETAILS = {"cached_tokens": 0}


def body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": PROMPT, **GREEDY, **extra}


def sse_chunks(raw: str) -> list[dict[str, Any]]:
    events = [e.removeprefix("data: ") for e in raw.rstrip("\n").split("\n\n")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def post(client: Any, **extra: Any) -> dict[str, Any]:
    resp = await client.post("/v1/completions", json=body(**extra))
    assert resp.status == 200, await resp.text()
    out: dict[str, Any] = await resp.json()
    return out


async def test_completion(client: Any, edge: EdgeServer) -> None:
    out = await post(client)
    expected = await edge.complete(MODEL, PROMPT, **GREEDY)
    assert out.keys() == {"id", "object", "created", "model", "choices", "usage"}
    assert out["id"].startswith("cmpl-") and out["object"] == "text_completion"
    assert out["choices"] == [{"index": 0, "text": expected.text, "logprobs": None,
                               "finish_reason": "length"}]
    prompt = expected.usage.prompt_tokens
    assert out["usage"] == {"prompt_tokens": prompt, "completion_tokens": 5,
                            "total_tokens": prompt + 5, "prompt_tokens_details": DETAILS}
    tokenizer = edge.tokenizer(MODEL)
    assert tokenizer is not None
    by_ids = await post(client, prompt=tokenizer.encode(PROMPT))
    assert by_ids["choices"][0]["text"] == expected.text


async def test_prompts_and_choices(client: Any, edge: EdgeServer) -> None:
    await edge.load(MODEL)
    tokenizer = edge.tokenizer(MODEL)
    assert tokenizer is not None
    prompts = [PROMPT, "Experts are cached"]
    singles = [await edge.complete(MODEL, p, max_tokens=3, temperature=1, seed=5 + i)
               for p in prompts for i in range(2)]
    for prompt in (prompts, [tokenizer.encode(p) for p in prompts]):
        out = await post(client, prompt=prompt, n=2, seed=5, max_tokens=3, temperature=1)
        # Choice p * n + i: the i-th completion (seed + i) of prompt p.
        assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
        assert [c["text"] for c in out["choices"]] == [s.text for s in singles]
        prompt_tokens = singles[0].usage.prompt_tokens + singles[2].usage.prompt_tokens
        assert out["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 12,
                                "total_tokens": prompt_tokens + 12,
                                "prompt_tokens_details": DETAILS}


async def test_stream(client: Any, edge: EdgeServer) -> None:
    whole = await post(client, n=2, seed=1, temperature=1)
    resp = await client.post("/v1/completions", json=body(
        n=2, seed=1, temperature=1, stream=True, stream_options={"include_usage": True}))
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    chunks = sse_chunks(await resp.text())
    assert {(c["id"], c["created"], c["object"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], "text_completion")}
    texts, reasons = ["", ""], [None, None]
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
        reasons[choice["index"]] = choice["finish_reason"]
    assert texts == [c["text"] for c in whole["choices"]] and reasons == ["length"] * 2
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


async def test_logprobs(client: Any, edge: EdgeServer) -> None:
    out = await post(client, logprobs=2)
    expected = await edge.complete(MODEL, PROMPT, logprobs=2, **GREEDY)
    tokenizer = edge.tokenizer(MODEL)
    assert tokenizer is not None and expected.logprobs is not None
    logprobs = out["choices"][0]["logprobs"]
    tokens = [tokenizer.decode([t], skip_special_tokens=False) for t in expected.token_ids]
    assert logprobs["tokens"] == tokens
    assert logprobs["token_logprobs"] == pytest.approx([t.logprob for t in expected.logprobs])
    assert logprobs["text_offset"] == [sum(map(len, tokens[:i])) for i in range(len(tokens))]
    for token, top in zip(tokens, logprobs["top_logprobs"], strict=True):
        # Greedy: the chosen token is the most likely of its two alternatives.
        assert 1 <= len(top) <= 2 and max(top, key=top.get) == token
    streamed = sse_chunks(await (await client.post(
        "/v1/completions", json=body(logprobs=2, stream=True))).text())
    pieces = [c["choices"][0]["logprobs"] for c in streamed]
    assert [t for p in pieces for t in p["tokens"]] == tokens
    assert [o for p in pieces for o in p["text_offset"]] == logprobs["text_offset"]


async def test_stop_seed_and_defaults(client: Any, edge: EdgeServer) -> None:
    text = (await post(client, max_tokens=8, ignore_eos=True))["choices"][0]["text"]
    stop = text[len(text) // 2:][:3]
    cut = await post(client, max_tokens=8, stop=[stop])
    assert cut["choices"][0]["text"] == text[:text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    seeded = [await post(client, temperature=1, seed=42) for _ in range(2)]
    assert seeded[0]["choices"] == seeded[1]["choices"]
    default = await post(client, max_tokens=None, ignore_eos=True)
    assert default["usage"]["completion_tokens"] == 16       # OpenAI's default


async def test_context_limits(client: Any, edge: EdgeServer) -> None:
    await edge.load(MODEL)
    context = edge.models[MODEL].spec.max_positions
    # max_tokens beyond the room the context leaves: 400 naming it and both numbers.
    resp = await client.post("/v1/completions", json=body(prompt=[5] * (context - 4),
                                                          max_tokens=100, ignore_eos=True))
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == "max_tokens"
    assert "100" in error["message"] and "leaves 4" in error["message"]
    # Without max_tokens the default is cut at the context's end.
    out = await post(client, prompt=[5] * (context - 4), max_tokens=None, ignore_eos=True)
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 4
    for stream in (False, True):
        resp = await client.post("/v1/completions",
                                 json=body(prompt=[5] * context, stream=stream))
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "prompt"


@pytest.mark.parametrize(("extra", "param"), [
    ({"echo": True}, "echo"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "two"]}, "prompt"),
    ({"prompt": [[1], "two"]}, "prompt"),
    ({"prompt": [[1, "two"]]}, "prompt[0][1]"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": ["a"] * 17, "n": 4}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"n": 0}, "n"),
    ({"stop": ""}, "stop"),
    ({"seed": "x"}, "seed"),
])
async def test_invalid_requests(client: Any, extra: dict[str, Any], param: str) -> None:
    resp = await client.post("/v1/completions", json=body(**extra))
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


async def test_openai_sdk(live_url: str, edge: EdgeServer) -> None:
    expected = (await edge.complete(MODEL, PROMPT, **GREEDY)).text
    sync = openai.OpenAI(base_url=f"{live_url}/v1", api_key="none", max_retries=0)

    def sync_call() -> str:
        return sync.completions.create(model=MODEL, prompt=PROMPT, **GREEDY).choices[0].text

    assert await asyncio.to_thread(sync_call) == expected
    async with openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="none",
                                  max_retries=0) as client:
        out = await client.completions.create(model=MODEL, prompt=PROMPT, logprobs=1,
                                              n=2, **GREEDY)   # type: ignore[arg-type]
        assert [c.text for c in out.choices] == [expected] * 2
        assert out.choices[0].logprobs is not None and out.usage is not None
        assert out.usage.prompt_tokens_details is not None
        assert out.usage.prompt_tokens_details.cached_tokens == 0
        stream = await client.completions.create(
            model=MODEL, prompt=PROMPT, stream=True,
            stream_options={"include_usage": True}, **GREEDY)   # type: ignore[arg-type]
        chunks = [c async for c in stream]
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
        with pytest.raises(openai.BadRequestError) as bad:
            await client.completions.create(model=MODEL, prompt=PROMPT, echo=True)
        assert bad.value.param == "echo"
