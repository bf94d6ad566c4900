"""Which device a model loads on: the lowest expected time to its first token.

Every device is scored for a load by the sum of three terms, in seconds:

    move   = the bytes of the units missing there, each from the fastest tier holding it
             (host tier, else disk), at that device's measured bandwidth
    evict  = the loss from what must be evicted there to make room: each victim's reload
             time x the probability it is asked for again before that device would swap
             it out anyway (1 - exp(-rate x window), the rate summed over the models using
             it, the window the device's measured time between swaps, REUSE_HORIZON until
             measured; 1 when a request for one of them is waiting now), in the eviction
             policy's order; idle models are unloaded after retained units
    queue  = the work already queued there: decode steps left x the step time

The lowest score wins; ties go to the device with more free memory (within 5% where
nothing is evicted). A device that cannot make room even by unloading every idle model
scores infinity. A model whose units are resident (or retained) on a device moves no bytes
there, so a fine-tune goes where its base is and a task where its base's units are.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from edgeserve.eviction import PolicyContext
from edgeserve.pool import BlockPool, Unit
from edgeserve.tiers import HostTier

EWMA = 0.3        # weight of a new bandwidth measurement
# Where a model's missing bytes fit in free memory, scores within this share of the lowest
# (missing about as many bytes) are a tie, won by the device with more free
# memory: a model that shares nothing must not pile onto one device for a bandwidth
# measured a few percent higher there, or for a few bytes of equal norms. Where something
# must be evicted, or a device holds more of the model, the lowest score wins.
TIE_SHARE = 0.05
# Seconds ahead over which an evicted unit's reuse is counted until a device has swapped
# twice: then the device's own time between swaps (its residency window). A decayed count
# (half-life minutes) would make the probability 1 for any model asked for a few times,
# and every victim cost the same; so would a fixed horizon on a device that swaps every
# second.
REUSE_HORIZON = 30.0


@dataclass(frozen=True, slots=True)
class Score:
    device: str
    move_s: float
    evict_s: float
    queue_s: float
    missing_bytes: int
    free_bytes: int
    fits: bool = True
    drain_s: float = 0.0     # the work queued on this device alone: its busy models' rest

    @property
    def total_s(self) -> float:
        return self.move_s + self.evict_s + self.queue_s if self.fits else math.inf

    def terms(self) -> dict[str, float | int | bool]:
        return {"move_s": round(self.move_s, 6), "evict_s": round(self.evict_s, 6),
                "queue_s": round(self.queue_s, 6),
                "total_s": round(self.total_s, 6) if self.fits else -1.0,
                "missing_bytes": self.missing_bytes, "free_bytes": self.free_bytes,
                "fits": self.fits}


@dataclass(frozen=True, slots=True)
class Missing:
    """A unit a load lacks on one device: its bytes and the tier it would come from."""

    nbytes: int
    tier: str          # "host" | "disk"


def missing_units(units: Iterable[tuple[str | None, int]], resident: Callable[[str], bool],
                  host: HostTier | None) -> tuple[list[Missing], set[str]]:
    """The units (content key, or None when not known yet, and bytes) missing on a device,
    each counted once; and every known key (units a load never evicts)."""
    out: list[Missing] = []
    keys: set[str] = set()
    for key, nbytes in units:
        if key is not None:
            if key in keys:
                continue
            keys.add(key)
            if resident(key):
                continue
        in_host = key is not None and host is not None and key in host
        out.append(Missing(nbytes, "host" if in_host else "disk"))
    return out, keys


class Placement:
    """Scores devices for loads; learns each device's bandwidth from its loads."""

    def __init__(self, ctx: PolicyContext, step_seconds: float = 0.02) -> None:
        self.ctx = ctx
        self.step_seconds = step_seconds
        self.bandwidth: dict[str, dict[str, float]] = {}     # device -> tier -> bytes/s
        self.last_swap: dict[str, float] = {}                 # device -> when (monotonic)
        self.window: dict[str, float] = {}                    # device -> s between swaps

    def swapped(self, device: str, now: float | None = None) -> None:
        """A load that evicts was placed on device: learn its time between swaps."""
        now = time.monotonic() if now is None else now
        last = self.last_swap.get(device)
        if last is not None:
            old = self.window.get(device, now - last)
            self.window[device] = (1 - EWMA) * old + EWMA * (now - last)
        self.last_swap[device] = now

    def measured(self, device: str, tier: str, bytes_per_s: float) -> None:
        bw = self.bandwidth.setdefault(device, dict(self.ctx.bandwidth))
        bw[tier] = (1 - EWMA) * bw[tier] + EWMA * bytes_per_s

    def _bw(self, device: str) -> dict[str, float]:
        return self.bandwidth.get(device, self.ctx.bandwidth)

    def loss(self, unit: Unit, device: str) -> float:
        """Expected seconds lost by evicting unit: its reload time x the chance of reuse."""
        reload_s = unit.nbytes / self._bw(device)[self.ctx.comes_back_from(unit)]
        if self.ctx.pending(unit):
            return reload_s
        rate = self.ctx.reuse(unit) * self.ctx.demand.decay     # a decayed count -> a rate
        return reload_s * (1.0 - math.exp(-rate * self.window.get(device, REUSE_HORIZON)))

    def score(self, pool: BlockPool, missing: Sequence[Missing], keep: set[str],
              victims: Sequence[Unit], idle_models: Sequence[Sequence[Unit]],
              queued_steps: int, own_steps: int | None = None) -> Score:
        """victims: the unpinned units in the policy's eviction order; idle_models: the
        units each idle model would give back if unloaded, in the policy's order;
        queued_steps: the work ahead of a load there (on CPU pools, all of the CPU's);
        own_steps: the work of this device's own models (default queued_steps)."""
        bw = self._bw(pool.device)
        move = sum(m.nbytes / bw[m.tier] for m in missing)
        need = sum(pool.blocks_for(m.nbytes) for m in missing) - pool.free_bytes // pool.block_size
        evict, gone = 0.0, set()
        for group in [[u] for u in victims] + [list(g) for g in idle_models]:
            if need <= 0:
                break
            for unit in group:
                if unit.id in gone or (unit.key is not None and unit.key in keep):
                    continue
                gone.add(unit.id)
                need -= unit.nblocks
                evict += self.loss(unit, pool.device)
        own = queued_steps if own_steps is None else own_steps
        return Score(pool.device, move, evict, queued_steps * self.step_seconds,
                     sum(m.nbytes for m in missing), pool.free_bytes, fits=need <= 0,
                     drain_s=own * self.step_seconds)

    @staticmethod
    def choose(scores: Sequence[Score]) -> Score:
        """The lowest total; ties to more free memory, and so are scores within TIE_SHARE
        of it that miss about as many bytes (within TIE_SHARE), where those fit in free
        memory. None fits (busy models hold the room): the device whose own queued work
        drains first, then the least missing."""
        fitting = [s for s in scores if s.fits]
        if not fitting:
            return min(scores, key=lambda s: (round(s.drain_s, 6),
                                              s.missing_bytes - s.free_bytes, s.device))
        best = min(fitting, key=lambda s: (round(s.total_s, 6), -s.free_bytes, s.device))
        if best.missing_bytes > best.free_bytes:
            return best

        def near(s: Score) -> bool:   # as good, missing about as many bytes, in free memory
            return s.total_s <= best.total_s * (1 + TIE_SHARE) + 1e-9 \
                and abs(s.missing_bytes - best.missing_bytes) \
                <= TIE_SHARE * max(s.missing_bytes, best.missing_bytes) \
                and s.missing_bytes <= s.free_bytes
        return min(filter(near, fitting), key=lambda s: (-s.free_bytes, s.total_s, s.device))


def report(chosen: Score, scores: Sequence[Score], override: bool) -> dict[str, object]:
    """The placement part of a load report."""
    return {"device": chosen.device, "override": override,
            "scores": {s.device: s.terms() for s in scores}}
