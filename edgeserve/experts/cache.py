"""Which experts are on the device, and what each routing decision does about misses.

Plain Python over (layer, expert) ids: the runtime asks `route` before computing a MoE
layer and gets, for every expert the router picked, the expert to compute with (itself,
or a resident substitute) plus the fetches and evictions to carry out. Policies:

  lru                        least recently used expert goes first (mixtral-offloading)
  importance                 least important goes first (decayed gate mass + frequency)
  importance+substitution    as importance; and a miss whose gate weight is below the
                             threshold for every token is served by the most similar
                             resident expert of the same layer instead of a fetch
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

import torch

from edgeserve.config import EXPERT_POLICIES
from edgeserve.experts.importance import ExpertImportance

POLICIES = EXPERT_POLICIES
Expert = tuple[int, int]          # (layer, expert)


@dataclass
class Routed:
    """What to do for one layer's routing decision."""

    use: dict[int, int]                                   # expert picked -> expert computed
    fetch: list[int] = field(default_factory=list)        # experts to copy in, this layer
    evict: list[Expert] = field(default_factory=list)     # experts to drop first
    substituted: list[int] = field(default_factory=list)  # picked experts served by another


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    substitutions: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
    bytes_moved: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses + self.substitutions
        return self.hits / total if total else 0.0


class ExpertCache:
    def __init__(self, layers: int, experts: int, capacity: int, policy: str,
                 expert_bytes: int, similarity: torch.Tensor | None = None,
                 threshold: float = 0.1) -> None:
        if policy not in POLICIES:
            raise ValueError(f"expert policy {policy!r} is not one of {', '.join(POLICIES)}")
        if capacity < 1:
            raise ValueError("the expert budget must hold at least one expert")
        if policy.endswith("substitution") and similarity is None:
            raise ValueError("substitution needs the experts' similarity")
        self.layers, self.experts, self.capacity = layers, experts, capacity
        self.policy, self.expert_bytes, self.threshold = policy, expert_bytes, threshold
        self.similarity = similarity                       # (L, E, E)
        self.importance = ExpertImportance(layers, experts)
        self.stats = CacheStats()
        self.resident: set[Expert] = set()
        self._last_use: dict[Expert, int] = {}
        self._clock = itertools.count()
        self._prefetched: set[Expert] = set()
        self._heap: list[tuple[float, int, Expert]] | None = None   # this call's victims

    def warm(self, experts: list[Expert]) -> None:
        """Mark experts resident at load time (up to the capacity)."""
        for e in experts[: self.capacity - len(self.resident)]:
            self.resident.add(e)
            self._last_use[e] = next(self._clock)

    def route(self, layer: int, ids: torch.Tensor, weights: torch.Tensor) -> Routed:
        """ids, weights (N, A): the router's picks for this layer's tokens."""
        self.importance.observe(layer, ids, weights)
        self._heap = None
        picked = ids.reshape(-1).tolist()
        top_weight: dict[int, float] = {}
        for e, w in zip(picked, weights.reshape(-1).tolist(), strict=True):
            top_weight[e] = max(top_weight.get(e, 0.0), w)
        out = Routed(use={})
        needed = {(layer, e) for e in top_weight}
        # Most important first, so that a substitute is never one evicted in this call.
        for e in sorted(top_weight, key=top_weight.__getitem__, reverse=True):
            out.use[e] = self._serve(layer, e, top_weight[e], needed, out)
        return out

    def _serve(self, layer: int, e: int, weight: float, needed: set[Expert],
               out: Routed) -> int:
        key = (layer, e)
        if key in self.resident:
            self.stats.hits += 1
            self.stats.prefetch_hits += key in self._prefetched
            self._prefetched.discard(key)
            self._last_use[key] = next(self._clock)
            return e
        sub = self._substitute(layer, e, weight, needed)
        if sub is not None:
            self.stats.substitutions += 1
            out.substituted.append(e)
            self._last_use[(layer, sub)] = next(self._clock)
            return sub
        self.stats.misses += 1
        out.evict += self._admit(key, needed)
        out.fetch.append(e)
        return e

    def _substitute(self, layer: int, e: int, weight: float, needed: set[Expert]) -> int | None:
        if not self.policy.endswith("substitution") or weight >= self.threshold:
            return None
        assert self.similarity is not None
        candidates = [r for (lr, r) in self.resident if lr == layer]
        if not candidates:
            return None
        sims = self.similarity[layer, e, candidates]
        return candidates[int(sims.argmax())]

    def _admit(self, key: Expert, protected: set[Expert]) -> list[Expert]:
        evicted = []
        while len(self.resident) >= self.capacity:
            found = self._victim(protected)
            if found is None:
                break           # every resident expert is in use by this layer: overflow
            self.forget(found[1])
            evicted.append(found[1])
        self.resident.add(key)
        self._last_use[key] = next(self._clock)
        self.stats.bytes_moved += self.expert_bytes
        return evicted

    def forget(self, key: Expert) -> None:
        """key is no longer on the device (evicted, or its copy could not be placed)."""
        self.resident.discard(key)
        self._prefetched.discard(key)

    def trim(self) -> list[Expert]:
        """Back within the capacity once the experts in use are done: a layer that needed
        more experts than the capacity holds overflowed it. Returns the evictions."""
        evicted = []
        self._heap = None
        while len(self.resident) > self.capacity:
            found = self._victim(set())
            assert found is not None
            self.forget(found[1])
            evicted.append(found[1])
        return evicted

    def _victim(self, protected: set[Expert]) -> tuple[float, Expert] | None:
        """The expert to evict next (left resident), with its importance (0 with lru): the
        least recently used one (lru), or the least important, then least recently used.
        The candidates of a call (route, prefetch, trim) go in a heap once, so that a call
        evicting many experts does not scan every resident one each time: scores do not
        change within a call, and an expert used since goes back in at its new place."""
        if self._heap is None:
            table = self.importance.table() if self.policy != "lru" else None
            self._heap = [(table[k[0]][k[1]] if table is not None else 0.0,
                           self._last_use[k], k) for k in self.resident if k not in protected]
            heapq.heapify(self._heap)
        heap = self._heap
        while heap:
            score, used, key = heap[0]
            if key not in self.resident or key in protected:
                heapq.heappop(heap)
            elif used != self._last_use[key]:
                heapq.heapreplace(heap, (score, self._last_use[key], key))
            else:
                return score, key
        return None

    def prefetch(self, layer: int, experts: list[int],
                 demand: list[float] | None = None) -> list[Expert]:
        """Predicted experts of a coming layer: fetch the missing ones now. Returns the
        evictions to carry out (the fetches are the given experts not resident before).

        With importance, a guess displaces a resident expert only if the prediction asks
        more of it (demand[e], on the scale of importance scores) than the victim's
        importance: a speculative copy never pushes out an expert that matters more."""
        evicted: list[Expert] = []
        self._heap = None
        protected = {(layer, x) for x in experts}
        for e in experts:
            key = (layer, e)
            if key in self.resident:
                continue
            if demand is not None and self.policy != "lru" and \
                    len(self.resident) >= self.capacity:
                found = self._victim(protected)
                if found is None or found[0] >= demand[e]:
                    continue
            evicted += self._admit(key, protected)
            self._prefetched.add(key)
            self.stats.prefetches += 1
        return evicted
