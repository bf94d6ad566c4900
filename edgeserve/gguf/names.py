"""GGUF tensor names -> Hugging Face names, and llama.cpp's q/k row order undone.

llama.cpp's converter reorders the rows of a Llama-family model's q and k projections
(weights and biases) so that each head's rotary pairs are interleaved, as its RoPE kernel
wants: per head, rows (2, hd/2) become (hd/2, 2). `unpermute` restores the Hugging Face
order (halves), which is what edgeserve's rotary embedding expects.
"""

from __future__ import annotations

import re

import torch

# general.architecture -> (Hugging Face architecture of a dense model, q/k rows permuted)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
           "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# Tensors llama.cpp derives from the config (rotary tables): nothing to load.
DERIVED = frozenset({"rope_freqs.weight", "rope_factors_long.weight",
                     "rope_factors_short.weight"})


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, None for one this project does not know."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = _LAYER_RE.match(name)
    if m is None or m.group(2) not in _LAYER:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"


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

