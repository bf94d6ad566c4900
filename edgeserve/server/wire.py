"""What travels over HTTP: msgspec structs for OpenAI-shaped requests and responses.

Request structs ignore unknown fields, so whatever else an OpenAI client sends
(user, presence_penalty, ...) is accepted and has no effect. Every bound a client can
break is declared here, so msgspec names the offending field in its error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Role = Literal["system", "developer", "user", "assistant", "tool"]
# Bounds that keep values the engine cannot represent out of a step shared by every request:
# top_k goes into an int64 tensor (-1 means off, as in vLLM); each stop string costs the
# square of its length to watch.
TopK = Annotated[int, msgspec.Meta(ge=-1, le=2**31 - 1)]
Stop = Annotated[str, msgspec.Meta(max_length=512)]
MAX_N = 16          # choices of one prompt
MAX_CHOICES = 64    # sequences one request may start (prompts x n)
N = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]
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
    include_usage: bool | None = False


class GenerationRequest(msgspec.Struct, kw_only=True):
    """The fields chat and plain completions share."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: TopK | None = None           # extensions, as in vLLM
    ignore_eos: bool | None = None
    seed: int | None = None
    stop: Stop | list[Stop] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: N | None = 1

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> dict[str, Any]:
        """Options for EdgeServer's generation calls (None means the default)."""
        temperature, top_p = self.temperature, self.top_p
        # Tiny positive values mean their limit: greedy, and only the most likely token.
        if temperature is not None and 0 < temperature < TINY:
            temperature = 0.0
        if top_p is not None and 0 < top_p < TINY:
            top_p = TINY
        return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
                "top_k": None if self.top_k == -1 else self.top_k, "seed": self.seed,
                "stop": self.stop, "ignore_eos": self.ignore_eos, "logprobs": logprobs}


class ChatRequest(GenerationRequest, kw_only=True):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None


class CompletionRequest(GenerationRequest, kw_only=True):
    # A text, token ids, or a list of either (one completion per prompt).
    prompt: str | list[str | int | list[int]]
    logprobs: TopLogprobs | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


# ---- responses -------------------------------------------------------------------------
class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0      # prompt tokens whose KV was reused (prefix cache)


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = msgspec.field(
        default_factory=PromptTokensDetails)


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprob]


class AssistantMessage(msgspec.Struct):
    role: str
    content: str


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


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
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None      # only on the extra chunk of stream_options.include_usage


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class TextCompletion(msgspec.Struct, omit_defaults=True):
    """A `text_completion` object: the whole answer, or one chunk of a stream."""

    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


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
