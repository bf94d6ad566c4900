"""Dense decoder of the Llama family: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

The plan pieces, the attention and the MLP are shared with the MoE family (moe.py).

Legend: B = sequences, S = new tokens per sequence (padded), T = keys attended to,
D = hidden, H = query heads, KVH = key/value heads, hd = head dim, V = vocabulary.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from edgeserve.arch import rope
from edgeserve.arch.plan import EMBED, HEAD, WeightUnit, attention_plan, base_plan, mlp_plan
from edgeserve.arch.spec import ModelSpec
from edgeserve.batch import StepBatch
from edgeserve.kernels.cpu import matmul as cpu
from edgeserve.kernels.cpu.decode import FusedDecode
from edgeserve.quant import linear as quant
from edgeserve.quant.linear import QWeight

Weight = torch.Tensor | QWeight        # a linear's weight: float, or quantized in place



def weight_plan(spec: ModelSpec) -> dict[str, WeightUnit]:
    """The units a model is made of."""
    plan = base_plan(spec)
    for n in range(spec.num_layers):
        plan |= attention_plan(spec, n)
        plan |= mlp_plan(f"model.layers.{n}.mlp.", spec.hidden_size, spec.intermediate_size,
                         spec.mlp_bias)
    return plan


class Attention(NamedTuple):
    qkv: Weight
    o: Weight
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o_bias: torch.Tensor | None
    prefix: str = ""                # unit names: prefix + "qkv_proj.weight", ...

    @classmethod
    def of(cls, w: dict[str, Weight], layer: str) -> Attention:
        a = layer + "self_attn."
        return cls(w[a + "qkv_proj.weight"], w[a + "o_proj.weight"], floats(w, a + "qkv_proj.bias"),
                   floats(w, a + "q_norm.weight"), floats(w, a + "k_norm.weight"),
                   floats(w, a + "o_proj.bias"), a)


class Mlp(NamedTuple):
    gate_up: Weight
    down: Weight
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None
    prefix: str = ""

    @classmethod
    def of(cls, w: dict[str, Weight], prefix: str) -> Mlp:
        return cls(w[prefix + "gate_up_proj.weight"], w[prefix + "down_proj.weight"],
                   floats(w, prefix + "gate_up_proj.bias"), floats(w, prefix + "down_proj.bias"),
                   prefix)


def floats(w: dict[str, Weight], name: str) -> torch.Tensor | None:
    """A tensor that is never quantized (norms, biases), None when absent."""
    t = w.get(name)
    assert t is None or isinstance(t, torch.Tensor), f"{name} cannot be quantized"
    return t


class Layer(NamedTuple):
    norm_in: torch.Tensor
    norm_post: torch.Tensor
    attn: Attention
    mlp: Mlp | None            # None: the family computes its own feed-forward (MoE)
    prefix: str = ""           # "model.layers.N.": unit names are prefix + ...


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

    def __init__(self, spec: ModelSpec, weights: dict[str, Weight]) -> None:
        self.spec = spec
        self.embed = weights[EMBED]
        norm = floats(weights, "model.norm.weight")
        assert norm is not None
        self.norm, self.dtype = norm, norm.dtype          # the compute dtype
        self.lm_head = self.embed if spec.tie_embeddings else weights[HEAD]
        self.layers = [self._layer(weights, f"model.layers.{n}.") for n in range(spec.num_layers)]
        self.inv_freq = rope.inv_freq(spec.rope, spec.head_dim).to(self.embed.device)
        self.fused = FusedDecode(spec, self.layers, self.inv_freq, self.dtype, norm,
                                 self.lm_head)

    @staticmethod
    def _layer(w: dict[str, Weight], p: str) -> Layer:
        mlp = Mlp.of(w, p + "mlp.") if p + "mlp.gate_up_proj.weight" in w else None
        norm_in, norm_post = (floats(w, p + "input_layernorm.weight"),
                              floats(w, p + "post_attention_layernorm.weight"))
        assert norm_in is not None and norm_post is not None
        return Layer(norm_in, norm_post, Attention.of(w, p), mlp, p)

    @torch.inference_mode()
    def forward(self, batch: StepBatch, kv: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Logits (B, V) of each sequence's last new token, or (B, S, V) with all_logits.

        kv: the paged view (pages, L, P, 2, KVH, hd); the new keys and values are written
        into the pages of batch.slot_page / slot_offset.
        """
        x = self._layers(batch, kv)
        if not all_logits:      # each row's last new token
            x = x[:, 0] if batch.width == 1 else x[torch.arange(batch.size), batch.last]
            logits = self.fused.logits(batch, x)    # decode on the CPU: one C call
            if logits is not None:
                return logits
        x = norm(x, self.norm, self.spec.rms_norm_eps, batch, "model.norm.weight")
        head = EMBED if self.spec.tie_embeddings else HEAD
        return linear(x, self.lm_head, None, batch, head).float()

    @torch.inference_mode()
    def hidden(self, batch: StepBatch, kv: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states (B, S, D) of every new token (for embeddings)."""
        return norm(self._layers(batch, kv), self.norm, self.spec.rms_norm_eps, batch,
                    "model.norm.weight")

    def _layers(self, batch: StepBatch, kv: torch.Tensor) -> torch.Tensor:
        """The embedding and every layer: hidden states (B, S, D) before the final norm."""
        spec = self.spec
        x = embedding(batch.tokens, self.embed, self.dtype)              # (B, S, D)
        if batch.delta is not None:
            x = batch.delta.embed(EMBED, batch.tokens, x, spec.vocab_size)
        elif type(self)._feed_forward is DenseModel._feed_forward and \
                self.fused.run(batch, kv, x):       # decode on the CPU: one C call
            return x
        cos, sin = rope.cos_sin(self.inv_freq, batch.positions, x.dtype)
        seen: dict[int | None, Visibility] = {}
        for n, layer in enumerate(self.layers):
            h = self.fused.attend(n, batch, kv, x)  # MoE decode on the CPU: x in place
            if h is None:
                window, eps, p = spec.sliding_windows[n], spec.rms_norm_eps, layer.prefix
                if window not in seen:
                    seen[window] = visibility(batch, window)
                h = norm(x, layer.norm_in, eps, batch, p + "input_layernorm.weight")
                x = x + attention(spec, h, layer.attn, batch, kv[:, n], cos, sin, seen[window])
                h = norm(x, layer.norm_post, eps, batch, p + "post_attention_layernorm.weight")
            x = x + self._feed_forward(n, h, batch)
        return x

    def _feed_forward(self, n: int, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """Layer n's feed-forward over h (B, S, D); another family may override it."""
        w = self.layers[n].mlp
        assert w is not None
        return mlp(h, w, batch)


def embedding(tokens: torch.Tensor, w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """Rows of the embedding matrix (only the looked-up rows are dequantized)."""
    return w.rows(tokens, dtype) if isinstance(w, QWeight) else F.embedding(tokens, w)


def matmul(x: torch.Tensor, w: Weight, b: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b, over a float or a quantized weight."""
    if isinstance(w, QWeight):
        return quant.linear(x, w, b)
    y = cpu.few_rows_f32(x, w, b)       # decode on the CPU: few rows, the C kernel
    return F.linear(x, w, b) if y is None else y


def linear(x: torch.Tensor, w: Weight, b: torch.Tensor | None, batch: StepBatch | None,
           unit: str) -> torch.Tensor:
    """x @ w.T + b, plus the batch's task blocks for this unit, if any."""
    y = matmul(x, w, b)
    delta = batch.delta if batch is not None else None
    return y if delta is None else delta.linear(unit, x, y, w, b)


def norm(x: torch.Tensor, w: torch.Tensor, eps: float, batch: StepBatch | None,
         unit: str) -> torch.Tensor:
    """RMS norm of x, with the batch's task norm weights for this unit, if any."""
    y = rms_norm(x, w, eps)
    delta = batch.delta if batch is not None else None
    return y if delta is None else delta.norm(unit, x, y, eps)


def mlp(h: torch.Tensor, w: Mlp, batch: StepBatch | None = None) -> torch.Tensor:
    gate, up = linear(h, w.gate_up, w.gate_up_bias, batch,
                      w.prefix + "gate_up_proj.weight").chunk(2, dim=-1)
    return linear(F.silu(gate) * up, w.down, w.down_bias, batch, w.prefix + "down_proj.weight")


def attention(spec: ModelSpec, h: torch.Tensor, w: Attention, batch: StepBatch,
              kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              seen: Visibility) -> torch.Tensor:
    """Self-attention of one layer over h (B, S, D). kv is that layer's pages
    (pages, P, 2, KVH, hd): the new tokens' keys and values are stored there."""
    b, s, _ = h.shape
    qk, v = _project(spec, h, w, batch)
    q, k = rope.apply(qk, cos, sin).split((spec.num_heads, spec.num_kv_heads), 2)
    new = torch.stack((k, v), 2)                                    # (B, S, 2, KVH, hd)
    kv[batch.slot_page, batch.slot_offset] = new[batch.valid] if batch.padded else \
        new.flatten(0, 1)
    if batch.fresh:
        keys, values = k.transpose(1, 2), v.transpose(1, 2)         # (B, KVH, S, hd)
    else:
        keys, values = gather(kv, batch.page_table, seen.keys)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values,
                                         attn_mask=seen.mask, is_causal=seen.causal,
                                         enable_gqa=True)             # (B, H, S, hd)
    return linear(out.transpose(1, 2).reshape(b, s, spec.q_size), w.o, w.o_bias, batch,
                  w.prefix + "o_proj.weight")


def gather(kv: torch.Tensor, page_table: torch.Tensor,
           keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `keys` keys and values of each row's pages, (B, KVH, T, hd) each, from
    one layer's pages kv (pages, P, 2, KVH, hd)."""
    b, _, _, kv_heads, head_dim = page_table.shape[0], *kv.shape[1:]
    # A page is one contiguous row of this layer's values: index_select copies whole rows
    # (a quarter faster than over the 5-d view, much faster than advanced indexing).
    rows = torch.index_select(kv.view(kv.shape[0], -1), 0, page_table.flatten())
    tokens = rows.view(b, -1, 2, kv_heads, head_dim)[:, :keys]     # (B, T, 2, KVH, hd)
    return tokens[:, :, 0].transpose(1, 2), tokens[:, :, 1].transpose(1, 2)


def _project(spec: ModelSpec, h: torch.Tensor, w: Attention,
             batch: StepBatch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys (B, S, H + KVH, hd), values (B, S, KVH, hd): normed and clipped as
    the architecture says, not yet rotated."""
    b, s, _ = h.shape
    heads, kv_heads, eps = spec.num_heads, spec.num_kv_heads, spec.rms_norm_eps
    qkv = linear(h, w.qkv, w.qkv_bias, batch, w.prefix + "qkv_proj.weight")
    q_norm, k_norm = w.q_norm, w.k_norm
    if q_norm is not None and k_norm is not None and not spec.qk_norm_per_head:
        # OLMoE: over each whole projection, before the split into heads
        q, k, v = qkv.split((spec.q_size, spec.kv_size, spec.kv_size), -1)
        qkv = torch.cat((norm(q, q_norm, eps, batch, w.prefix + "q_norm.weight"),
                         norm(k, k_norm, eps, batch, w.prefix + "k_norm.weight"), v), -1)
    if spec.clip_qkv is not None:
        qkv = qkv.clamp(-spec.clip_qkv, spec.clip_qkv)
    qkv = qkv.view(b, s, heads + 2 * kv_heads, spec.head_dim)
    qk, v = qkv[:, :, :heads + kv_heads], qkv[:, :, heads + kv_heads:]
    if q_norm is not None and k_norm is not None and spec.qk_norm_per_head:   # Qwen3
        qk = torch.cat((norm(qk[:, :, :heads], q_norm, eps, batch, w.prefix + "q_norm.weight"),
                        norm(qk[:, :, heads:], k_norm, eps, batch, w.prefix + "k_norm.weight")),
                       2)
    return qk, v


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


def build(spec: ModelSpec, weights: dict[str, Weight]) -> DenseModel:
    return DenseModel(spec, weights)
