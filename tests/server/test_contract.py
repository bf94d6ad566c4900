"""OpenAI's exact request contract: max_tokens that cannot fit, parameters not implemented."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from edgeserve.api import EdgeServer

MODEL = "demo-llama"
ASK = [{"role": "user", "content": "hi"}]


def _long_chat(edge: EdgeServer, room: int) -> tuple[list[dict[str, str]], int]:
    """A chat whose prompt leaves at most `room` tokens of the context (and at least one);
    the tokens it leaves."""
    tokenizer = edge.tokenizer(MODEL)
    assert tokenizer is not None
    context = edge.models[MODEL].spec.max_positions

    def chat(words: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": "hello" + " hello" * words}]

    low, high = 1, context         # the most words that still leave at least one token
    while low < high:
        mid = (low + high + 1) // 2
        if context - len(tokenizer.encode_chat(chat(mid))) >= 1:
            low = mid
        else:
            high = mid - 1
    return chat(low), context - len(tokenizer.encode_chat(chat(low)))


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_beyond_the_context(live_url: str, edge: EdgeServer, name: str) -> None:
    await edge.load(MODEL)
    chat, room = _long_chat(edge, 6)
    assert 0 < room <= 6
    async with openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="none",
                                  max_retries=0) as client:
        for stream, asked in ((False, 10**12), (True, 10**12), (False, room + 1)):
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(
                    model=MODEL, messages=chat, stream=stream, **{name: asked})
            assert bad.value.param == name
            message = str(bad.value)
            assert name in message and str(asked) in message and f"leaves {room}" in message
        # Exactly what is left still runs; without a limit the reply stops at the context.
        fits = await client.chat.completions.create(
            model=MODEL, messages=chat, temperature=0, **{name: room})
        assert fits.choices[0].finish_reason in ("stop", "length")
        free = await client.chat.completions.create(
            model=MODEL, messages=chat, temperature=0, extra_body={"ignore_eos": True})
        assert free.choices[0].finish_reason == "length"
        assert free.usage.completion_tokens == room


@pytest.mark.parametrize(("extra", "param"), [
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"presence_penalty": -1}, "presence_penalty"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"web_search_options": {}}, None),               # empty: no effect, accepted
])
async def test_unsupported_parameters(client: Any, extra: dict[str, Any],
                                      param: str | None) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2, **extra}
    resp = await client.post("/v1/chat/completions", json=body)
    if param is None:
        assert resp.status == 200
        return
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["param"] == param and param in error["message"]
    completion = {"model": MODEL, "prompt": "hi", "max_tokens": 2, **extra}
    if param in ("logit_bias", "frequency_penalty", "presence_penalty"):
        resp = await client.post("/v1/completions", json=completion)
        assert resp.status == 400 and (await resp.json())["error"]["param"] == param


async def test_ignored_parameters_are_accepted(client: Any) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 2, "user": "u", "store": False,
            "metadata": {"k": "v"}, "service_tier": "auto", "parallel_tool_calls": True,
            "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200, await resp.text()


async def test_ollama_keeps_clamping(client: Any, edge: EdgeServer) -> None:
    await edge.load(MODEL)
    tokenizer = edge.tokenizer(MODEL)
    assert tokenizer is not None
    context = edge.models[MODEL].spec.max_positions
    base = len(tokenizer.encode("hello"))
    unit = len(tokenizer.encode("hello hello")) - base
    prompt = "hello" + " hello" * ((context - 3 - base) // unit)
    room = context - len(tokenizer.encode(prompt))
    assert 0 < room < 3 + unit
    resp = await client.post("/api/generate", json={
        "model": MODEL, "prompt": prompt, "raw": True, "stream": False,
        "options": {"num_predict": 10**9, "temperature": 0}})
    out = await resp.json()
    assert resp.status == 200, out
    assert out["prompt_eval_count"] + out["eval_count"] <= context
    if out["done_reason"] == "length":
        assert out["eval_count"] == room
