"""Weight plans: which pool units a model is made of (tensor groups fused where one matmul
serves them), shared by the dense and MoE families."""

from __future__ import annotations

from typing import NamedTuple

from edgeserve.arch.spec import ModelSpec
from edgeserve.pool import UnitKind

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"     # unit names


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


def one(name: str, *shape: int, kind: UnitKind = UnitKind.WEIGHT) -> WeightUnit:
    """A unit holding one checkpoint tensor."""
    return WeightUnit(shape, (name,), (shape[0],), kind)


def fused(parts: dict[str, int], *inner: int, kind: UnitKind = UnitKind.WEIGHT) -> WeightUnit:
    """A unit of checkpoint tensors (name -> rows) stacked along dim 0: one matmul for all."""
    return WeightUnit((sum(parts.values()), *inner), tuple(parts), tuple(parts.values()), kind)


def base_plan(spec: ModelSpec) -> dict[str, WeightUnit]:
    """Embeddings, the final norm and the head."""
    d = spec.hidden_size
    plan = {EMBED: one(EMBED, spec.vocab_size, d),
            "model.norm.weight": one("model.norm.weight", d)}
    if not spec.tie_embeddings:
        plan[HEAD] = one(HEAD, spec.vocab_size, d)
    return plan


def attention_plan(spec: ModelSpec, n: int) -> dict[str, WeightUnit]:
    """Layer n's two norms and its attention; q/k/v fused into one matmul."""
    d, q, kv = spec.hidden_size, spec.q_size, spec.kv_size
    p = f"model.layers.{n}."
    a = p + "self_attn."
    qkv = {a + "q_proj.": q, a + "k_proj.": kv, a + "v_proj.": kv}
    plan = {p + "input_layernorm.weight": one(p + "input_layernorm.weight", d),
            p + "post_attention_layernorm.weight": one(p + "post_attention_layernorm.weight", d),
            a + "qkv_proj.weight": fused({k + "weight": r for k, r in qkv.items()}, d),
            a + "o_proj.weight": one(a + "o_proj.weight", d, q)}
    if spec.qkv_bias:
        plan[a + "qkv_proj.bias"] = fused({k + "bias": r for k, r in qkv.items()})
    if spec.o_bias:
        plan[a + "o_proj.bias"] = one(a + "o_proj.bias", d)
    if spec.qk_norm:
        q_dim, k_dim = (spec.head_dim, spec.head_dim) if spec.qk_norm_per_head else (q, kv)
        plan |= {a + "q_norm.weight": one(a + "q_norm.weight", q_dim),
                 a + "k_norm.weight": one(a + "k_norm.weight", k_dim)}
    return plan


def mlp_plan(prefix: str, hidden: int, inner: int, bias: bool) -> dict[str, WeightUnit]:
    """A SiLU-gated MLP at prefix (e.g. 'model.layers.0.mlp.'); gate and up fused."""
    m = prefix
    plan = {m + "gate_up_proj.weight": fused({m + "gate_proj.weight": inner,
                                              m + "up_proj.weight": inner}, hidden),
            m + "down_proj.weight": one(m + "down_proj.weight", hidden, inner)}
    if bias:
        plan |= {m + "gate_up_proj.bias": fused({m + "gate_proj.bias": inner,
                                                 m + "up_proj.bias": inner}),
                 m + "down_proj.bias": one(m + "down_proj.bias", hidden)}
    return plan

