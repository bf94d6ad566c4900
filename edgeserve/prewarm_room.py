"""Which room a prewarm may take, and on which device (step thread).

A prewarm brings a model in before it is asked for, so it may only take the room of
what is worth less until then:
- a unit held for periodic models is worth less only when each of them is next asked
  for after the incoming model's burst (Belady's choice: the prewarmer brings them back
  before their own burst); its decayed rate does not count, so a periodic model due
  first is never pushed out, however rarely it is asked for;
- a unit held for other models is worth less when their decayed demand, per second of
  reload, is below the incoming model's (its demand per second from disk).
Retained units go first, then idle models not prewarmed themselves, in the policy's
order; a unit shared with a model that stays is freed only with every model holding it.

Of the devices where the model fits that way, the prewarm takes one that needs no
eviction (in placement's order); else the one whose victims are asked for latest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeserve.demand import DemandHistory
from edgeserve.placement import Score, missing_units
from edgeserve.placer import Needs
from edgeserve.pool import Unit

if TYPE_CHECKING:
    from edgeserve.prewarm import Prewarmer


@dataclass(frozen=True, slots=True)
class Room:
    device: str
    victims: list[str]       # idle models to unload first
    next_use: float          # when the earliest of what it evicts is asked for (monotonic)


class PrewarmRoom:
    def __init__(self, prewarmer: Prewarmer) -> None:
        self.prewarmer, self.s = prewarmer, prewarmer.s

    @property
    def history(self) -> DemandHistory:
        return self.prewarmer.history

    def choose(self, model_id: str, needs: Needs, scores: Sequence[Score],
               now: float | None = None) -> Room | None:
        """The device a prewarm of model_id goes to, with what it unloads there; None when
        no device has room worth less than the model."""
        now = time.monotonic() if now is None else now
        order = sorted((s for s in scores if s.fits), key=lambda s: (s.total_s, s.device))
        rooms = [room for s in order
                 if (room := self.room(model_id, needs[s.device], s.device, now)) is not None]
        if not rooms:
            return None
        return max(rooms, key=lambda r: r.next_use)    # max keeps placement's order on ties

    def room(self, model_id: str, units: list[tuple[str | None, int]], device: str,
             now: float | None = None) -> Room | None:
        """The idle models to unload so that model_id fits on device, evicting only units
        worth less than it; None when it cannot fit that way."""
        now = time.monotonic() if now is None else now
        s = self.s
        pool = s.pools[device]
        missing, keep = missing_units(units, lambda k: pool.lookup(k) is not None, s.host)
        need = sum(pool.blocks_for(m.nbytes) for m in missing) - pool.free_bytes // pool.block_size
        if need <= 0:
            return Room(device, [], math.inf)
        cheaper = self.cheaper(model_id, now)
        prewarmed = self.prewarmer.pending
        retained = [u for u in pool.policy([u for u in pool.units.values() if u.pins == 0])
                    if u.key is None or u.key not in keep]
        groups = [("", [u]) for u in retained] + [
            (m, [u for u in g if u.key is None or u.key not in keep])
            for m, g in s.placer.idle_units(pool, model_id) if m not in prewarmed]
        holders: dict[int, set[str]] = {}
        for m, resident in s.models.items():
            if resident.pool is pool:
                for u in resident.distinct_units:
                    holders.setdefault(u.id, set()).add(m)
        victims: list[str] = []
        gone: set[str] = set()
        freed: set[int] = set()
        next_use = math.inf
        for model, group in groups:
            if need <= 0:
                break
            for u in group:
                at = cheaper(u)
                if at is None:
                    return None
                next_use = min(next_use, at)
            if model:
                victims.append(model)
                gone.add(model)
            for u in group:
                if u.id not in freed and holders.get(u.id, set()) <= gone:
                    freed.add(u.id)
                    need -= u.nblocks
        return Room(device, victims, next_use) if need <= 0 else None

    def cheaper(self, model_id: str, now: float) -> Callable[[Unit], float | None]:
        """For a unit: when it is next expected to be asked for, if it is worth less than
        model_id until then; None if it is worth more."""
        s, history = self.s, self.history
        bw = s.ctx.bandwidth
        incoming = history.score(model_id) / bw["disk"]
        due = history.next_burst(model_id, now)

        def check(unit: Unit) -> float | None:
            models = s.ctx.models_of(unit)
            if any(s.ctx.waiting.get(m) for m in models):
                return None
            periodic = {m: history.next_burst(m, now) for m in models
                        if history.period(m) is not None}
            if periodic:
                nexts = [n for n in periodic.values() if n is not None]
                if due is None or len(nexts) < len(periodic) or min(nexts) <= due:
                    return None
            demand = sum(history.score(m, now) for m in models if m not in periodic)
            if demand and demand / bw[s.ctx.comes_back_from(unit)] >= incoming:
                return None
            expected = now + 1 / (demand * history.decay) if demand > 0 else math.inf
            return min([expected, *[n for n in periodic.values() if n is not None]])
        return check
