"""A GGUF file's metadata as the Hugging Face config.json and generation_config.json."""

from __future__ import annotations

from typing import Any

from edgeserve.gguf.names import ARCHITECTURES
from edgeserve.gguf.reader import GGUFError, GGUFFile


def architecture(f: GGUFFile) -> tuple[str, bool]:
    """(Hugging Face architecture, q/k rows permuted); GGUFError naming an unsupported one."""
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{f.path}: architecture '{arch}' is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    if int(f.arch("expert_count", 0) or 0) > 0:
        raise GGUFError(f"{f.path}: architecture '{arch}' with experts (mixture of experts) "
                        "is not supported from GGUF files yet")
    return ARCHITECTURES[arch]


def hf_config(f: GGUFFile) -> dict[str, Any]:
    """config.json of the model the file holds."""
    hf_arch, _ = architecture(f)
    hidden = int(f.arch("embedding_length"))
    heads = int(f.arch("attention.head_count"))
    kv_heads = f.arch("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise GGUFError(f"{f.path}: per-layer key/value head counts are not supported")
    tokens = f.get("tokenizer.ggml.tokens", None)
    vocab = f.arch("vocab_size", len(tokens) if tokens else None)
    if vocab is None:
        raise GGUFError(f"{f.path}: no vocabulary size (neither '{f.architecture}.vocab_size' "
                        "nor 'tokenizer.ggml.tokens')")
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": hf_arch.removesuffix("ForCausalLM").lower(),
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(f.arch("feed_forward_length")),
        "num_hidden_layers": int(f.arch("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(f.arch("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(f.arch("attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(f.arch("context_length", 4096)),
        "rope_theta": float(f.arch("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "attention_bias": "blk.0.attn_q.bias" in f.tensors,
        "torch_dtype": "float32",
    }
    config |= _rope_scaling(f)
    window = f.arch("attention.sliding_window", None)
    if window:
        config["sliding_window"] = int(window)
        config["use_sliding_window"] = True
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = f.get(f"tokenizer.ggml.{name}", None)
        if value is not None:
            config[key] = int(value)
    return config


def _rope_scaling(f: GGUFFile) -> dict[str, Any]:
    kind = f.arch("rope.scaling.type", "none")
    if "rope_freqs.weight" in f.tensors:
        # llama.cpp stores Llama 3's frequency scaling as a table, without its parameters.
        raise GGUFError(f"{f.path}: rotary scaling given as a 'rope_freqs' table (Llama 3.1 "
                        "and later) is not supported")
    if kind in ("none", ""):
        return {}
    if kind == "linear":
        return {"rope_scaling": {"rope_type": "linear",
                                 "factor": float(f.arch("rope.scaling.factor"))}}
    raise GGUFError(f"{f.path}: rotary scaling '{kind}' is not supported (supported: linear)")
