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
    "llama-bias": dict(attention_bias=True),
    "mistral": dict(sliding_window=12),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=24, tie_word_embeddings=True),
}
# Mixture-of-experts models: 8 experts, 2 active per token. Kept out of ARCHS, which the
# dense tests parametrize over.
MOE: dict[str, Any] = dict(num_experts_per_tok=2, intermediate_size=48, eos_token_id=2)
MOE_ARCHS: dict[str, dict[str, Any]] = {
    "mixtral": dict(num_local_experts=8, sliding_window=12),
    "qwen2-moe": dict(num_hidden_layers=3, num_experts=8, moe_intermediate_size=40,
                      shared_expert_intermediate_size=80, mlp_only_layers=[1]),
    "olmoe": dict(num_experts=8, clip_qkv=0.1, attention_bias=True),
    "qwen3-moe": dict(num_hidden_layers=4, num_experts=8, moe_intermediate_size=40,
                      decoder_sparse_step=2, head_dim=24, norm_topk_prob=True),
}


def _config(arch: str, **overrides: Any):  # type: ignore[no-untyped-def]
    import transformers as tf

    kwargs = COMMON | (MOE | MOE_ARCHS[arch] if arch in MOE_ARCHS else ARCHS[arch]) | overrides
    if arch in MOE_ARCHS:
        return _moe_config(arch, kwargs)
    if arch.startswith("llama"):
        return tf.LlamaConfig(**kwargs), tf.LlamaForCausalLM
    if arch == "mistral":
        return tf.MistralConfig(**kwargs), tf.MistralForCausalLM
    if arch == "qwen2":
        return tf.Qwen2Config(**kwargs), tf.Qwen2ForCausalLM
    return tf.Qwen3Config(**kwargs), tf.Qwen3ForCausalLM


def _moe_config(arch: str, kwargs: dict[str, Any]):  # type: ignore[no-untyped-def]
    import transformers as tf

    name = {"mixtral": "Mixtral", "qwen2-moe": "Qwen2Moe", "olmoe": "Olmoe",
            "qwen3-moe": "Qwen3Moe"}[arch]
    return getattr(tf, f"{name}Config")(**kwargs), getattr(tf, f"{name}ForCausalLM")


def _spread_experts(model: torch.nn.Module) -> None:
    """Tokens distinct enough to take different experts, routers decisive enough that top-k
    is far from ties, and experts large enough that a wrong one shows in the logits."""
    for name, p in model.named_parameters():
        if name == "model.embed_tokens.weight":
            p.normal_(0, 0.5)
        elif name.endswith("mlp.gate.weight"):
            p.normal_(0, 1.0)
        elif ".experts." in name or "shared_expert" in name:
            p.normal_(0, 0.25)


def make_model(arch: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
               stacked_experts: bool = False, **overrides: Any) -> Path:
    """Save a random model of `arch` with transformers' save_pretrained into `path`.
    MoE experts are saved one tensor per expert (the classic layout save_pretrained writes)
    or, with stacked_experts, as (E, ...) tensors per layer (save_original_format=False)."""
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
        if arch in MOE_ARCHS:
            _spread_experts(model)
    model.save_pretrained(path, safe_serialization=True,
                          save_original_format=not stacked_experts)
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


def hf_greedy(path: Path, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation of prompt, n tokens, EOS ignored."""
    model = reference(path)
    model.generation_config.eos_token_id = None       # we compare with ignore_eos
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()
