"""Structured outputs through the openai SDK and the ollama client: response_format,
Ollama's format; stop, max_tokens and n as usual."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema
import ollama
import openai
import pytest

from edgeserve.api import EdgeServer

MODEL = "demo-llama"
ASK = [{"role": "user", "content": "A record, please."}]
RECORD = {"type": "object",
          "properties": {"title": {"type": "string", "maxLength": 12},
                         "rating": {"type": "integer", "minimum": 1, "maximum": 5},
                         "genre": {"enum": ["drama", "comedy"]},
                         "cast": {"type": "array", "maxItems": 2,
                                  "items": {"type": "object",
                                            "properties": {"name": {"type": "string",
                                                                    "maxLength": 6}},
                                            "required": ["name"]}}},
          "required": ["title", "rating", "genre", "cast"]}


def _fmt(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    return {"type": "json_schema",
            "json_schema": {"name": "record", "schema": schema, "strict": strict}}


async def test_json_schema_with_the_sdk(live_url: str, edge: EdgeServer) -> None:
    async with openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="none",
                                  max_retries=0) as client:
        out = await client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=_fmt(RECORD), n=3, temperature=1,
            seed=11, max_tokens=150)
        for choice in out.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content or ""), RECORD)
        # strict: no property the schema does not declare, even where it leaves them open.
        record = json.loads(out.choices[0].message.content or "")
        assert all(set(c) == {"name"} for c in record["cast"])
        stream = await client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=_fmt(RECORD), temperature=0,
            max_tokens=150, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
        jsonschema.validate(json.loads(text), RECORD)
        # Cut by max_tokens: "length", and the text is the start of a valid reply.
        cut = await client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=_fmt(RECORD), temperature=0,
            max_tokens=4)
        assert cut.choices[0].finish_reason == "length"
        assert text.startswith(cut.choices[0].message.content or "-")
        # A stop string still stops.
        stopped = await client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=_fmt(RECORD), temperature=0,
            max_tokens=150, stop=['"rating"'])
        assert stopped.choices[0].message.content == text[:text.index('"rating"')]
        obj = await client.chat.completions.create(
            model=MODEL, messages=ASK, response_format={"type": "json_object"},
            temperature=0, max_tokens=6)
        assert (obj.choices[0].message.content or "").startswith("{")
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=3,
                response_format=_fmt({"type": "object", "properties": 5}))
        assert bad.value.param == "response_format"
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=3,
                response_format={"type": "json_schema", "json_schema": {"name": "x"}})
        assert bad.value.param == "response_format"


async def test_ollama_format(live_url: str) -> None:
    client = ollama.AsyncClient(host=live_url)
    out = await client.chat(model=MODEL, messages=ASK, format=RECORD,
                            options={"temperature": 0, "num_predict": 150})
    jsonschema.validate(json.loads(out.message.content), RECORD)
    parts = [p async for p in await client.chat(model=MODEL, messages=ASK, format=RECORD,
                                                 stream=True, options={"temperature": 0})]
    assert "".join(p.message.content for p in parts) == out.message.content
    gen = await client.generate(model=MODEL, prompt="A record:", format=RECORD,
                                options={"temperature": 0, "num_predict": 150})
    jsonschema.validate(json.loads(gen.response), RECORD)
    loose = await client.chat(model=MODEL, messages=ASK, format="json",
                              options={"temperature": 0, "num_predict": 5})
    assert loose.message.content.startswith("{") and loose.done_reason == "length"
    # The client refuses it before sending: post it directly.
    async with aiohttp.ClientSession() as http, http.post(f"{live_url}/api/chat", json={
            "model": MODEL, "messages": ASK, "format": "yaml"}) as resp:
        assert resp.status == 400 and "format" in (await resp.json())["error"]
