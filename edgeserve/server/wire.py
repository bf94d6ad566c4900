"""What travels over HTTP: msgspec structs for OpenAI-shaped requests and responses.

Request structs ignore unknown fields, so whatever else an OpenAI client sends
(user, metadata, ...) is accepted and has no effect; the parameters that would change the
output and are not implemented (UNSUPPORTED) are read to refuse them. Every bound a client can
break is declared here, so msgspec names the offending field in its error.
"""

from __future__ import annotations

import json
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


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str              # a JSON text


class ToolCallWire(msgspec.Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class Message(msgspec.Struct):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallWire] | None = None    # an assistant's earlier calls
    tool_call_id: str | None = None                 # a tool's result: the call it answers

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
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            # Templates take the arguments as a mapping (as transformers documents).
            out["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                for c in self.tool_calls]
        return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = False


class JsonSchemaFormat(msgspec.Struct):
    name: str = "response"
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


# OpenAI parameters that would change the output and are not implemented: a request that
# sets one (to other than its neutral value) is refused, naming it.
UNSUPPORTED = {"logit_bias": None, "frequency_penalty": 0, "presence_penalty": 0,
               "functions": None, "function_call": None, "prediction": None, "audio": None,
               "web_search_options": None, "suffix": None, "echo": False}


class GenerationRequest(msgspec.Struct, kw_only=True):
    """The fields chat and plain completions share. Fields named in UNSUPPORTED are read
    only to refuse them."""

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
    logit_bias: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    def unsupported(self) -> list[str]:
        """The parameters set that would change the output and are not implemented."""
        return [name for name, neutral in UNSUPPORTED.items()
                if getattr(self, name, neutral) not in (None, neutral, {}, [], "")]

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
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    prediction: Any = None
    audio: Any = None
    web_search_options: Any = None


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


class AssistantMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | None
    tool_calls: list[ToolCallWire] | None = None


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


class ToolCallDelta(msgspec.Struct):
    index: int
    id: str
    function: FunctionCall
    type: str = "function"


class DeltaMessage(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


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
