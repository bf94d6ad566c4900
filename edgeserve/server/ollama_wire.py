"""What travels over Ollama's API: msgspec structs, keep-alive durations, ids and times.

Request structs ignore unknown fields (images, unknown options ...):
whatever else an Ollama client sends is accepted and has no effect.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec

from edgeserve.results import InvalidRequest
from edgeserve.store import ModelStore, UnknownModel

TopK = Annotated[int, msgspec.Meta(le=2**31 - 1)]      # it goes into an int64 tensor
Stop = Annotated[str, msgspec.Meta(max_length=512)]
TINY = 1e-30        # sampling runs in float32, where a smaller positive value rounds to 0
# What Ollama reports as the expiry of a model kept forever: now + the largest Go duration.
FOREVER = timedelta(days=106_751)


# ---- requests --------------------------------------------------------------------------
class Options(msgspec.Struct):
    temperature: float | None = None
    top_p: float | None = None
    top_k: TopK | None = None
    seed: int | None = None
    num_predict: int | None = None      # -1 (infinite) and -2 (fill the context): default
    stop: Stop | list[Stop] | None = None

    def sampling(self) -> dict[str, Any]:
        """Options for EdgeServer.stream_*; max_tokens None: the caller's default."""
        num_predict = self.num_predict
        if num_predict == 0:
            raise InvalidRequest("options.num_predict must be at least 1, or -1 for no limit",
                                 "num_predict")
        temperature, top_p = self.temperature, self.top_p
        # Tiny positive values mean their limit: greedy, and only the most likely token.
        if temperature is not None and 0 < temperature < TINY:
            temperature = 0.0
        if top_p is not None and 0 <= top_p < TINY:
            top_p = TINY
        return {"max_tokens": num_predict if num_predict and num_predict > 0 else None,
                "temperature": temperature, "top_p": top_p, "top_k": self.top_k,
                "seed": self.seed, "stop": self.stop}


class CallFunction(msgspec.Struct):
    name: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)


class ToolCall(msgspec.Struct):
    function: CallFunction


class Message(msgspec.Struct):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] | None = None    # an assistant's earlier calls
    tool_name: str | None = None                # a tool's result: the function it answers

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": {
                "name": c.function.name, "arguments": c.function.arguments}}
                for c in self.tool_calls]
        if self.tool_name is not None:
            out["name"] = self.tool_name
        return out


KeepAlive = float | str | None


class ChatRequest(msgspec.Struct):
    model: str
    messages: list[Message] = msgspec.field(default_factory=list)
    stream: bool = True
    options: Options = msgspec.field(default_factory=Options)
    keep_alive: KeepAlive = None
    tools: list[dict[str, Any]] | None = None
    format: str | dict[str, Any] | None = None


class GenerateRequest(msgspec.Struct):
    model: str
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    stream: bool = True
    options: Options = msgspec.field(default_factory=Options)
    keep_alive: KeepAlive = None
    format: str | dict[str, Any] | None = None


class ShowRequest(msgspec.Struct):
    model: str = ""
    name: str = ""          # what older clients send


# ---- responses -------------------------------------------------------------------------
class AssistantMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str
    tool_calls: list[ToolCall] | None = None


class Response(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A line of /api/chat (message) or /api/generate (response); the last one has stats."""

    model: str
    created_at: str
    message: AssistantMessage | None = None
    response: str | None = None
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None           # nanoseconds, like every duration here
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class Details(msgspec.Struct):
    parent_model: str
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class Description(msgspec.Struct):
    """What /api/tags, /api/ps and /api/show tell about a stored model."""

    details: Details
    model_info: dict[str, Any]
    context_length: int
    template: str | None
    parameters: str


# ---- keep-alive ------------------------------------------------------------------------
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
          "h": 3600.0}
_PART_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_RE = re.compile(rf"[-+]?(?:{_PART_RE.pattern})+")


def keep_alive_seconds(value: KeepAlive) -> float | None:
    """Seconds from a number or a Go duration ("5m", "1h30m", "0"); None when absent.
    A negative value means forever; it stays negative."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)       # "300", "-1": Ollama's clients send these too
        except ValueError:
            if not _DURATION_RE.fullmatch(text):
                raise InvalidRequest(f"keep_alive: {value!r} is not a duration such as "
                                     "'5m', '1h' or '30s'", "keep_alive") from None
            seconds = sum(float(n) * _UNITS[u] for n, u in _PART_RE.findall(text))
            seconds = -seconds if text.startswith("-") else seconds
    else:
        seconds = value
    if math.isnan(seconds):
        raise InvalidRequest(f"keep_alive must be a number, got {value!r}", "keep_alive")
    return -1.0 if seconds > FOREVER.total_seconds() else seconds


# ---- times and names -------------------------------------------------------------------
def timestamp(when: datetime | None = None) -> str:
    """RFC 3339 with a fractional second, as Ollama writes its times."""
    return (when or datetime.now(UTC)).isoformat()


def in_seconds(seconds: float | None) -> str:
    """The time `seconds` from now; None: forever."""
    delta = FOREVER if seconds is None else timedelta(seconds=seconds)
    return timestamp(datetime.now(UTC) + delta)


def from_epoch(seconds: float) -> str:
    return timestamp(datetime.fromtimestamp(seconds, UTC))


def digest(model_id: str, size: int) -> str:
    """A stable stand-in for Ollama's manifest digest."""
    return hashlib.sha256(f"{model_id}\0{size}".encode()).hexdigest()


def model_id(store: ModelStore, name: str) -> str:
    """The store id for an Ollama model name; "id:latest" names "id" too."""
    if not name:
        raise InvalidRequest("model is required", "model")
    try:
        store.path(name)
    except UnknownModel:
        base = name.removesuffix(":latest")
        if base == name:
            raise
        try:
            store.path(base)
        except UnknownModel:
            raise UnknownModel(name, store.root) from None
        return base
    return name


# ---- model facts -----------------------------------------------------------------------
