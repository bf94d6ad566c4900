"""Which experts a budget keeps on the device: how many, which ones, and which units of a
model's checkpoint therefore go to host memory instead of the pool."""

from __future__ import annotations

from edgeserve.arch.spec import ModelSpec
from edgeserve.experts.cache import Expert


def expert_names(layer: int, e: int) -> tuple[str, str]:
    p = f"model.layers.{layer}.mlp.experts.{e}."
    return p + "gate_up_proj.weight", p + "down_proj.weight"


def sparse_layers(spec: ModelSpec) -> list[int]:
    return [n for n in range(spec.num_layers) if spec.sparse_layers[n]]


def capacity(spec: ModelSpec, budget: float) -> int:
    """Experts the budget holds on the device: at least one token's worth."""
    experts = len(sparse_layers(spec)) * spec.num_experts
    return max(spec.experts_per_token, int(budget * experts))


def kept_experts(spec: ModelSpec, budget: float) -> list[Expert]:
    """The experts on the device when a model is loaded, spread over the layers."""
    experts = [(layer, e) for layer in sparse_layers(spec) for e in range(spec.num_experts)]
    return sorted(experts, key=lambda k: (k[1], k[0]))[:capacity(spec, budget)]


def host_only_units(spec: ModelSpec, budget: float) -> frozenset[str]:
    """The expert units a load with this budget puts in host memory, not in the pool (none
    where the experts cannot be offloaded: ExpertOffload says why)."""
    if spec.family != "moe" or spec.expert_layout != "per_expert" or budget >= 1:
        return frozenset()
    kept = set(kept_experts(spec, budget))
    return frozenset(n for layer in sparse_layers(spec) for e in range(spec.num_experts)
                     if (layer, e) not in kept for n in expert_names(layer, e))
