"""The weights a task pack may change, mapped onto the pool's units.

Blocks: the linear layers and the token embeddings (2-D). Vectors: every 1-D tensor (norm
weights, biases), kept whole. Checkpoint tensors are packed by their Hugging Face names;
at run time the pool holds some of them fused (q/k/v in one unit, gate/up in another), so
each name maps to a unit and the first row it occupies there.
"""

from __future__ import annotations

import re
from functools import cache
from typing import NamedTuple

from edgeserve.arch import weight_plan
from edgeserve.arch.spec import ModelSpec

LINEAR_UNIT = re.compile(
    r"^(lm_head|model\.embed_tokens|"
    r"model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj))\.weight$")
# 1-D units the dense family applies a task's vectors to: norms and the linears' biases.
VECTOR_UNIT = re.compile(
    r"^(model\.norm|model\.layers\.\d+\.(input_layernorm|post_attention_layernorm|"
    r"self_attn\.(q_norm|k_norm|qkv_proj\.bias|o_proj\.bias)|mlp\.(gate_up|down)_proj\.bias)"
    r")(\.weight)?$")


class Target(NamedTuple):
    unit: str                   # pool unit name (a fused unit for q/k/v and gate/up)
    row: int                    # first row of the tensor inside the unit
    shape: tuple[int, int]      # the tensor's own shape


@cache
def linear_targets(spec: ModelSpec) -> dict[str, Target]:
    """Checkpoint tensor name -> where it lives, for every weight packed as blocks (computed
    once per spec: callers only read it)."""
    out = {}
    for unit_name, unit in weight_plan(spec).items():
        if not LINEAR_UNIT.match(unit_name) or len(unit.shape) != 2:
            continue
        for part, first, rows in unit.slices():
            out[part] = Target(unit_name, first, (rows, unit.shape[1]))
    return out


@cache
def vector_targets(spec: ModelSpec) -> dict[str, Target]:
    """Checkpoint tensor name -> where it lives, for every 1-D tensor packed whole
    (shape (n, 1)); computed once per spec: callers only read it."""
    out = {}
    for unit_name, unit in weight_plan(spec).items():
        if not VECTOR_UNIT.match(unit_name) or len(unit.shape) != 1:
            continue
        for part, first, rows in unit.slices():
            out[part] = Target(unit_name, first, (rows, 1))
    return out
