"""Dense decoder of the Llama family: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Legend: B = sequences, S = new tokens per sequence (padded), T = keys attended to,
D = hidden, H = query heads, KVH = key/value heads, hd = head dim, V = vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from edgeserve.arch import rope
from edgeserve.arch.spec import ModelSpec
from edgeserve.batch import StepBatch
from edgeserve.pool import UnitKind


class WeightUnit(NamedTuple):
    """One unit of the pool: checkpoint tensors stacked along dim 0 (a tensor group)."""

    shape: tuple[int, ...]
    parts: tuple[str, ...]          # Hugging Face tensor names, in row order
    rows: tuple[int, ...]           # rows of each part
    kind: UnitKind = UnitKind.WEIGHT

    def slices(self) -> list[tuple[str, int, int]]:
        """(part, first row, rows) for each part."""
        starts = [sum(self.rows[:i]) for i in range(len(self.rows))]
        return list(zip(self.parts, starts, self.rows, strict=True))


def weight_plan(spec: ModelSpec) -> dict[str, WeightUnit]:
    """The units a model is made of. q/k/v and gate/up are fused: one matmul each."""
    d, i, q, kv = spec.hidden_size, spec.intermediate_size, spec.q_size, spec.kv_size

    def one(name: str, *shape: int) -> WeightUnit:
        return WeightUnit(shape, (name,), (shape[0],))

    def fused(prefix: str, suffix: str, parts: dict[str, int], *inner: int) -> WeightUnit:
        names = tuple(f"{prefix}{part}{suffix}" for part in parts)
        rows = tuple(parts.values())
        return WeightUnit((sum(rows), *inner), names, rows)

    plan = {"model.embed_tokens.weight": one("model.embed_tokens.weight", spec.vocab_size, d),
            "model.norm.weight": one("model.norm.weight", d)}
    if not spec.tie_embeddings:
        plan["lm_head.weight"] = one("lm_head.weight", spec.vocab_size, d)
    for n in range(spec.num_layers):
        p = f"model.layers.{n}."
        a, m = p + "self_attn.", p + "mlp."
        plan |= {
            p + "input_layernorm.weight": one(p + "input_layernorm.weight", d),
            p + "post_attention_layernorm.weight": one(p + "post_attention_layernorm.weight", d),
            a + "qkv_proj.weight": fused(a, "_proj.weight", {"q": q, "k": kv, "v": kv}, d),
            a + "o_proj.weight": one(a + "o_proj.weight", d, q),
            m + "gate_up_proj.weight": fused(m, "_proj.weight", {"gate": i, "up": i}, d),
            m + "down_proj.weight": one(m + "down_proj.weight", d, i)}
        if spec.qkv_bias:
            plan[a + "qkv_proj.bias"] = fused(a, "_proj.bias", {"q": q, "k": kv, "v": kv})
        if spec.qk_norm:
            plan |= {a + "q_norm.weight": one(a + "q_norm.weight", spec.head_dim),
                     a + "k_norm.weight": one(a + "k_norm.weight", spec.head_dim)}
        if spec.mlp_bias:
            plan |= {m + "gate_up_proj.bias": fused(m, "_proj.bias", {"gate": i, "up": i}),
                     m + "down_proj.bias": one(m + "down_proj.bias", d)}
    return plan


class Layer(NamedTuple):
    norm_in: torch.Tensor
    norm_post: torch.Tensor
    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    gate_up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None


class Visibility(NamedTuple):
    """Which keys each query sees: an explicit mask, or plain causal, or everything."""

    mask: torch.Tensor | None      # (B, 1, S, T) bool
    causal: bool
    keys: int                      # T


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:    # one fused op; the same result in float32
        return F.rms_norm(x, weight.shape, weight, eps)
    # As Hugging Face does it: normalise in float32, scale in the input dtype.
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class DenseModel:
    """Forward passes over weight views; holds no memory of its own."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor]) -> None:
        self.spec = spec
        self.embed = weights["model.embed_tokens.weight"]
        self.norm = weights["model.norm.weight"]
        self.lm_head = self.embed if spec.tie_embeddings else weights["lm_head.weight"]
        self.layers = [self._layer(weights, f"model.layers.{n}.") for n in range(spec.num_layers)]
        self.inv_freq = rope.inv_freq(spec.rope, spec.head_dim).to(self.embed.device)

    @staticmethod
    def _layer(w: dict[str, torch.Tensor], p: str) -> Layer:
        a, m = p + "self_attn.", p + "mlp."
        return Layer(
            w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"],
            w[a + "qkv_proj.weight"], w[a + "o_proj.weight"], w[m + "gate_up_proj.weight"],
            w[m + "down_proj.weight"], w.get(a + "qkv_proj.bias"), w.get(a + "q_norm.weight"),
            w.get(a + "k_norm.weight"), w.get(m + "gate_up_proj.bias"),
            w.get(m + "down_proj.bias"))

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Logits (B, V) of each sequence's last new token, or (B, S, V) with all_logits.

        kv: the paged view (pages, L, P, 2, KVH, hd); the new keys and values are written
        into the pages of batch.slot_page / slot_offset.
        """
        spec = self.spec
        x = F.embedding(batch.tokens, self.embed)                       # (B, S, D)
        cos, sin = rope.cos_sin(self.inv_freq, batch.positions, x.dtype)
        seen: dict[int | None, Visibility] = {}
        for n, layer in enumerate(self.layers):
            window = spec.sliding_windows[n]
            if window not in seen:
                seen[window] = visibility(batch, window)
            h = rms_norm(x, layer.norm_in, spec.rms_norm_eps)
            x = x + self._attention(h, layer, batch, kv[:, n], cos, sin, seen[window])
            h = rms_norm(x, layer.norm_post, spec.rms_norm_eps)
            x = x + self._mlp(h, layer)
        x = rms_norm(x if all_logits else x[torch.arange(batch.size), batch.last],
                     self.norm, spec.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    def _attention(self, h: torch.Tensor, w: Layer, batch: StepBatch, kv: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor, seen: Visibility) -> torch.Tensor:
        spec = self.spec
        b, s, _ = h.shape
        heads, kv_heads = spec.num_heads, spec.num_kv_heads
        qkv = F.linear(h, w.qkv, w.qkv_bias).view(b, s, heads + 2 * kv_heads, spec.head_dim)
        qk, v = qkv[:, :, :heads + kv_heads], qkv[:, :, heads + kv_heads:]
        if w.q_norm is not None and w.k_norm is not None:
            qk = torch.cat((rms_norm(qk[:, :, :heads], w.q_norm, spec.rms_norm_eps),
                            rms_norm(qk[:, :, heads:], w.k_norm, spec.rms_norm_eps)), 2)
        q, k = rope.apply(qk, cos, sin).split((heads, kv_heads), 2)   # q and k rotated at once
        # kv here is one layer: (pages, P, 2, KVH, hd). Store the new tokens' keys/values.
        new = torch.stack((k, v), 2)                                    # (B, S, 2, KVH, hd)
        kv[batch.slot_page, batch.slot_offset] = new[batch.valid] if batch.padded else \
            new.flatten(0, 1)
        if batch.fresh:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)         # (B, KVH, S, hd)
        else:
            t = seen.keys
            # index_select copies whole pages, much faster than advanced indexing here.
            pages = torch.index_select(kv, 0, batch.page_table.flatten())
            tokens = pages.view(b, -1, 2, spec.num_kv_heads, spec.head_dim)[:, :t]
            keys, values = tokens[:, :, 0].transpose(1, 2), tokens[:, :, 1].transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values,
                                             attn_mask=seen.mask, is_causal=seen.causal,
                                             enable_gqa=True)         # (B, H, S, hd)
        return F.linear(out.transpose(1, 2).reshape(b, s, spec.q_size), w.o)

    def _mlp(self, h: torch.Tensor, w: Layer) -> torch.Tensor:
        gate, up = F.linear(h, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w.down, w.down_bias)


def visibility(batch: StepBatch, window: int | None) -> Visibility:
    """The cheapest correct way to say which keys each query of the batch sees."""
    in_window = window is None or batch.max_kv <= window
    if batch.fresh and not batch.padded and in_window:
        return Visibility(None, True, batch.width)         # plain causal prefill
    if not batch.fresh and batch.width == 1 and batch.uniform and in_window:
        return Visibility(None, False, batch.max_kv)       # decode: every cached key
    q_pos = batch.positions[:, :, None]                            # (B, S, 1)
    if batch.fresh:
        k_pos = batch.positions[:, None, :]                        # (B, 1, S)
        visible = batch.valid[:, None, :] & (k_pos <= q_pos)
    else:
        k_pos = torch.arange(batch.max_kv, device=q_pos.device)[None, None, :]
        visible = (k_pos < batch.kv_lens[:, None, None]) & (k_pos <= q_pos)
    if window is not None:
        visible = visible & (q_pos - k_pos < window)
    return Visibility(visible[:, None], False, int(visible.shape[-1]))


def build(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> DenseModel:
    return DenseModel(spec, weights)
