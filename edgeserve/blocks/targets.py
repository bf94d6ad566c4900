"""The weights a task pack may change: the linear layers, mapped onto the pool's units.

Checkpoint tensors are packed by their Hugging Face names; at run time the pool holds
some of them fused (q/k/v in one unit, gate/up in another), so each name maps to a unit
and the first row it occupies there.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from edgeserve.arch import weight_plan
from edgeserve.arch.spec import ModelSpec

LINEAR_UNIT = re.compile(
    r"^(lm_head|model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj))\.weight$")


class Target(NamedTuple):
    unit: str                   # pool unit name (a fused unit for q/k/v and gate/up)
    row: int                    # first row of the tensor inside the unit
    shape: tuple[int, int]      # the tensor's own shape


def linear_targets(spec: ModelSpec) -> dict[str, Target]:
    """Checkpoint tensor name -> where it lives, for every packable linear weight."""
    out = {}
    for unit_name, unit in weight_plan(spec).items():
        if not LINEAR_UNIT.match(unit_name) or len(unit.shape) != 2:
            continue
        for part, first, rows in unit.slices():
            out[part] = Target(unit_name, first, (rows, unit.shape[1]))
    return out
