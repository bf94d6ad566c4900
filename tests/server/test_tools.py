"""Tool calling through the openai SDK and the ollama client: forced calls (grammar
constrained, so exact even with random weights), scripted replies in every format, the
results going back in."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import jsonschema
import ollama
import openai
import pytest

from edgeserve.api import EdgeServer
from edgeserve.results import Delta, Usage
from edgeserve.server import create_app

from .conftest import ServeApp
from .tools_model import make_tools_model

MODEL = "tool-llama"
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 10},
                          "unit": {"enum": ["celsius", "fahrenheit"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit", "days"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["utc", "local"]}},
         "required": ["zone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Forecast",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "clock", "parameters": CLOCK}}]
SCHEMAS = {"weather": WEATHER, "clock": CLOCK}
ASK = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.fixture
def tools_edge(tmp_path: Path, demo_store: Path) -> EdgeServer:
    make_tools_model(demo_store, tmp_path)
    return EdgeServer(models=tmp_path, device="cpu", pool_size="256MiB")


@pytest.fixture
async def url(tools_edge: EdgeServer, serve_app: ServeApp) -> str:
    return await serve_app(create_app(tools_edge))


def _sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def _check_call(name: str, arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


async def test_required_round_trip(url: str, tools_edge: EdgeServer) -> None:
    async with _sdk(url) as client:
        first = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
            temperature=0, max_tokens=80)
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls or []
        assert call.type == "function" and call.id.startswith("call_")
        args = _check_call(call.function.name, call.function.arguments)
        # The same call streams as deltas.
        stream = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
            temperature=0, max_tokens=80, stream=True)
        deltas = [c async for c in stream]
        calls = [t for c in deltas for t in (c.choices[0].delta.tool_calls or [])]
        assert [c.choices[0].finish_reason for c in deltas][-1] == "tool_calls"
        assert len(calls) == 1 and calls[0].index == 0
        assert calls[0].function.name == call.function.name
        assert json.loads(calls[0].function.arguments or "") == args
        # The result goes back in and the conversation continues.
        result = {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}
        history = [*ASK, choice.message.model_dump(exclude_none=True), result]
        follow = await client.chat.completions.create(model=MODEL, messages=history,
                                                      tools=TOOLS, temperature=0, max_tokens=5)
        assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
        assert follow.usage.prompt_tokens > first.usage.prompt_tokens
    prompt = tools_edge.tokenizer(MODEL).render_chat(history, tools=TOOLS)  # type: ignore[union-attr]
    assert "Sunny, 21 C" in prompt and f'"name": "{call.function.name}"' in prompt
    assert '"description": "Forecast"' in prompt


async def test_named_function_and_errors(url: str) -> None:
    async with _sdk(url) as client:
        named = {"type": "function", "function": {"name": "clock"}}
        out = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named, temperature=1, seed=4,
            max_tokens=40, n=2)
        for choice in out.choices:
            [call] = choice.message.tool_calls or []
            assert call.function.name == "clock"
            _check_call("clock", call.function.arguments)
        none = await client.chat.completions.create(
            model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=3)
        assert none.choices[0].message.tool_calls is None
        for kwargs, param in [
                (dict(tools=TOOLS, tool_choice={"type": "function",
                                                "function": {"name": "nope"}}), "tool_choice"),
                (dict(tool_choice="required"), "tool_choice"),
                (dict(tools=[{"type": "function", "function": {"nom": "x"}}]), "tools")]:
            with pytest.raises(openai.BadRequestError) as bad:
                await client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3,
                                                     **kwargs)
            assert bad.value.param == param


SCRIPTS = {
    "hermes": ("{{ '<tool_call>' }}",
               'Let me look. <tool_call>{"name": "weather", "arguments": '
               '{"city": "Oslo", "unit": "celsius", "days": 2}}</tool_call>'),
    "llama3": ("{{ '<|python_tag|>' }}",
               '{"name": "weather", "parameters": {"city": "Oslo", "unit": "celsius", '
               '"days": 2}}'),
    "mistral": ("{{ '[TOOL_CALLS]' }}",
                '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Oslo", '
                '"unit": "celsius", "days": 2}}]'),
}


def _script(edge: EdgeServer, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    """The model 'writes' the scripted reply of fmt, a few characters per delta, and its
    template is one that teaches fmt."""
    marker, text = SCRIPTS[fmt]
    tokenizer = edge.tokenizer(MODEL)
    assert tokenizer is not None
    monkeypatch.setitem(tokenizer.chat_templates, "default",
                        tokenizer.chat_templates["default"] + "{# " + marker + " #}")

    async def scripted(model: str, prompt: list[int], params: Any
                       ) -> AsyncGenerator[Delta, None]:
        for i in range(0, len(text), 5):
            yield Delta(text[i:i + 5], [1])
        yield Delta("", [], "stop", Usage(len(prompt), len(text) // 5))

    monkeypatch.setattr(edge, "_stream", scripted)


@pytest.mark.parametrize("fmt", SCRIPTS)
async def test_auto_parses_each_format(url: str, tools_edge: EdgeServer,
                                       monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    await tools_edge.load(MODEL)
    _script(tools_edge, monkeypatch, fmt)
    want = {"city": "Oslo", "unit": "celsius", "days": 2}
    async with _sdk(url) as client:
        out = await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS)
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls"
        assert message.content == ("Let me look. " if fmt == "hermes" else None)
        [call] = message.tool_calls or []
        assert call.function.name == "weather" and json.loads(call.function.arguments) == want
        stream = await client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                                      stream=True)
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
        assert text == (message.content or "")
        assert [(t.function.name, json.loads(t.function.arguments or "")) for t in calls] == \
            [("weather", want)]
    answer = await ollama.AsyncClient(host=url).chat(model=MODEL, messages=ASK, tools=TOOLS)
    assert answer.message.tool_calls is not None
    [ocall] = answer.message.tool_calls
    assert ocall.function.name == "weather" and dict(ocall.function.arguments) == want
    assert answer.done_reason == "stop"


async def test_ollama_tool_results_go_back_in(url: str, tools_edge: EdgeServer) -> None:
    client = ollama.AsyncClient(host=url)
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "weather", "arguments": {"city": "Oslo", "unit": "celsius",
                                                       "days": 1}}}]},
               {"role": "tool", "content": "Rain", "tool_name": "weather"}]
    out = await client.chat(model=MODEL, messages=history, tools=TOOLS,
                            options={"num_predict": 4, "temperature": 0})
    assert out.done and out.prompt_eval_count
    prompt = tools_edge.tokenizer(MODEL).render_chat(  # type: ignore[union-attr]
        [{"role": m["role"], "content": m["content"],
          **({"tool_calls": [{"type": "function", **c} for c in m["tool_calls"]]}
             if "tool_calls" in m else {})} for m in history], tools=TOOLS)
    assert "Rain" in prompt and '"city": "Oslo"' in prompt


async def test_ollama_show_lists_tools(url: str) -> None:
    shown = await ollama.AsyncClient(host=url).show(MODEL)
    assert shown.capabilities == ["completion", "tools"]
