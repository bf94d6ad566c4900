"""Tiny random checkpoints saved by transformers itself, one per supported architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

COMMON: dict[str, Any] = dict(vocab_size=320, hidden_size=64, intermediate_size=112,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=512, rms_norm_eps=1e-6)
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {},
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 32},
                        rope_theta=500000.0),
    "mistral": dict(sliding_window=12),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=24, tie_word_embeddings=True),
}


def _config(arch: str, **overrides: Any):  # type: ignore[no-untyped-def]
    import transformers as tf

    kwargs = COMMON | ARCHS[arch] | overrides
    if arch.startswith("llama"):
        return tf.LlamaConfig(**kwargs), tf.LlamaForCausalLM
    if arch == "mistral":
        return tf.MistralConfig(**kwargs), tf.MistralForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(**kwargs), tf.Qwen2ForCausalLM
    return tf.Qwen3Config(**kwargs), tf.Qwen3ForCausalLM


def make_model(arch: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
               **overrides: Any) -> Path:
    """Save a random model of `arch` with transformers' save_pretrained into `path`."""
    config, cls = _config(arch, **overrides)
    torch.manual_seed(seed)
    model = cls(config).to(dtype)
    with torch.no_grad():   # larger than the init std, so that logits are not all alike
        for p in model.parameters():
            if p.dim() == 1 and "norm" not in str(p.shape):
                p.normal_(0, 0.1)
        if getattr(config, "attention_bias", False) or arch == "qwen2":
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_resident(model_id: str, path: Path, pool, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    """A ResidentModel loaded straight into pool (no server), hashes cached beside it."""
    from edgeserve.checkpoint import HashCache
    from edgeserve.loader import LoadContext
    from edgeserve.model import ResidentModel

    return ResidentModel.load(model_id, path, LoadContext(pool, dtype, HashCache(path.parent)))


def reference(path: Path, dtype: torch.dtype = torch.float32):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model
