"""What travels over Ollama's API: msgspec structs, keep-alive durations, model facts.

Request structs ignore unknown fields (images, unknown options ...):
whatever else an Ollama client sends is accepted and has no effect.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from edgeserve.arch.spec import ModelFormatError
from edgeserve.blocks.pack import TASK_FILE
from edgeserve.loader import scan_checkpoint
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
_QUANT = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_INFO_KEYS = {"context_length": "max_position_embeddings", "embedding_length": "hidden_size",
              "block_count": "num_hidden_layers", "feed_forward_length": "intermediate_size",
              "attention.head_count": "num_attention_heads",
              "attention.head_count_kv": "num_key_value_heads",
              "attention.key_length": "head_dim",
              "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size"}
_GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "repetition_penalty": "repeat_penalty"}


def describe_tagged(path: Path, tag: str | None) -> Description:
    """describe(path) of a model's quantized variant (tag int8 / int4) or of the model."""
    out = describe(path)
    if tag is not None:
        out.details.quantization_level = tag.upper()
        out.details.parent_model = out.details.parent_model or path.name
    return out


def describe(path: Path) -> Description:
    """Facts about the model folder at `path` (blocking: it reads files). A task is
    described as its base, with the base as its parent."""
    base = _read_json(path / TASK_FILE).get("base")
    if isinstance(base, str) and (path.parent / base / "config.json").is_file():
        out = describe(path.parent / base)
        out.details.parent_model = base
        out.model_info["general.basename"] = path.name
        out.template = _chat_template(path) or out.template
        return out
    config = _read_json(path / "config.json")
    params, dtype = _count_parameters(path)
    family = str(config.get("model_type") or "unknown")
    dtype = dtype or str(config.get("torch_dtype") or config.get("dtype") or "")
    details = Details("", "safetensors", family, [family], _human(params),
                      _QUANT.get(dtype, dtype.upper()))
    info: dict[str, Any] = {"general.architecture": family, "general.basename": path.name,
                            "general.parameter_count": params}
    for key, name in _INFO_KEYS.items():
        if config.get(name) is not None:
            info[f"{family}.{key}"] = config[name]
    rope = config.get("rope_parameters")
    theta = config.get("rope_theta") or (rope.get("rope_theta") if isinstance(rope, dict)
                                         else None)
    if theta is not None:
        info[f"{family}.rope.freq_base"] = theta
    context = config.get("max_position_embeddings")
    context = context if isinstance(context, int) and context > 0 else 4096
    return Description(details, info, context, _chat_template(path),
                       _parameters(path, context))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _count_parameters(path: Path) -> tuple[int, str | None]:
    """Parameters in the checkpoint, and the dtype holding most of them."""
    try:
        tensors = scan_checkpoint(path)
    except (ModelFormatError, OSError, ValueError):
        return 0, None
    counts: Counter[str] = Counter()
    for tensor in tensors.values():
        counts[str(tensor.dtype).removeprefix("torch.")] += math.prod(tensor.shape)
    return sum(counts.values()), (counts.most_common(1)[0][0] if counts else None)


def _human(count: int) -> str:
    """7.6B, 135.0M, 12K: parameter counts as Ollama shows them."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.1f}{suffix}"
    return str(count)


def _chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(path / "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):      # named templates: [{"name", "template"}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _parameters(path: Path, context: int) -> str:
    """Modelfile-style PARAMETER lines from generation_config.json."""
    generation = _read_json(path / "generation_config.json")
    lines = [f"{'num_ctx':<30} {context}"]
    for key, name in _GENERATION_KEYS.items():
        value = generation.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            lines.append(f"{name:<30} {value}")
    return "\n".join(lines)
