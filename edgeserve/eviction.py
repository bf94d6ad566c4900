"""Eviction policies: which unpinned units go first, and which idle model to unload.

edgeserve's policy ranks a unit by the value of keeping it:

    value = reload cost x predicted reuse / size
          = (size / bandwidth of the tier it would come back from) x reuse / size

Reuse is the decayed request rate of every model that uses the unit (a shared unit counts
for all of them), plus the requests waiting for those models right now (queued behind a
load or held back by grouping): each is a certain use, soon. The baselines are policies
too, so benchmarks compare like with like: LRU; Ollama-like (unload the least recently
used whole model, retain nothing); and no-sharing (edgeserve's, with keys private to each
model).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sized
from dataclasses import dataclass, field

from edgeserve.pool import Unit, UnitKind
from edgeserve.tiers import HostTier


class Demand:
    """Per-model request history: an exponentially decayed request rate."""

    def __init__(self, half_life: float = 120.0) -> None:
        self.decay = math.log(2) / half_life
        self._score: dict[str, tuple[float, float]] = {}     # model -> (score, at)
        self.last: dict[str, float] = {}

    def record(self, model: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._score[model] = (self.score(model, now) + 1.0, now)
        self.last[model] = now

    def score(self, model: str, now: float | None = None) -> float:
        """Requests seen, each weighted by exp(-decay x age): a rate times the half-life."""
        if model not in self._score:
            return 0.0
        now = time.monotonic() if now is None else now
        score, at = self._score[model]
        return score * math.exp(-self.decay * max(0.0, now - at))


@dataclass
class PolicyContext:
    demand: Demand
    users: dict[str, set[str]] = field(default_factory=dict)   # unit key -> model ids
    host: HostTier | None = None
    # bytes/s a unit comes back at, by tier; updated from measured loads
    bandwidth: dict[str, float] = field(default_factory=lambda: {"host": 8e9, "disk": 1.5e9})
    # model -> its requests not started yet (the scheduler's grouping keeps this)
    waiting: Mapping[str, Sized] = field(default_factory=dict)

    def models_of(self, unit: Unit) -> set[str]:
        return self.users.get(unit.key or "", set()) or ({unit.owner} if unit.owner else set())

    def pending(self, unit: Unit) -> int:
        """Requests waiting now for a model that uses unit."""
        return sum(len(self.waiting.get(m, ())) for m in self.models_of(unit))

    def reuse(self, unit: Unit) -> float:
        models = self.models_of(unit)
        score = sum(self.demand.score(m) + len(self.waiting.get(m, ())) for m in models)
        if unit.kind is UnitKind.KV:
            # A prefix page is worth its model's demand and its own decayed hits.
            age = max(0.0, time.monotonic() - unit.last_use)
            score += unit.uses * math.exp(-self.demand.decay * age)
        return score

    def comes_back_from(self, unit: Unit) -> str:
        return "host" if self.host is not None and self.host.fits(unit.nbytes) else "disk"


class EvictionPolicy(ABC):
    name = "abstract"
    retain = True        # unloaded models' units stay resident until evicted
    share = True         # equal bytes are one unit across models
    host_tier = True     # evicted units are demoted to the host tier

    @abstractmethod
    def unit_order(self, units: list[Unit], ctx: PolicyContext) -> list[Unit]:
        """Unpinned units, cheapest loss first."""

    @abstractmethod
    def model_order(self, models: list[str], ctx: PolicyContext) -> list[str]:
        """Idle resident models, the first to unload first."""


class CostAware(EvictionPolicy):
    name = "edgeserve"

    def value(self, unit: Unit, ctx: PolicyContext) -> float:
        reload_cost = unit.nbytes / ctx.bandwidth[ctx.comes_back_from(unit)]
        if unit.kind is UnitKind.KV:
            # A page comes back by recomputing its tokens, or from the host tier if kept.
            host = reload_cost if ctx.comes_back_from(unit) == "host" else math.inf
            reload_cost = min(unit.reload_cost, host)
        return reload_cost * ctx.reuse(unit) / max(1, unit.nbytes)

    def unit_order(self, units: list[Unit], ctx: PolicyContext) -> list[Unit]:
        return sorted(units, key=lambda u: (self.value(u, ctx), u.last_use))

    def model_order(self, models: list[str], ctx: PolicyContext) -> list[str]:
        return sorted(models, key=lambda m: (ctx.demand.score(m), ctx.demand.last.get(m, 0.0)))


class LRU(EvictionPolicy):
    name = "lru"

    def unit_order(self, units: list[Unit], ctx: PolicyContext) -> list[Unit]:
        return sorted(units, key=lambda u: u.last_use)

    def model_order(self, models: list[str], ctx: PolicyContext) -> list[str]:
        return sorted(models, key=lambda m: ctx.demand.last.get(m, 0.0))


class OllamaLike(LRU):
    name = "ollama"
    retain = False
    share = False
    host_tier = False


class NoSharing(CostAware):
    name = "no-sharing"
    share = False


POLICIES: dict[str, type[EvictionPolicy]] = {
    p.name: p for p in (CostAware, LRU, OllamaLike, NoSharing)}


def create_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"eviction policy {name!r} is not one of "
                         f"{', '.join(POLICIES)}") from None
