"""Tool-call formats parsed from whole replies and from streams split anywhere."""

from __future__ import annotations

import pytest

from edgeserve.tools import ToolCallParser, detect_format, parse_calls

CASES = [
    ("hermes", 'Checking. <tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n'
               '</tool_call>\n<tool_call>{"name": "time", "arguments": {}}</tool_call>',
     "Checking. \n", [("weather", {"city": "Oslo"}), ("time", {})]),
    ("hermes", "no calls, but <tool a stray tag", "no calls, but <tool a stray tag", []),
    ("hermes", "<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ("llama3", '{"name": "weather", "parameters": {"city": "Oslo"}}; '
               '{"name": "time", "parameters": {}}',
     "", [("weather", {"city": "Oslo"}), ("time", {})]),
    ("llama3", '<|python_tag|>{"name": "weather", "parameters": {"city": "Oslo"}}', "",
     [("weather", {"city": "Oslo"})]),
    ("llama3", "{ this is text", "{ this is text", []),
    ("mistral", '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Oslo"}}]', "",
     [("weather", {"city": "Oslo"})]),
    ("mistral", ' [{"name": "weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]', "",
     [("weather", {"city": "Oslo"})]),
    ("mistral", "Sure [x] thing", "Sure [x] thing", []),
    ("json", '{"name": "weather", "arguments": {"city": "Oslo"}}', "",
     [("weather", {"city": "Oslo"})]),
]


def _run(fmt: str, text: str, step: int) -> tuple[str, list[tuple[str, dict]]]:
    parser = ToolCallParser(fmt)
    content, calls = [], []
    for i in range(0, len(text), step):
        c, k = parser.push(text[i:i + step])
        content.append(c)
        calls += k
    c, k = parser.finish()
    return "".join(content) + c, [(x.name, x.arguments) for x in calls + k]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), CASES)
@pytest.mark.parametrize("step", [1, 3, 1000])
def test_formats(fmt: str, text: str, content: str, calls: list, step: int) -> None:
    assert _run(fmt, text, step) == (content, calls)


def test_content_streams_before_the_call() -> None:
    parser = ToolCallParser("hermes")
    assert parser.push("Hello <tool") == ("Hello ", [])      # the tag's start is held
    assert parser.push("_call>") == ("", [])
    text, calls = parser.push('{"name": "f", "arguments": {"a": 1}}</tool_call> done')
    assert text == " done" and calls[0].name == "f" and calls[0].arguments_json == '{"a": 1}'


def test_detect_format() -> None:
    assert detect_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_format("<|python_tag|>{{ x }}") == "llama3"
    assert detect_format("<tool_call>{{ x }}</tool_call>") == "hermes"
    assert detect_format("{{ messages }}") == "hermes"


def test_parse_calls_rejects_non_calls() -> None:
    assert parse_calls('{"no": "name"}', "json") is None
    assert parse_calls('{"name": "f", "arguments": [1]}', "json") is None
    assert parse_calls("", "json") is None
