"""A GGUF file's metadata as the Hugging Face config.json and generation_config.json."""

from __future__ import annotations

from typing import Any

from edgeserve.gguf import blocks
from edgeserve.gguf.names import ARCHITECTURES, MIXTRAL
from edgeserve.gguf.reader import GGUFError, GGUFFile
from edgeserve.gguf.rope import llama3_scaling


def architecture(f: GGUFFile) -> tuple[str, bool]:
    """(Hugging Face architecture, q/k rows permuted); GGUFError naming an unsupported one."""
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{f.path}: architecture '{arch}' is not supported "
                        f"(supported: {', '.join(ARCHITECTURES)})")
    experts = int(f.arch("expert_count", 0) or 0)
    hf_arch, permuted = ARCHITECTURES[arch]
    if experts and arch == "llama":
        return MIXTRAL, permuted
    if bool(experts) != hf_arch.endswith(("MoeForCausalLM", "OlmoeForCausalLM")):
        raise GGUFError(f"{f.path}: architecture '{arch}' with expert_count {experts} is not "
                        "supported")
    return hf_arch, permuted


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
    config |= _rope_scaling(f, config["head_dim"]) | _experts(f, hf_arch)
    window = f.arch("attention.sliding_window", None)
    if window:
        config["sliding_window"] = int(window)
        config["use_sliding_window"] = True
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = f.get(f"tokenizer.ggml.{name}", None)
        if value is not None:
            config[key] = int(value)
    return config


def _experts(f: GGUFFile, hf_arch: str) -> dict[str, Any]:
    """The mixture-of-experts fields; {} for a dense model."""
    experts = int(f.arch("expert_count", 0) or 0)
    if not experts:
        return {}
    out: dict[str, Any] = {"num_experts_per_tok": int(f.arch("expert_used_count")),
                           "num_local_experts" if hf_arch == MIXTRAL else "num_experts": experts}
    size = f.arch("expert_feed_forward_length", None)
    if hf_arch in (MIXTRAL, "OlmoeForCausalLM"):
        if size is not None:
            out["intermediate_size"] = int(size)
        return out | {"clip_qkv": f.arch("attention.clamp_kqv", None)}
    layers = int(f.arch("block_count"))
    out |= {"moe_intermediate_size": int(size if size is not None
                                         else f.arch("feed_forward_length")),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [n for n in range(layers)
                                if f"blk.{n}.ffn_gate_inp.weight" not in f.tensors],
            "norm_topk_prob": bool(f.arch("expert_weights_norm",
                                          hf_arch == "Qwen3MoeForCausalLM"))}
    shared = f.arch("expert_shared_feed_forward_length", None)
    if shared is not None:
        out["shared_expert_intermediate_size"] = int(shared)
    return out


def _rope_scaling(f: GGUFFile, head_dim: int) -> dict[str, Any]:
    kind = f.arch("rope.scaling.type", "none")
    if "rope_freqs.weight" in f.tensors:      # Llama 3.1 and later: a table of divisors
        table = blocks.dequantize(f.tensors["rope_freqs.weight"])
        return {"rope_scaling": llama3_scaling(f, table, head_dim)}
    if kind in ("none", ""):
        return {}
    if kind == "linear":
        return {"rope_scaling": {"rope_type": "linear",
                                 "factor": float(f.arch("rope.scaling.factor"))}}
    raise GGUFError(f"{f.path}: rotary scaling '{kind}' is not supported (supported: linear)")
