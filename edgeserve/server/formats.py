"""Response formats as grammars: OpenAI's `response_format` and Ollama's `format`."""

from __future__ import annotations

from typing import Any

from edgeserve.constrain import Grammar, GrammarError
from edgeserve.results import InvalidRequest
from edgeserve.server.wire import ResponseFormat


def response_grammar(fmt: ResponseFormat | None) -> Grammar | None:
    """The grammar of a response_format (None for text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Grammar.json_object()
    if fmt.json_schema is None or fmt.json_schema.schema is None:
        raise InvalidRequest("response_format json_schema needs json_schema.schema",
                             "response_format")
    try:
        return Grammar.json_schema(fmt.json_schema.schema, bool(fmt.json_schema.strict))
    except GrammarError as e:
        raise InvalidRequest(str(e), "response_format") from e


def format_grammar(fmt: str | dict[str, Any] | None) -> Grammar | None:
    """Ollama's `format`: "json" (a JSON object) or a JSON schema."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return Grammar.json_object()
    if isinstance(fmt, dict):
        try:
            return Grammar.json_schema(fmt)
        except GrammarError as e:
            raise InvalidRequest(str(e), "format") from e
    raise InvalidRequest(f"format must be \"json\" or a JSON schema, got {fmt!r}", "format")
