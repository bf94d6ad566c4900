"""What travels over HTTP: msgspec structs for OpenAI-shaped requests and responses.

Request structs ignore unknown fields, so whatever else an OpenAI client sends
(user, presence_penalty, ...) is accepted and has no effect.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Role = Literal["system", "developer", "user", "assistant", "tool"]
# Bounds that keep values the engine cannot represent out of a step shared by every request:
# top_k goes into an int64 tensor; each stop string costs the square of its length to watch.
TopK = Annotated[int, msgspec.Meta(le=2**31 - 1)]
Stop = Annotated[str, msgspec.Meta(max_length=512)]
# Sampling runs in float32, where a smaller positive value rounds to 0.
TINY = 1e-30


# ---- requests --------------------------------------------------------------------------
class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class Message(msgspec.Struct):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The message as chat templates expect it."""
        # Templates rarely know the newer "developer" role; it means what "system" means.
        role = "system" if self.role == "developer" else self.role
        content: str | list[dict[str, str]] | None = self.content  # type: ignore[assignment]
        if isinstance(self.content, list):
            content = [{"type": "text", "text": p.text} for p in self.content]
        out: dict[str, Any] = {"role": role, "content": content}
        if self.name is not None:
            out["name"] = self.name
        return out


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatRequest(msgspec.Struct):
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: TopK | None = None           # an extension, as in vLLM
    seed: int | None = None
    stop: Stop | list[Stop] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: bool | None = None

    def sampling(self) -> dict[str, Any]:
        """Options for EdgeServer.chat / stream_chat (None means the default)."""
        max_tokens = (self.max_completion_tokens if self.max_completion_tokens is not None
                      else self.max_tokens)
        temperature, top_p = self.temperature, self.top_p
        # Tiny positive values mean their limit: greedy, and only the most likely token.
        if temperature is not None and 0 < temperature < TINY:
            temperature = 0.0
        if top_p is not None and 0 < top_p < TINY:
            top_p = TINY
        return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "top_k": self.top_k, "seed": self.seed, "stop": self.stop}


# ---- responses -------------------------------------------------------------------------
class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct):
    role: str
    content: str


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class DeltaMessage(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None      # only on the extra chunk of stream_options.include_usage


class ModelCard(msgspec.Struct):
    id: str
    object: str
    created: int
    owned_by: str
    parent: str | None


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail


def encode(obj: Any) -> bytes:
    return msgspec.json.encode(obj)
