"""GGUF files for tests, written with the gguf package the way llama.cpp's converter
writes them: its tensor names, its q/k row interleave for Llama-family models, its metadata
keys, and a small byte-level BPE vocabulary.

This folder has no __init__.py, so that `import gguf` still finds the package."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file

_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
         "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
         "MixtralForCausalLM": "llama", "Qwen2MoeForCausalLM": "qwen2moe",
         "Qwen3MoeForCausalLM": "qwen3moe", "OlmoeForCausalLM": "olmoe"}
_MOE = {"mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
        "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
        "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj":
        "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp"}
_EXPERT = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
           "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    _, _, n, rest = name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{n}.{(_LAYER | _MOE)[module]}.{kind}"


def _stack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-expert tensors -> llama.cpp's (E, rows, cols) tensor per layer and projection."""
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, dict[int, torch.Tensor]] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if "experts" in parts and parts[parts.index("experts") + 1].isdigit():
            i = parts.index("experts")
            key = f"blk.{parts[2]}.{_EXPERT[parts[i + 2]]}.weight"
            stacks.setdefault(key, {})[int(parts[i + 1])] = t
        else:
            out[gguf_name(name)] = t
    for key, experts in stacks.items():
        out[key] = torch.stack([experts[e] for e in range(len(experts))])
    return out


def interleave(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: per head, (2, hd/2) -> (hd/2, 2)."""
    n, rest = rows.shape[0], rows.shape[1:]
    return rows.reshape(heads, 2, n // heads // 2, *rest).transpose(1, 2).reshape(n, *rest)


def tiny_vocab(size: int) -> tuple[list[str], list[str], list[int]]:
    """A byte-level vocabulary of `size` tokens: 3 control tokens, the 256 bytes, merges."""
    spell = _byte_alphabet()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += [spell[b] for b in range(256)]
    merges: list[str] = []
    pairs = ["Ġ t", "h e", "Ġ a", "i n", "e r", "Ġt he", "o n", "Ġ s", "r e", "a t"]
    for pair in pairs:
        if len(tokens) >= size:
            break
        merges.append(pair)
        tokens.append(pair.replace(" ", ""))
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>")
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, merges, types


def _byte_alphabet() -> dict[int, str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def write_gguf(hf_dir: Path, out: Path, qtype: str = "F32",
               types: dict[str, str] | None = None) -> Path:
    """Write the model of hf_dir as llama.cpp would: linear weights in qtype (or per-tensor
    types[gguf name]), norms F32."""
    config = json.loads((hf_dir / "config.json").read_text())
    arch = _ARCH[config["architectures"][0]]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(config.get("head_dim") or hidden // heads)
    w.add_value_length(config.get("head_dim") or hidden // heads)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {}
    w.add_rope_freq_base(config.get("rope_theta") or rope.get("rope_theta", 10000.0))
    if config.get("sliding_window") and arch == "llama":
        w.add_sliding_window(config["sliding_window"])
    tokens, merges, ttypes = tiny_vocab(config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(ttypes)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TEMPLATE)
    _add_experts_metadata(w, config)
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if scaling.get("rope_type") == "llama3":
        head_dim = config.get("head_dim") or hidden // heads
        w.add_tensor("rope_freqs.weight", llama3_divisors(scaling, head_dim,
                                                           config.get("rope_theta", 10000.0)))
    for g, t in _stack_experts(load_file(str(hf_dir / "model.safetensors"))).items():
        t = t.float()
        if arch == "llama" and ".attn_q." in g:
            t = interleave(t, heads)
        elif arch == "llama" and ".attn_k." in g:
            t = interleave(t, kv)
        if g.endswith("ffn_gate_inp_shexp.weight"):
            t = t.reshape(-1)                 # llama.cpp stores the shared gate as a vector
        kind = (types or {}).get(g) or (qtype if t.dim() >= 2 and "gate_inp" not in g else "F32")
        _add(w, g, t, kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def llama3_divisors(p: dict, head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's rope_freqs table: per frequency, what divides it under Llama 3 scaling."""
    theta = p.get("rope_theta", theta)
    orig, low, high = (p["original_max_position_embeddings"], p["low_freq_factor"],
                       p["high_freq_factor"])
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * np.pi * theta ** (i / head_dim)
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(p["factor"])
        else:
            s = (orig / wavelen - low) / (high - low)
            out.append(1 / ((1 - s) / p["factor"] + s))
    return np.array(out, np.float32)


def _add_experts_metadata(w: gguf.GGUFWriter, config: dict) -> None:
    experts = config.get("num_local_experts") or config.get("num_experts")
    if not experts:
        return
    w.add_expert_count(experts)
    w.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("moe_intermediate_size"):
        w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):
        w.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    if config.get("norm_topk_prob") is not None:
        w.add_expert_weights_norm(bool(config["norm_topk_prob"]))
    if config.get("clip_qkv"):
        w.add_clamp_kqv(config["clip_qkv"])


def _add(w: gguf.GGUFWriter, name: str, t: torch.Tensor, kind: str) -> None:
    qtype = gguf.GGMLQuantizationType[kind]
    data = t.numpy().astype(np.float32)
    if kind == "F32":
        w.add_tensor(name, data)
    elif kind == "F16":
        w.add_tensor(name, data.astype(np.float16))
    elif kind.endswith("_K"):     # no quantizer in the gguf package: any bytes
        w.add_tensor(name, random_blocks(kind, data.shape), raw_dtype=qtype)
    else:
        w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def random_blocks(kind: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Valid blocks of a K-quant type with random codes and small finite f16 scales."""
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    # where the f16 scales lie: d (and dmin) first, or last (Q6_K, Q2_K)
    halves = {"Q4_K": (0, 4), "Q5_K": (0, 4)}.get(kind, (size - 2, size))
    n = halves[1] - halves[0]
    scales = rng.uniform(0.0005, 0.002, size=(rows, cols // block, n // 2)).astype(np.float16)
    raw[..., halves[0]:halves[1]] = scales.view(np.uint8).reshape(rows, cols // block, n)
    return raw.reshape(*shape[:-1], cols // block * size)

