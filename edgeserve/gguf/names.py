"""GGUF tensor names -> Hugging Face names, and llama.cpp's q/k row order undone.

llama.cpp's converter reorders the rows of a Llama-family model's q and k projections
(weights and biases) so that each head's rotary pairs are interleaved, as its RoPE kernel
wants: per head, rows (2, hd/2) become (hd/2, 2). `unpermute` restores the Hugging Face
order (halves), which is what edgeserve's rotary embedding expects.
"""

from __future__ import annotations

import re

import torch

# general.architecture -> (Hugging Face architecture, q/k rows permuted); a "llama" file
# with experts holds a Mixtral model.
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
    "qwen2moe": ("Qwen2MoeForCausalLM", False),
    "qwen3moe": ("Qwen3MoeForCausalLM", False),
    "olmoe": ("OlmoeForCausalLM", False),
}
MIXTRAL = "MixtralForCausalLM"

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
          "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
          "ffn_up_shexp": "mlp.shared_expert.up_proj",
          "ffn_down_shexp": "mlp.shared_expert.down_proj"}
# Experts stacked (E, rows, cols) in one GGUF tensor: one Hugging Face tensor per expert.
_EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_MIXTRAL_EXPERTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
# Linear weights (the rest: embeddings, norms, routers, biases).
LINEAR = frozenset({"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                    "ffn_down", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
                    *_EXPERTS})
# Tensors the pool fuses into one unit, so that they must share a scheme.
_FUSED = {"attn_q": "qkv", "attn_k": "qkv", "attn_v": "qkv", "ffn_gate": "gate_up",
          "ffn_up": "gate_up", "ffn_gate_exps": "gate_up_exps", "ffn_up_exps": "gate_up_exps",
          "ffn_gate_shexp": "gate_up_shexp", "ffn_up_shexp": "gate_up_shexp"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors llama.cpp derives from the config (rotary tables): nothing to load.
DERIVED = frozenset({"rope_freqs.weight", "rope_factors_long.weight",
                     "rope_factors_short.weight"})


def hf_names(name: str, architecture: str, experts: int = 0) -> list[str] | None:
    """The Hugging Face names of a GGUF tensor (one per expert for stacked experts), None
    for one this project does not know."""
    if name in _GLOBAL:
        return [_GLOBAL[name]]
    m = _LAYER_RE.match(name)
    if m is None:
        return None
    layer, kind, suffix = m.groups()
    p = f"model.layers.{layer}."
    if kind in _EXPERTS and suffix == "weight" and experts:
        if architecture == MIXTRAL:
            w = _MIXTRAL_EXPERTS[_EXPERTS[kind]]
            return [f"{p}block_sparse_moe.experts.{e}.{w}.weight" for e in range(experts)]
        return [f"{p}mlp.experts.{e}.{_EXPERTS[kind]}.weight" for e in range(experts)]
    if kind not in _LAYER:
        return None
    if kind == "ffn_gate_inp" and architecture == MIXTRAL:
        return [f"{p}block_sparse_moe.gate.{suffix}"]
    return [f"{p}{_LAYER[kind]}.{suffix}"]


def is_linear(name: str) -> bool:
    m = _LAYER_RE.match(name)
    return name == "output.weight" or (m is not None and m.group(2) in LINEAR
                                       and m.group(3) == "weight")


def fused_group(name: str) -> str:
    """The unit a GGUF tensor is part of (tensors of one unit share a scheme)."""
    m = _LAYER_RE.match(name)
    if m is None or m.group(2) not in _FUSED:
        return name
    return f"blk.{m.group(1)}.{_FUSED[m.group(2)]}.{m.group(3)}"


def heads_of(name: str, num_heads: int, num_kv_heads: int) -> int | None:
    """How many heads a permuted tensor holds: q -> num_heads, k -> num_kv_heads."""
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        return num_heads
    if name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        return num_kv_heads
    return None


def unpermute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave on dim 0: (heads, hd/2, 2) -> (heads, 2, hd/2)."""
    n = rows.shape[0]
    rest = rows.shape[1:]
    return rows.reshape(heads, n // heads // 2, 2, *rest).transpose(1, 2).reshape(n, *rest)

