"""Serving more models than fit: one request trace replayed against three policies.

Six models (two bases, each with two fine-tunes that change as many of its decoder
layers' projections as 10% of its tensors, leaving embedding and head alone),
whose weights together are about twice the pool. A fixed-seed trace: Zipf popularity over
the models, bursty gamma inter-arrival times. Replayed against edgeserve's policy
(sharing, retention, host tier, cost-aware eviction), an Ollama-like policy (unload the
least recently used whole model, retain nothing) and no-sharing. Prints one JSON line per
policy run: TTFT p50/p95, bytes loaded from disk, loads; and the p95 ratio against
Ollama-like (target: at most 0.5).

The trace starts as soon as the server has started and its pool is faulted in (as in a
server up for a few seconds; before 2026-12-02 it started at once, and the first loads of
every policy waited for the kernel to fault the pool in). With `--fresh`, idle hashing (the
store's never-hashed files hashed while the server is idle, on by default; Ollama-like has
no use for hashes and hashes nothing) gets only that wait and the trace's own gaps. Each
line reports the files it hashed, the files still hashed whole on a load's path before the
load (`hash_passes_for_loads`) and those hashed by a load's reader threads
(`hashed_as_read`).

    .venv/bin/python bench/multimodel.py [--requests 150] [--seed 0] [--fresh]
        [--idle-hashing on|off]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
from pathlib import Path

import torch
from tracelog import Trace, send

from edgeserve import EdgeServer
from edgeserve.config import Config, PoolConfig, SchedulerConfig, TierConfig

# "-lora": fine-tunes that leave embedding, head and norms alone (see fine_tune); the
# figures in RESULTS.md from before 2026-12-02 used fine-tunes that changed any tensor.
OUT = Path(__file__).parent / "out" / "multimodel-store-lora"
SIZE = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
            num_attention_heads=6, num_key_value_heads=2, vocab_size=8192)
MODELS = ["base-a", "base-a-ft1", "base-a-ft2", "base-b", "base-b-ft1", "base-b-ft2"]


def fine_tune(base: Path, target: Path, seed: int) -> None:
    """A copy of base with as many of its decoder layers' projections changed a little as
    a tenth of its tensors (unless made already).

    Like the fine-tunes people serve beside their base (LoRA adapters merged into the
    attention and MLP projections, task fine-tunes with the embedding frozen), it leaves
    the embedding, the head and the norms alone: those would make every fine-tune a model
    of its own where the vocabulary is large."""
    from safetensors.torch import load_file, save_file

    if (target / "config.json").is_file():
        return
    shutil.copytree(base, target)
    tensors = load_file(target / "model.safetensors")
    names = sorted(n for n in tensors if ".layers." in n and n.endswith("_proj.weight"))
    g = torch.Generator().manual_seed(seed)
    for i in torch.randperm(len(names), generator=g)[: len(tensors) // 10].tolist():
        t = tensors[names[i]]
        tensors[names[i]] = t + 0.01 * torch.randn(t.shape, generator=g)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})


def make_store() -> int:
    """The six models; returns their total weight bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for seed, base in enumerate(("base-a", "base-b")):
        path = OUT / base
        if not (path / "config.json").is_file():
            torch.manual_seed(seed)
            LlamaForCausalLM(LlamaConfig(**SIZE)).save_pretrained(path)
        for ft in (1, 2):
            fine_tune(path, OUT / f"{base}-ft{ft}", 100 * seed + ft)
    return sum((OUT / m / "model.safetensors").stat().st_size for m in MODELS)


def trace(n: int, seed: int, mean_gap: float) -> list[tuple[float, str]]:
    """(arrival time, model): Zipf popularity (s = 1.1), gamma gaps (shape 0.3: bursty)."""
    rng = random.Random(seed)
    order = MODELS[:]
    rng.shuffle(order)                                # popularity unrelated to sharing
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(order))]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(0.3, mean_gap / 0.3)
        out.append((t, rng.choices(order, weights)[0]))
    return out


async def replay(policy: str, requests: list[tuple[float, str]], pool_size: int,
                 host_size: int, log: Path | None = None, idle_hashing: bool = True
                 ) -> dict[str, object]:
    cfg = Config(models=OUT, device="cpu", dtype="float32",
                 pool=PoolConfig(pool_size=pool_size),
                 tiers=TierConfig(host_size=host_size, policy=policy),
                 scheduler=SchedulerConfig(idle_hashing=idle_hashing))
    async with EdgeServer(config=cfg) as es:
        trace = Trace(es)
        ttft = await send(es, trace, requests, 8)
        loads = es.stats()["loads"]
        hashing = es.stats()["idle_hashing"]
        cache = es.scheduler.hashes
        passes, streamed = cache.computed - cache.streamed, cache.streamed
        if log is not None:
            trace.dump(log)
        summary = trace.summary()
        for pool in es.pools.values():
            pool.check_integrity()
    q = statistics.quantiles(ttft, n=100)
    return {"policy": policy, "requests": len(ttft), "ttft_p50_ms": round(1000 * q[49], 1),
            "ttft_p95_ms": round(1000 * q[94], 1), "loads": int(loads["loads"]),
            "gb_from_disk": round(loads["bytes_from_disk"] / 1e9, 3),
            "gb_from_host": round(loads["bytes_from_host"] / 1e9, 3),
            "idle_hashed_files": hashing["files"], "idle_hashing_yielded": hashing["yielded"],
            "hash_passes_for_loads": passes, "hashed_as_read": streamed, "trace": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mean-gap", type=float, default=0.08)
    parser.add_argument("--fresh", action="store_true",
                        help="remove the store's hash cache before every replay: each model "
                             "file is seen for the first time, for every policy")
    parser.add_argument("--policies", default="edgeserve,ollama,no-sharing")
    parser.add_argument("--idle-hashing", choices=("on", "off"), default="on",
                        help="hash never-hashed files while the server is idle (default: on)")
    parser.add_argument("--log", type=Path, help="folder for each replay's trace (JSON lines)")
    args = parser.parse_args()
    total = make_store()
    pool_size = total // 2 + (8 << 20)        # weights about twice the pool, plus KV room
    requests = trace(args.requests, args.seed, args.mean_gap)
    results: dict[str, list[dict[str, object]]] = {}
    if args.log is not None:
        args.log.mkdir(parents=True, exist_ok=True)
    for n, policy in enumerate(args.policies.split(",")):
        if args.fresh:
            shutil.rmtree(OUT / ".edgeserve", ignore_errors=True)
        log = args.log / f"{n}-{policy}.jsonl" if args.log is not None else None
        results.setdefault(policy, []).append(
            asyncio.run(replay(policy, requests, pool_size, pool_size, log,
                               args.idle_hashing == "on")))
        print(json.dumps({"bench": "multimodel", "weights_gb": round(total / 1e9, 3),
                          "pool_gb": round(pool_size / 1e9, 3), **results[policy][-1]}))
    # One ratio per repetition (policies listed twice alternate within the run): before,
    # only the last replay of each policy was compared.
    ratios = [round(float(a["ttft_p95_ms"]) / float(b["ttft_p95_ms"]), 3)  # type: ignore[arg-type]
              for a, b in zip(results.get("edgeserve", []), results.get("ollama", []),
                              strict=False)]
    if ratios:
        print(json.dumps({"bench": "multimodel", "p95_ttft_vs_ollama": statistics.median(ratios),
                          "p95_ttft_vs_ollama_each": ratios}))


if __name__ == "__main__":
    main()
