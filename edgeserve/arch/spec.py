"""ModelSpec: the architecture facts of a Hugging Face config.json, validated."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ModelFormatError(ValueError):
    """A model folder that cannot be served; the message names the file and field."""


# architecture name in config.json -> (family, qkv bias by default, q/k norm)
ARCHITECTURES: dict[str, tuple[str, bool, bool]] = {
    "LlamaForCausalLM": ("dense", False, False),
    "MistralForCausalLM": ("dense", False, False),
    "Qwen2ForCausalLM": ("dense", True, False),
    "Qwen3ForCausalLM": ("dense", False, True),
}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeSpec:
    theta: float
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True, slots=True)
class ModelSpec:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    max_positions: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]   # per layer; None: full attention
    checkpoint_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


class _Fields:
    """Typed reads from config.json with errors that name the file and field."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    def get(self, name: str, kind: type, default: Any = ..., positive: bool = False) -> Any:
        value = self.data.get(name, default)
        if value is ...:
            raise ModelFormatError(f"{self.path}: missing field '{name}'")
        if value is None and default is None:
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise ModelFormatError(
                f"{self.path}: field '{name}' should be {kind.__name__}, got {value!r}")
        if positive and value <= 0:  # type: ignore[operator]
            raise ModelFormatError(f"{self.path}: field '{name}' must be positive, got {value}")
        return value


def _rope(f: _Fields) -> RopeSpec:
    # transformers 5 writes rope_parameters; older configs rope_theta + rope_scaling.
    params = f.data.get("rope_parameters") or f.data.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelFormatError(f"{f.path}: field 'rope_parameters' should be an object")
    theta = params.get("rope_theta", f.data.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ModelFormatError(
            f"{f.path}: rope type '{kind}' is not supported (supported: {', '.join(ROPE_TYPES)})")
    return RopeSpec(
        theta=float(theta), kind=kind, factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_positions=int(params.get("original_max_position_embeddings", 8192)))


def _sliding_windows(f: _Fields, num_layers: int, architecture: str) -> tuple[int | None, ...]:
    window = f.get("sliding_window", int, None)
    layer_types = f.data.get("layer_types")
    if isinstance(layer_types, list):
        if len(layer_types) != num_layers:
            raise ModelFormatError(f"{f.path}: field 'layer_types' must have {num_layers} entries")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if architecture == "Qwen2ForCausalLM" and not f.data.get("use_sliding_window", False):
        window = None
    return (window,) * num_layers


def parse_config(path: Path, data: dict[str, Any]) -> ModelSpec:
    f = _Fields(path, data)
    archs = f.get("architectures", list)
    supported = [a for a in archs if a in ARCHITECTURES]
    if not supported:
        raise ModelFormatError(
            f"{path}: field 'architectures' is {archs}; supported: {', '.join(ARCHITECTURES)}")
    arch = supported[0]
    family, default_bias, qk_norm = ARCHITECTURES[arch]
    hidden = f.get("hidden_size", int, positive=True)
    heads = f.get("num_attention_heads", int, positive=True)
    kv_heads = f.get("num_key_value_heads", int, heads, positive=True)
    head_dim = f.get("head_dim", int, None) or hidden // heads
    if heads % kv_heads:
        raise ModelFormatError(f"{path}: num_attention_heads ({heads}) is not a multiple of "
                               f"num_key_value_heads ({kv_heads})")
    act = f.get("hidden_act", str, "silu")
    if act != "silu":
        raise ModelFormatError(f"{path}: field 'hidden_act' is '{act}', only 'silu' is supported")
    layers = f.get("num_hidden_layers", int, positive=True)
    return ModelSpec(
        architecture=arch, family=family,
        vocab_size=f.get("vocab_size", int, positive=True), hidden_size=hidden,
        intermediate_size=f.get("intermediate_size", int, positive=True), num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=f.get("rms_norm_eps", float, 1e-6), rope=_rope(f),
        max_positions=f.get("max_position_embeddings", int, 4096, positive=True),
        tie_embeddings=f.get("tie_word_embeddings", bool, False),
        qkv_bias=f.get("attention_bias", bool, default_bias), qk_norm=qk_norm,
        mlp_bias=f.get("mlp_bias", bool, False),
        sliding_windows=_sliding_windows(f, layers, arch),
        checkpoint_dtype=f.data.get("torch_dtype") or f.data.get("dtype"),
        bos_token_id=f.get("bos_token_id", int, None),
        eos_token_ids=_ids(data.get("eos_token_id")))


def load_spec(model_dir: Path) -> ModelSpec:
    path = model_dir / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{path}: not found (a model folder needs config.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: should hold a JSON object")
    return parse_config(path, data)
