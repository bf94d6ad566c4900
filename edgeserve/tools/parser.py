"""Tool calls parsed out of a model's output, whole or streamed, in the format of its
chat template:

| format  | a call looks like                                                      |
| ------- | ---------------------------------------------------------------------- |
| hermes  | `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen too)  |
| llama3  | `{"name": ..., "parameters": {...}}` as the whole reply (`;` between   |
|         | several), optionally after `<|python_tag|>`                             |
| mistral | `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`                 |
| json    | `{"name": ..., "arguments": {...}}`: a grammar-forced call             |

Text outside calls is content. A call that does not parse stays content, as written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edgeserve.results import ToolCall


@dataclass(frozen=True, slots=True)
class _Format:
    markers: tuple[str, ...]        # text that opens a call anywhere in the reply
    end: str | None                 # text that closes it (None: the reply's end)
    leading: str | None             # a reply starting with this is calls to the end


FORMATS: dict[str, _Format] = {
    "hermes": _Format(("<tool_call>",), "</tool_call>", None),
    "llama3": _Format(("<|python_tag|>",), None, "{"),
    # [TOOL_CALLS] is a special token that detokenization may drop: a leading array counts.
    "mistral": _Format(("[TOOL_CALLS]",), None, "["),
    "json": _Format((), None, "{"),
}


def detect_format(template: str) -> str:
    """The tool-call format a chat template teaches (Hermes when it says nothing)."""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or ("ipython" in template and "parameters" in template):
        return "llama3"
    return "hermes"


class ToolCallParser:
    """Splits a streamed reply into content and tool calls. push() returns the content
    that can be shown now and the calls completed; text that may open a call is held."""

    def __init__(self, fmt: str) -> None:
        self.format = FORMATS[fmt]
        self.name = fmt
        self._buf = ""
        self._opened = ""           # the marker that opened the current call
        self._in_call = False
        self._seen_text = False     # content other than whitespace was emitted
        self.calls: list[ToolCall] = []

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._step(content, calls):
            pass
        self.calls += calls
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The end of the reply: the call still open, or the text held back."""
        rest, self._buf = self._buf, ""
        if not self._in_call:
            return rest, []
        self._in_call = False
        calls = parse_calls(rest, self.name)
        if calls is None:
            return self._opened + rest, []
        self.calls += calls
        return "", calls

    def _step(self, content: list[str], calls: list[ToolCall]) -> bool:
        """One move over the buffer; True when another may follow."""
        fmt = self.format
        if self._in_call:
            if fmt.end is None or (end := self._buf.find(fmt.end)) < 0:
                return False
            body, self._buf = self._buf[:end], self._buf[end + len(fmt.end):]
            self._in_call = False
            parsed = parse_calls(body, self.name)
            if parsed is None:
                content.append(self._opened + body + fmt.end)
            else:
                calls += parsed
            return True
        if fmt.leading is not None and not self._seen_text:
            head = self._buf.lstrip()
            if not head or any(m.startswith(head) and m != head for m in fmt.markers):
                return False        # maybe a marker still coming
            if head.startswith(fmt.leading) and not head.startswith(fmt.markers):
                self._in_call, self._opened, self._buf = True, "", head
                return True
            self._seen_text = True
        hits = [(i, m) for m in fmt.markers if (i := self._buf.find(m)) >= 0]
        if hits:
            i, marker = min(hits)
            content.append(self._buf[:i])
            self._in_call, self._opened, self._buf = True, marker, self._buf[i + len(marker):]
            return True
        keep = _held(self._buf, fmt.markers)
        content.append(self._buf[:len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        if content[-1].strip():
            self._seen_text = True
        return False


def _held(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of text that could begin a marker."""
    for size in range(min(len(text), max((len(m) for m in markers), default=0)), 0, -1):
        if any(m.startswith(text[-size:]) for m in markers):
            return size
    return 0


def parse_calls(text: str, fmt: str) -> list[ToolCall] | None:
    """The calls in text (JSON objects or arrays of them, separated by space or ';'), or
    None when it is not calls."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    pos, text = 0, text.strip()
    while pos < len(text):
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return None
        values.extend(value if isinstance(value, list) else [value])
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
    calls = [_call(v) for v in values]
    if not calls or any(c is None for c in calls):
        return None
    return [c for c in calls if c is not None]


def _call(value: Any) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):       # some models write the arguments as a JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(value["name"], args)
