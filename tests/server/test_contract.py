"""OpenAI's exact request contract: max_tokens that cannot fit, parameters not implemented."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from edgeserve.api import EdgeServer

MODEL = "demo-llama"
ASK = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("name", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_beyond_the_context(live_url: str, edge: EdgeServer, name: str) -> None:
    async with openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="none",
                                  max_retries=0) as client:
        ok = await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2)
        context = edge.models[MODEL].spec.max_positions
        prompt = ok.usage.prompt_tokens
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(
                    model=MODEL, messages=ASK, stream=stream, **{name: 10**12})
            assert bad.value.param == name
            message = str(bad.value)
            assert name in message and str(10**12) in message and \
                str(context - prompt) in message
        # Exactly what is left still runs.
        fits = await client.chat.completions.create(
            model=MODEL, messages=ASK, temperature=0, **{name: context - prompt})
        assert fits.choices[0].finish_reason in ("stop", "length")


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
