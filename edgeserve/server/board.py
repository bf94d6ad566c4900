"""What the web page shows beside the pool map, read from a running EdgeServer: resident
models, the host tier, the numbers panel, and one unit in detail."""

from __future__ import annotations

import math
import time
from typing import Any

from edgeserve.api import EdgeServer
from edgeserve.pool import BlockPool, Unit, UnitKind


def models_of(es: EdgeServer) -> Any:
    """unit -> the ids of the models that use it (or created it), sorted."""
    ctx = es.scheduler.ctx
    return lambda unit: tuple(sorted(ctx.models_of(unit)))


def resident_models(es: EdgeServer) -> dict[str, dict[str, Any]]:
    """Resident models: device, bytes, pinned, base, requests running and waiting."""
    sched = es.scheduler
    queues = es.engine.counts_by_model() if es.engine is not None else {}
    out = {}
    for model_id, model in list(sched.models.items()):
        state = sched.residency.get(model_id)
        running, waiting = queues.get(model_id, (0, 0))
        out[model_id] = {"device": model.pool.device, "bytes": model.resident_bytes,
                         "pinned": bool(state and state.pinned), "base": model.base,
                         "running": running, "waiting": waiting}
    return out


def host_tier(es: EdgeServer) -> dict[str, int] | None:
    """The host tier's figures, with the bytes of KV pages kept there (`kv_bytes`)."""
    if es.host is None:
        return None
    kv = getattr(es.scheduler, "kv_host", None)
    return es.host.stats() | {"kv_bytes": sum(kv.bytes_by_model().values()) if kv else 0}


def numbers(es: EdgeServer) -> dict[str, Any]:
    """The numbers panel: requests, last-minute latency and throughput, loads, hit rates."""
    engine, sched = es.engine, es.scheduler
    recent = es.metrics.recent.figures()
    return {"running": engine.num_running if engine else 0,
            "waiting": engine.num_waiting if engine else 0,
            **{k: _round(v) for k, v in recent.items()},
            "loads": int(sched.totals["loads"]),
            "load_seconds": _round(sched.totals["seconds"]),
            "evictions": sum(p.evictions for p in es.pools.values()),
            "expert_hit_rate": _expert_hit_rate(es),
            "prefix_hit_rate": _prefix_hit_rate(es)}


def _round(x: float | int | None) -> float | int | None:
    if isinstance(x, float):
        return None if math.isnan(x) else round(x, 4)
    return x


def _expert_hit_rate(es: EdgeServer) -> float | None:
    hits = lookups = 0
    for model in list(es.models.values()):
        if model.offload is not None:
            s = model.offload.cache.stats
            hits += s.hits
            lookups += s.hits + s.misses + s.substitutions
    return round(hits / lookups, 4) if lookups else None


def _prefix_hit_rate(es: EdgeServer) -> float | None:
    """Prompt tokens found in the prefix cache over those looked up, since the start."""
    queries, hits = (_total(getattr(es.metrics, name, None))
                     for name in ("prefix_queries", "prefix_hits"))
    return round(hits / queries, 4) if queries else None


def _total(counter: Any) -> float:
    """A counter's value summed over its labels (0 without the counter)."""
    if counter is None:
        return 0.0
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def _reload(unit: Unit, ctx: Any) -> tuple[str | None, float | None]:
    """Where an evicted unit would come back from, and in how many seconds: a tier, or
    for a prefix KV page the prefill that recomputes it when that is faster."""
    if unit.key is None:
        return None, None
    tier = ctx.comes_back_from(unit)
    seconds = unit.nbytes / ctx.bandwidth[tier]
    if unit.kind is UnitKind.KV and (tier != "host" or unit.reload_cost < seconds):
        return "prefill", unit.reload_cost
    return tier, seconds


def unit_detail(es: EdgeServer, pool: BlockPool, unit: Unit) -> dict[str, Any]:
    """One unit for the map's hover: what it is, who uses it, and what evicting it costs."""
    sched = es.scheduler
    policy, ctx = sched.policy, sched.ctx
    value = getattr(policy, "value", None)
    names: set[str] = set()
    using = []
    for model_id, model in list(sched.models.items()):
        found = [name for name, u in list(model.units.items()) if u is unit]
        if found:
            using.append(model_id)
            names.update(found)
    tier, reload_s = _reload(unit, ctx)
    return {"id": unit.id, "device": pool.device, "kind": unit.kind.value,
            "bytes": unit.nbytes, "blocks": unit.nblocks, "start": unit.start,
            "pins": unit.pins, "key": unit.key, "owner": unit.owner,
            "models": list(models_of(es)(unit)), "loaded_by": sorted(using),
            "names": sorted(names),
            "uses": unit.uses, "idle_s": round(time.monotonic() - unit.last_use, 1),
            "comes_back_from": tier,
            "reload_s": reload_s,
            "demand": ctx.reuse(unit),
            "in_host_tier": bool(unit.key and es.host is not None and unit.key in es.host),
            "eviction_value": value(unit, ctx) if value is not None and not unit.pins
            else None,
            "policy": policy.name}
