"""What `/api/show` and `/api/tags` say of a model: details read from its folder
(architecture, size, quantization, template, parameters)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from edgeserve.arch.spec import ModelFormatError
from edgeserve.blocks.pack import TASK_FILE
from edgeserve.loader import scan_checkpoint
from edgeserve.server.ollama_wire import Description, Details

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
