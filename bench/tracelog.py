"""A replay's trace for finding where its tail comes from: every request (model, device,
resident on arrival or not, TTFT) and every pool event (loads with their placement terms,
bytes by tier and waits; unloads; evictions; demotions), as JSON lines, and a summary.

    log = Trace(es)                    # after EdgeServer starts
    log.request(model, at, ttft, ...)  # per request
    log.dump(path)                     # JSON lines
    print(log.summary())
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from edgeserve import EdgeServer
from edgeserve.events import EventLog


async def faulted(es: EdgeServer) -> None:
    """Wait until every CPU pool has faulted its slab in ahead of use (edgeserve.pool.
    hugepages.Prefault), as in a server that has been up a few seconds: a replay or a timed
    load then does not depend on how fragmented free memory was when the pool was made."""
    for pool in es.pools.values():
        await asyncio.to_thread(pool.prefault.caught_up.wait)


async def send(es: EdgeServer, trace: Trace, requests: list[tuple[float, str]],
               max_tokens: int, warmup: float = 0.0) -> list[float]:
    """Each (arrival second, model) request sent at its time, 16 prompt tokens; the TTFTs
    of those arriving from `warmup` on, each also recorded in trace. Starts once the pools
    are faulted in."""
    ttft: list[float] = []
    await faulted(es)
    start = time.perf_counter()

    async def one(at: float, model: str, i: int) -> None:
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        arrival = time.perf_counter()
        resident = trace.resident(model)
        prompt = [(i * 7 + k) % 8000 + 1 for k in range(16)]
        async for _ in es.stream_complete(model, prompt, max_tokens=max_tokens,
                                          ignore_eos=True, temperature=0):
            if at >= warmup:
                ttft.append(time.perf_counter() - arrival)
                trace.request(model, at, ttft[-1], resident, trace.resident(model))
            break

    await asyncio.gather(*[one(at, m, i) for i, (at, m) in enumerate(requests)])
    return ttft


class Trace:
    def __init__(self, es: EdgeServer) -> None:
        self.log = EventLog(capacity=1_000_000)
        self.log.attach(es.pools.values())
        self.es = es
        self.requests: list[dict[str, Any]] = []

    def resident(self, model: str) -> str | None:
        found = self.es.models.get(model)
        return found.pool.device if found is not None else None

    def request(self, model: str, at: float, ttft: float, resident: str | None,
                device: str | None) -> None:
        self.requests.append({"kind": "request", "model": model, "at": round(at, 3),
                              "ttft": round(ttft, 4), "resident_on_arrival": resident,
                              "device": device})

    def events(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.log.since(0)]

    def dump(self, path: Path) -> None:
        with path.open("w") as f:
            for row in self.requests + self.events():
                f.write(json.dumps(row, default=str) + "\n")

    def summary(self) -> dict[str, Any]:
        events = self.events()
        loads = [e for e in events if e["kind"] == "load"]
        evicted: Counter[str] = Counter()
        for e in events:
            if e["kind"] == "evict" and e.get("unit_kind") in ("weight", "expert"):
                evicted[e["device"]] += e["bytes"]
        hits = [r for r in self.requests if r["resident_on_arrival"]]
        misses = [r for r in self.requests if not r["resident_on_arrival"]]
        by_tier: dict[str, float] = defaultdict(float)
        for e in loads:
            for tier in ("host", "disk"):
                by_tier[tier] += e[f"bytes_from_{tier}"] / 1e9
        ttft = sorted(r["ttft"] for r in self.requests)
        tail = ttft[int(0.95 * (len(ttft) - 1))] if ttft else 0.0

        def med(xs: list[float]) -> float:
            return round(statistics.median(xs), 3) if xs else 0.0

        return {
            "loads": len(loads),
            "loads_by_device": dict(Counter(e["device"] for e in loads)),
            "gb_by_tier": {k: round(v, 3) for k, v in by_tier.items()},
            "gb_weights_evicted": {d: round(b / 1e9, 3) for d, b in evicted.items()},
            "unloads": sum(e["kind"] == "unload" for e in events),
            "requests_resident": len(hits), "requests_loading": len(misses),
            "ttft_med_resident": med([r["ttft"] for r in hits]),
            "ttft_med_loading": med([r["ttft"] for r in misses]),
            "tail_requests_loading": sum(r["ttft"] >= tail for r in misses),
            "tail_requests_resident": sum(r["ttft"] >= tail for r in hits),
            "load_s_med": med([e["seconds"] for e in loads]),
            "turn_s_sum": round(sum(e.get("turn_seconds", 0.0) for e in loads), 2),
            "room_s_sum": round(sum(e.get("room_seconds", 0.0) for e in loads), 2),
            "loads_side_by_side": side_by_side(loads),
            "loads_beside": sum(bool(e.get("beside")) for e in loads),
        }


def side_by_side(loads: list[dict[str, Any]]) -> int:
    """Pairs of loads on different devices that ran at the same time, each from the end
    of its wait for its turn to its end (the span also holds what a load does before
    queueing: its spec, its hashes; so a few overlaps show even with one turn for all)."""
    spans = [(e["time"] - e["seconds"] + e.get("turn_seconds", 0.0), e["time"], e["device"])
             for e in loads]
    return sum(a[2] != b[2] and a[0] < b[1] and b[0] < a[1]
               for i, a in enumerate(spans) for b in spans[i + 1:])
