"""ModelSpec: the architecture facts of a Hugging Face config.json, validated."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
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
    "MixtralForCausalLM": ("moe", False, False),
    "Qwen2MoeForCausalLM": ("moe", True, False),
    "OlmoeForCausalLM": ("moe", False, True),
    "Qwen3MoeForCausalLM": ("moe", False, True),
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
    # Attention details beyond the dense family's (defaults: as the dense family computes).
    qk_norm_per_head: bool = True              # False: over the whole q / k projection (OLMoE)
    clip_qkv: float | None = None              # clamp q, k, v to [-clip, clip] (OLMoE)
    o_bias: bool = False
    # Mixture of experts (num_experts == 0: a dense model).
    num_experts: int = 0                       # E
    experts_per_token: int = 0                 # A
    expert_intermediate_size: int = 0          # I of one expert
    shared_expert_intermediate_size: int = 0   # 0: no shared expert
    norm_topk_prob: bool = False               # rescale the A gate weights to sum to 1
    sparse_layers: tuple[bool, ...] = ()       # per layer: a MoE block, else a dense MLP
    expert_layout: str = "per_expert"          # how the checkpoint stores experts

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
    if architecture == "OlmoeForCausalLM":       # OLMoE attends to everything
        return (None,) * num_layers
    window = f.get("sliding_window", int, None)
    layer_types = f.data.get("layer_types")
    if isinstance(layer_types, list):
        if len(layer_types) != num_layers:
            raise ModelFormatError(f"{f.path}: field 'layer_types' must have {num_layers} entries")
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    qwen = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
    if architecture in qwen and not f.data.get("use_sliding_window", False):
        window = None
    if architecture == "Qwen2MoeForCausalLM" and window is not None:
        # transformers' default layer types for Qwen2-MoE: every other layer, the first ones
        below = f.get("max_window_layers", int, 28)
        return tuple(window if n % 2 == 0 and n < below else None for n in range(num_layers))
    return (window,) * num_layers


def _sparse_layers(f: _Fields, num_layers: int) -> tuple[bool, ...]:
    """Qwen-MoE: layers in mlp_only_layers, and those off the decoder_sparse_step, are dense."""
    step = f.get("decoder_sparse_step", int, 1, positive=True)
    dense = f.get("mlp_only_layers", list, None) or []
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in dense):
        raise ModelFormatError(f"{f.path}: field 'mlp_only_layers' should hold layer numbers")
    return tuple(n not in dense and (n + 1) % step == 0 for n in range(num_layers))


def _moe(f: _Fields, architecture: str, num_layers: int) -> dict[str, Any]:
    """The ModelSpec fields of a mixture-of-experts architecture."""
    # transformers 5 writes num_local_experts for Mixtral and Qwen3-MoE, num_experts for the
    # others; hub configs of Qwen3-MoE have num_experts.
    experts_field = "num_local_experts" if "num_local_experts" in f.data or (
        architecture == "MixtralForCausalLM" and "num_experts" not in f.data) else "num_experts"
    experts = f.get(experts_field, int, positive=True)
    top_k = f.get("num_experts_per_tok", int, positive=True)
    if top_k > experts:
        raise ModelFormatError(f"{f.path}: field 'num_experts_per_tok' ({top_k}) exceeds "
                               f"'{experts_field}' ({experts})")
    out: dict[str, Any] = dict(num_experts=experts, experts_per_token=top_k,
                               sparse_layers=(True,) * num_layers)
    if architecture == "MixtralForCausalLM":     # softmax over the selected experts only
        return out | dict(norm_topk_prob=True,
                          expert_intermediate_size=f.get("intermediate_size", int))
    out["norm_topk_prob"] = f.get("norm_topk_prob", bool, False)
    if architecture == "OlmoeForCausalLM":
        return out | dict(expert_intermediate_size=f.get("intermediate_size", int),
                          qk_norm_per_head=False,
                          clip_qkv=f.get("clip_qkv", float, None, positive=True),
                          o_bias=f.get("attention_bias", bool, False))
    out |= dict(expert_intermediate_size=f.get("moe_intermediate_size", int, positive=True),
                sparse_layers=_sparse_layers(f, num_layers))
    if architecture == "Qwen2MoeForCausalLM":
        return out | dict(qkv_bias=f.get("qkv_bias", bool, True),
                          shared_expert_intermediate_size=f.get(
                              "shared_expert_intermediate_size", int, 0))
    return out | dict(o_bias=f.get("attention_bias", bool, False))


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
    spec = ModelSpec(
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
    if family == "moe":
        return replace(spec, **_moe(f, arch, layers))
    if arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"):    # o_proj has a bias with q/k/v
        return replace(spec, o_bias=spec.qkv_bias)
    return spec


def expert_layout(model_dir: Path) -> str:
    """'stacked' when the checkpoint holds each layer's experts as (E, ...) tensors (as
    save_pretrained(save_original_format=False) writes them), else 'per_expert' (what
    save_pretrained writes by default, and hub checkpoints hold)."""
    from edgeserve.checkpoint import read_header  # checkpoint imports this module

    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        try:
            names = list(json.loads(index.read_text())["weight_map"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelFormatError(f"{index}: no valid 'weight_map' ({e})") from e
    elif single.is_file():
        names = [t.name for t in read_header(single)]
    else:
        return "per_expert"                           # the loader names what is missing
    # A quantized checkpoint stores the stacked tensor as its components (quant/format.py).
    return "stacked" if any(n.removesuffix(".qweight").endswith(".experts.gate_up_proj")
                            for n in names) else "per_expert"


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
    spec = parse_config(path, data)
    if spec.family == "moe":
        spec = replace(spec, expert_layout=expert_layout(model_dir))
    return spec
