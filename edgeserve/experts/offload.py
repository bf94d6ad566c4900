"""A MoE model with only a budget of its experts on the device.

Every expert's bytes are kept in host memory (those beyond the budget read there straight
from disk at load); the ExpertCache decides which experts are pool units (kind `expert`) at
any time. Before a sparse layer computes, its routing goes through the cache: evictions
release units, misses allocate units and start copying the expert in (beside the
computation on CUDA, see copies.py), and low-weight misses may be served by a similar
resident expert (substitution). Runs on the engine's step thread, like every forward.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any

import torch

from edgeserve.arch import weight_plan
from edgeserve.arch.moe import ExpertWeights, MoeModel, route
from edgeserve.config import ExpertConfig
from edgeserve.experts.budget import capacity, expert_names, kept_experts, sparse_layers
from edgeserve.experts.cache import Expert, ExpertCache
from edgeserve.experts.copies import CopyQueue
from edgeserve.experts.forms import ExpertForm
from edgeserve.experts.similarity import cached_similarity
from edgeserve.loader import HostUnits
from edgeserve.model import ResidentModel
from edgeserve.pool import PoolFull, Unit, UnitKind
from edgeserve.tiers import HostSlab


class ExpertOffload:
    def __init__(self, model: ResidentModel, budget: float, policy: str,
                 threshold: float = 0.1, prefetch: bool = True,
                 host: HostUnits | None = None) -> None:
        """host: expert units a load put in host memory rather than in the pool (see
        host_only_units)."""
        spec = model.spec
        _check(model, budget, policy)
        self.model, self.pool = model, model.pool
        layers = sparse_layers(spec)
        # A config may make every layer dense (mlp_only_layers): then nothing is offloaded.
        self.first_layer, self.layers = (layers[0] if layers else -1), layers
        self.prefetching = prefetch
        self.copies = CopyQueue(torch.device(self.pool.device))
        self.host: dict[Expert, tuple[torch.Tensor, torch.Tensor]] = {}   # in ExpertForm
        self.forms = expert_forms(model)
        self.slabs = [host.slab] if host is not None else []
        keys = self._host_copies(host.tensors if host is not None else {})
        sizes = next(iter(self.host.values()), ())
        expert_bytes = sum(t.numel() * t.element_size() for t in sizes)
        keep = [k for k in kept_experts(spec, budget)
                if all(n in model.units for n in expert_names(*k))]
        # Similarity is costly for large experts and only substitution uses it.
        similarity = self._similarity(layers, keys) if policy.endswith("substitution") \
            else None
        self.cache = ExpertCache(spec.num_layers, spec.num_experts, capacity(spec, budget),
                                 policy, expert_bytes, similarity, threshold)
        self.units: dict[Expert, tuple[Unit, Unit]] = {}
        for key in self.host:
            g, d = (model.units.pop(n, None) for n in expert_names(*key))
            if key in keep and g is not None and d is not None:
                self.units[key] = (g, d)
            else:
                for unit in (g, d):
                    if unit is not None:
                        self._drop(unit)
        self.cache.warm(keep)
        self.tokens = 0
        model.invalidate()            # rebuilt without the released experts, then attached

    def _host_copies(self, given: dict[str, tuple[str, torch.Tensor]]) -> dict[str, str]:
        """Every expert's values in host memory (self.host): copied from its pool units, or
        as the load gave them. Returns each expert unit's content key."""
        model, forms = self.model, self.forms
        names = [n for layer in self.layers for e in range(model.spec.num_experts)
                 for n in expert_names(layer, e)]
        slab = HostSlab([forms[n].nbytes for n in names if n in model.units])
        self.slabs.append(slab)
        keys: dict[str, str] = {}
        for layer in self.layers:
            for e in range(model.spec.num_experts):
                pair = []
                for name in expert_names(layer, e):
                    if name in model.units:
                        keys[name] = model.units[name].key or ""
                        pair.append(slab.take(*forms[name].held))
                        pair[-1].copy_(forms[name].view(self.pool, model.units[name]))
                    elif name in given:
                        keys[name], data = given[name]
                        pair.append(data)
                    else:
                        raise ValueError(f"{model.id}: expert unit '{name}' is neither "
                                         "loaded nor given")
                self.host[(layer, e)] = (pair[0], pair[1])
        return keys

    def _similarity(self, layers: list[int], unit_keys: dict[str, str]) -> torch.Tensor:
        """(L, E, E), computed once per model and cached in the store by content."""
        spec, model = self.model.spec, self.model
        if not layers:
            return torch.full((spec.num_layers, spec.num_experts, spec.num_experts),
                              float("-inf"))
        keys = sorted(unit_keys.values())
        digest = hashlib.blake2b("|".join(keys).encode(), digest_size=12).hexdigest()
        cached = cached_similarity(model.path.parent, digest)
        if cached is not None and cached.shape[0] == spec.num_layers:
            return cached
        # One layer's experts in float at a time: quantized ones are dequantized for this.
        per_layer = ([self._floats(n, e) for e in range(spec.num_experts)] if n in layers
                     else None for n in range(spec.num_layers))   # None: a dense layer
        sim = cached_similarity(model.path.parent, digest, per_layer)
        assert sim is not None
        return sim

    def _floats(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        names, data = expert_names(layer, e), self.host[(layer, e)]
        return self.forms[names[0]].floats(data[0]), self.forms[names[1]].floats(data[1])

    # ---- on the step thread --------------------------------------------------------------
    def attach(self, runner: MoeModel) -> None:
        """Make a (re)built runner take its experts from here."""
        compute = runner.run_experts
        runner.expert_weights = self.weights
        runner.expert_order = self.order  # type: ignore[method-assign]

        def run(layer: int, x: torch.Tensor, ids: torch.Tensor,
                gates: torch.Tensor) -> torch.Tensor:
            out = compute(layer, x, self.route(layer, ids, gates), gates)
            self.prefetch(runner, layer, x)
            return out

        runner.run_experts = run  # type: ignore[method-assign]

    def end_forward(self) -> None:
        """After every forward, finished or failed: a layer's overflow leaves (back within
        the budget), and nothing queued after may overtake a copy still in flight (an
        unused guess, or a copy a failed forward never waited for)."""
        for key in [k for k in self.cache.resident if k not in self.units]:
            self.cache.forget(key)          # admitted, but a failure came before its copy
        for key in self.cache.trim():
            self._evict(key)
        self.copies.drain()

    def order(self, layer: int, experts: list[int]) -> list[int]:
        """Resident experts first: they compute while the copies of the others run."""
        return sorted(experts, key=lambda e: self.copies.is_pending((layer, e)))

    def route(self, layer: int, ids: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Carry out the cache's decision for this layer; ids with substitutes applied."""
        routed = self.cache.route(layer, ids, gates)
        for key in routed.evict:
            self._evict(key)
        for e in routed.fetch:
            self._fetch((layer, e))
        if routed.substituted:
            table = torch.arange(self.model.spec.num_experts, device=ids.device)
            for e in routed.substituted:
                table[e] = routed.use[e]
            ids = table[ids]
        if layer == self.first_layer:         # count each token once, at the first sparse layer
            self.tokens += int(ids.shape[0])
        return ids

    def prefetch(self, runner: MoeModel, layer: int, x: torch.Tensor) -> None:
        """Guess the next sparse layer's experts by applying its router to this layer's
        input, and start now the copies of the missing ones that a miss could not
        substitute (on CUDA they run beside the layers in between)."""
        after = [n for n in self.layers if n > layer]
        if not after or not self.prefetching:
            return
        spec = runner.spec
        ids, gates = route(x, runner.sparse[after[0]].router, spec.experts_per_token,
                           spec.norm_topk_prob)
        if self.cache.policy.endswith("substitution"):
            # A miss below the threshold would be substituted, not fetched: copying such an
            # expert ahead would move bytes for nothing.
            keep = gates >= self.cache.threshold
            ids, gates = ids[keep], gates[keep]
        wanted = sorted(set(ids.flatten().tolist()))
        demand = self.cache.importance.demand(ids, gates).tolist()
        for key in self.cache.prefetch(after[0], wanted, demand):
            self._evict(key)
        for e in wanted:
            if (after[0], e) in self.cache.resident and (after[0], e) not in self.units:
                self._fetch((after[0], e))

    def _fetch(self, key: Expert) -> None:
        # Mid-forward: nothing may move (compaction would stale the forward's views).
        pair: list[Unit] = []
        self.pool.freeze()
        try:
            for data in self.host[key]:
                pair.append(self.pool.allocate(UnitKind.EXPERT,
                                               data.numel() * data.element_size(),
                                               owner=self.model.id))
        except PoolFull:        # no room without moving units: use the host copy this time
            for unit in pair:
                self.pool.release(unit)
            self.cache.forget(key)
            return
        finally:
            self.pool.thaw()
        self.copies.start(key, [(self.pool.view(unit, data.dtype, data.shape), data)
                                for unit, data in zip(pair, self.host[key], strict=True)])
        self.units[key] = (pair[0], pair[1])

    def weights(self, layer: int, e: int) -> ExpertWeights:
        g_form, d_form = (self.forms[n] for n in expert_names(layer, e))
        if (layer, e) not in self.units:
            g_host, d_host = self.host[(layer, e)]
            device = self.pool.device
            return g_form.weight(g_host.to(device)), d_form.weight(d_host.to(device))
        self.copies.ready((layer, e))
        g, d = self.units[(layer, e)]
        return g_form.weight(g_form.view(self.pool, g)), d_form.weight(d_form.view(self.pool, d))

    def _evict(self, key: Expert, retain: bool = False) -> None:
        self.copies.settle(key)             # a copy may still be writing its units
        for unit in self.units.pop(key, ()):
            self._drop(unit, retain)

    def _drop(self, unit: Unit, retain: bool = False) -> None:
        """Unpin; the unit goes unless another model shares it (equal bytes) or, with
        retain, it is keyed by content (placed by the load) for a reload to find."""
        self.pool.unpin(unit)
        if unit.pins == 0 and not (retain and unit.key is not None):
            self.pool.release(unit)

    def pin_host(self) -> bool:
        """Page-lock the experts' host memory, so that their copies to a CUDA device run
        beside the computation (seconds for a large model: call it off the engine thread).
        Until then copies are correct but wait for the host."""
        if not self.copies.overlaps:
            return False
        return all([slab.pin() for slab in self.slabs])

    def release(self, retain: bool = False) -> None:
        """Stop using the experts. With retain, those the load placed (keyed by content)
        stay resident like any retained weight, for a reload to find; fetched ones go."""
        for key in list(self.units):
            self._evict(key, retain)
        self.copies.drain()
        for slab in self.slabs:
            slab.unpin()

    @property
    def resident_bytes(self) -> int:
        """Bytes of the experts on the device, whole blocks counted."""
        units = {u.id: u for pair in list(self.units.values()) for u in pair}.values()
        return sum(u.nblocks for u in units) * self.pool.block_size

    def stats(self) -> dict[str, Any]:
        s = self.cache.stats
        per_token = s.bytes_moved / self.tokens if self.tokens else 0.0
        accuracy = s.prefetch_hits / s.prefetches if s.prefetches else 0.0
        return asdict(s) | {"hit_rate": s.hit_rate, "bytes_moved_per_token": per_token,
                            "prefetch_accuracy": accuracy,
                            "overlapped_copies": self.copies.started,
                            "capacity": self.cache.capacity, "policy": self.cache.policy,
                            "resident_experts": len(self.units),
                            "resident_bytes": self.resident_bytes}


def _check(model: ResidentModel, budget: float, policy: str) -> None:
    """Refuse bad settings before anything is copied or released."""
    spec = model.spec
    if spec.family != "moe":
        raise ValueError(f"{model.id}: expert offload needs a mixture-of-experts model")
    if spec.expert_layout != "per_expert":
        raise ValueError(
            f"{model.id}: expert offload needs one tensor per expert, but this checkpoint "
            f"stores each layer's experts stacked in (E, ...) tensors; save it with "
            f"save_pretrained(save_original_format=True), or serve it with expert budget 1")
    if model.offload is not None:
        raise ValueError(f"{model.id}: its experts are offloaded already")
    ExpertConfig(budget, policy)            # raises on a budget or policy out of range


def expert_forms(model: ResidentModel) -> dict[str, ExpertForm]:
    """Each expert unit's form: float, or quantized in the model's scheme for it."""
    plan = weight_plan(model.spec)
    return {name: ExpertForm(planned.shape, model.dtype, model.schemes.get(name))
            for name, planned in plan.items() if planned.kind == UnitKind.EXPERT}
