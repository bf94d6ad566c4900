"""Placement across two devices, and predictive prewarming, on one request trace each.

Store: three bases (Llama architecture, random weights, made locally) with three
fine-tunes each, changing as many decoder projections as 10% of their tensors (the
embedding, head and norms stay the base's, as in LoRA-merged fine-tunes). Two simulated devices
(`cpu:0,cpu:1`: separate pools on the CPU), each able to hold about a third of the
store's unique weight bytes. The pools are the only difference from real devices: the
placement code runs exactly as it would for `cuda:0,cuda:1`.

Mixed trace: Zipf popularity over the twelve models (s = 1.1), bursty gamma gaps (shape
0.3), and a periodic component (one model asked for in bursts at a fixed period).
Replayed against four policies with prewarming off, so that only placement differs:
affinity (edgeserve: placement by expected time to first token, sharing, retention,
cost-aware eviction); most-free (the same memory reuse, placed on the device with the
most free memory: the choice before affinity); round-robin; Ollama-like (whole models,
LRU, nothing shared or retained, most free memory first).

Periodic trace: four models, each asked for in bursts at its own period; replayed with
affinity placement, prewarming on and off. TTFT is measured after a warm-up in which the
demand history is learned (the same requests are excluded from both runs).

Prints one JSON line per run, then one with the ratios. Targets: affinity p95 TTFT at
most 0.6x most-free and bytes moved at most 0.5x; prewarm on p95 at most 0.5x off.

    .venv/bin/python bench/placement.py [--requests 150] [--seed 0] [--duration 45]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
from pathlib import Path

import torch
from multimodel import fine_tune
from tracelog import Trace, send

from edgeserve import EdgeServer
from edgeserve.config import Config, PoolConfig, SchedulerConfig, TierConfig

OUT = Path(__file__).parent / "out" / "placement-store-64k-lora"   # see fine_tune
# A large vocabulary and few small layers: loading (about 130 MB a base) costs much more
# than a short prefill, as for real checkpoints on a GPU; the CPU can compute it quickly.
SIZE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=64000)
BASES = ["base-a", "base-b", "base-c"]
MODELS = [m for b in BASES for m in (b, f"{b}-ft1", f"{b}-ft2", f"{b}-ft3")]
POLICIES = {  # name -> (eviction policy, placement)
    "affinity": ("edgeserve", "affinity"), "most-free": ("edgeserve", "most-free"),
    "round-robin": ("edgeserve", "round-robin"), "ollama": ("ollama", "most-free")}


def make_store() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    for seed, base in enumerate(BASES):
        path = OUT / base
        if not (path / "config.json").is_file():
            torch.manual_seed(seed)
            LlamaForCausalLM(LlamaConfig(**SIZE)).save_pretrained(path)
        for ft in (1, 2, 3):
            fine_tune(path, OUT / f"{base}-ft{ft}", 100 * seed + ft)


def unique_bytes() -> int:
    """Weight bytes of the store with equal units counted once (fp32 pool units)."""
    from edgeserve.arch import weight_plan
    from edgeserve.checkpoint import HashCache
    from edgeserve.loader import LoadContext, Sources, read_spec
    from edgeserve.pool import BlockPool

    ctx = LoadContext(BlockPool("cpu", 4096, 4096, storage=False), torch.float32,
                      HashCache(OUT))
    sizes: dict[str, int] = {}
    for model in MODELS:
        spec = read_spec(OUT / model)
        keys = Sources.scan(OUT / model, spec, ctx, model).keys
        for name, unit in weight_plan(spec).items():
            sizes[keys[name]] = torch.Size(unit.shape).numel() * 4
    return sum(sizes.values())


def mixed_trace(n: int, seed: int, mean_gap: float, period: float
                ) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    order = MODELS[:]
    rng.shuffle(order)                          # popularity unrelated to sharing
    periodic, rest = order[-1], order[:-1]
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(rest))]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(0.3, mean_gap / 0.3)
        out.append((t, rng.choices(rest, weights)[0]))
    out += [(k * period + 0.01 * j, periodic) for k in range(1, int(t / period) + 1)
            for j in range(3)]
    return sorted(out)


def family_misses(requests: list[tuple[float, str]], devices: int) -> int:
    """The fewest loads of a base any policy can make on the trace when each device holds
    one base's family at a time (Belady's offline choice: evict the family asked for
    latest): a lower bound on the bases a replay loads, cold ones included."""
    families = [model.split("-ft")[0] for _, model in requests]
    held: list[str] = []
    misses = 0
    for i, family in enumerate(families):
        if family in held:
            continue
        misses += 1
        if len(held) == devices:
            rest = families[i + 1:]
            held.remove(max(held, key=lambda f: rest.index(f) if f in rest else len(rest)))
        held.append(family)
    return misses


def periodic_trace(duration: float, seed: int) -> list[tuple[float, str]]:
    rng = random.Random(seed)
    models = ["base-a", "base-b-ft1", "base-c", "base-a-ft2"]
    periods = [2.6, 3.4, 4.2, 5.0]
    out = []
    for model, period in zip(models, periods, strict=True):
        t = rng.uniform(0, period)
        while t < duration:
            out += [(t + 0.005 * j, model) for j in range(4)]
            t += period
    return sorted(out)


async def replay(policy: str, requests: list[tuple[float, str]], pool: int, prewarm: bool,
                 warmup: float = 0.0, log: Path | None = None) -> dict[str, object]:
    eviction, placement = POLICIES[policy]
    cfg = Config(models=OUT, device="cpu:0,cpu:1", dtype="float32",
                 pool=PoolConfig(pool_size=pool),
                 tiers=TierConfig(host_size=pool, policy=eviction),
                 scheduler=SchedulerConfig(placement=placement, prewarm=prewarm))
    async with EdgeServer(config=cfg) as es:
        trace = Trace(es)
        ttft = await send(es, trace, requests, 4, warmup)
        stats = es.stats()
        if log is not None:
            trace.dump(log)
        summary = trace.summary()
        for p in es.pools.values():
            p.check_integrity()
    loads = stats["loads"]
    q = statistics.quantiles(ttft, n=100)
    return {"policy": policy, "prewarm": prewarm, "requests": len(ttft),
            "ttft_p50_ms": round(1000 * q[49], 1), "ttft_p95_ms": round(1000 * q[94], 1),
            "loads": int(loads["loads"]),
            "gb_moved": round((loads["bytes_from_disk"] + loads["bytes_from_host"]) / 1e9, 3),
            "prewarms": stats["prewarm"]["prewarms"], "prewarm_hits": stats["prewarm"]["hits"],
            "summary": summary}   # "trace" names the trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mean-gap", type=float, default=0.2)
    parser.add_argument("--duration", type=float, default=45.0, help="periodic trace, s")
    parser.add_argument("--traces", default="mixed,periodic")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--log", type=Path, help="folder for each replay's trace (JSON lines)")
    args = parser.parse_args()
    traces = args.traces.split(",")
    make_store()
    unique = unique_bytes()
    pool = unique // 3 + (4 << 20)          # a third of the unique bytes, plus KV room
    mixed = mixed_trace(args.requests, args.seed, args.mean_gap, period=3.0)
    base_gb = (OUT / BASES[0] / "model.safetensors").stat().st_size / 1e9
    bound_gb = family_misses(mixed, 2) * base_gb
    head = {"bench": "placement", "unique_gb": round(unique / 1e9, 3),
            "pool_gb_per_device": round(pool / 1e9, 3),
            "mixed_bound_gb": round(bound_gb, 3)}     # the fewest bytes any policy moves
    results: dict[str, list[dict[str, object]]] = {}
    if args.log is not None:
        args.log.mkdir(parents=True, exist_ok=True)
    for n, policy in enumerate(args.policies.split(",") if "mixed" in traces else ()):
        log = args.log / f"mixed-{n}-{policy}.jsonl" if args.log is not None else None
        results.setdefault(policy, []).append(
            asyncio.run(replay(policy, mixed, pool, prewarm=False, log=log)))
        print(json.dumps({**head, "trace": "mixed", **results[policy][-1]}))
    periodic = periodic_trace(args.duration, args.seed)
    warmup = args.duration / 3
    on_off: dict[bool, dict[str, object]] = {}
    for prewarm in (False, True) if "periodic" in traces else ():
        log = args.log / f"periodic-{'on' if prewarm else 'off'}.jsonl" if args.log else None
        on_off[prewarm] = asyncio.run(replay("affinity", periodic, pool, prewarm, warmup, log))
        print(json.dumps({**head, "trace": "periodic", **on_off[prewarm]}))

    def ratio(a: dict[str, object], b: dict[str, object], key: str) -> float:
        return round(float(a[key]) / max(float(b[key]), 1e-9), 3)  # type: ignore[arg-type]

    def ratios(policy: str, against: str, key: str) -> list[float]:
        """One ratio per repetition (policies listed twice alternate within the run)."""
        return [ratio(a, b, key) for a, b in zip(results.get(policy, []),
                                                 results.get(against, []), strict=False)]

    out: dict[str, object] = {"bench": "placement"}
    for name, against, key in (("p95_affinity_vs_most_free", "most-free", "ttft_p95_ms"),
                               ("bytes_affinity_vs_most_free", "most-free", "gb_moved"),
                               ("p95_affinity_vs_ollama", "ollama", "ttft_p95_ms")):
        found = ratios("affinity", against, key)
        if found:
            out[name] = statistics.median(found)
            out[name + "_each"] = found
    most_free = [float(r["gb_moved"]) for r in results.get("most-free", [])]  # type: ignore[arg-type]
    if most_free:   # the best bytes ratio any policy could reach against most-free's replays
        out["bytes_bound_vs_most_free_each"] = [round(bound_gb / m, 3) for m in most_free]
    if on_off:
        out["p95_prewarm_on_vs_off"] = ratio(on_off[True], on_off[False], "ttft_p95_ms")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
