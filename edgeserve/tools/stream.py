"""A chat's generation with tools: the template sees them, a forced choice is constrained by
grammar, and the reply's deltas carry the parsed calls instead of their text."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from edgeserve.constrain import Grammar
from edgeserve.results import Delta, InvalidRequest
from edgeserve.tokenizer import Tokenizer
from edgeserve.tools.calls import call_grammar, tool_choice, tool_names
from edgeserve.tools.parser import ToolCallParser, detect_format


@dataclass(frozen=True, slots=True)
class ToolPlan:
    grammar: Grammar | None         # set when the choice forces a call
    format: str | None              # the parser's format; None: the reply is not parsed


def plan_tools(tools: list[dict[str, Any]] | None, choice: Any, tokenizer: Tokenizer,
               grammar: Grammar | None) -> ToolPlan:
    """How to generate with these tools and this tool_choice."""
    parsed = tool_choice(choice)
    if not tools:
        if parsed.forced:
            raise InvalidRequest(f"tool_choice '{parsed.function or parsed.mode}' needs "
                                 "tools", "tool_choice")
        return ToolPlan(None, None)
    tool_names(tools)
    if parsed.mode == "none":
        return ToolPlan(None, None)
    if not parsed.forced:
        template = tokenizer.chat_templates.get("tool_use") or \
            tokenizer.chat_templates.get("default", "")
        return ToolPlan(None, detect_format(template))
    if grammar is not None:
        raise InvalidRequest("a forced tool call cannot also follow a response format",
                             "tool_choice")
    return ToolPlan(call_grammar(tools, parsed), "json")


async def parse_stream(deltas: AsyncIterator[Delta], fmt: str) -> AsyncGenerator[Delta, None]:
    """The deltas with their tool calls parsed out of the text (held back until complete)."""
    parser = ToolCallParser(fmt)
    try:
        async for d in deltas:
            text, calls = parser.push(d.text)
            reason = d.finish_reason
            if reason:
                rest, more = parser.finish()
                text, calls = text + rest, calls + more
                if parser.calls and reason == "stop":
                    reason = "tool_calls"
            yield Delta(text, d.token_ids, reason, d.usage, d.logprobs, calls or None)
    finally:
        close = getattr(deltas, "aclose", None)
        if close is not None:
            await close()
