"""Public result and error types of the Python API."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


class InvalidRequest(ValueError):
    """A request the engine will not run; `param` names the offending parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ServerClosing(RuntimeError):
    """The server is shutting down and takes no new requests."""


class GenerationError(RuntimeError):
    """A request that failed while running (its error is the __cause__)."""


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0      # prompt tokens whose KV was reused, not computed

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's log-probability, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the model made (chat with `tools`)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    @property
    def arguments_json(self) -> str:
        """The arguments as OpenAI sends them: a JSON text."""
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Completion:
    text: str                   # the content (tool calls parsed out of it)
    token_ids: list[int]
    finish_reason: str          # "stop" | "length" | "tool_calls"
    usage: Usage
    logprobs: list[TokenLogprob] | None = None   # when asked for, one per token id
    tool_calls: list[ToolCall] | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """One piece of a stream; the last one has finish_reason and usage set."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[ToolCall] | None = None     # calls completed with this piece

    def __str__(self) -> str:
        return self.text
