"""What an idle gap costs the next request on this machine: memory and a resident model.

On the project's CPU VM, memory left untouched for a second or more is slow to touch again:
each 4 KiB page costs microseconds on its next access, with no fault the guest kernel
counts (the hypervisor's doing). A request that follows an idle gap reads its model's
weights through that. This measures it, so that trace replays (whose requests come in
bursts between gaps) can be read against it:

- a 64 MiB copy, hot and after each gap, over ordinary pages (the process heap) and over
  memory advised for huge pages (as the CPU pool's slab is: `edgeserve.pool.hugepages`);
- four requests at once (16 prompt tokens each) for two resident fine-tunes of one base,
  hot and after each gap: the time to the last first token.

Prints one JSON line per gap with medians over `--repeats`.

    .venv/bin/python bench/idle.py [--gaps 0,0.3,1,2.5,4] [--repeats 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch
from multimodel import OUT, make_store
from tracelog import faulted

from edgeserve import EdgeServer
from edgeserve.config import Config, PoolConfig, SchedulerConfig, TierConfig
from edgeserve.pool.hugepages import host_buffer


def copy_ms(src: torch.Tensor, dst: torch.Tensor) -> float:
    start = time.perf_counter()
    dst.copy_(src)
    return 1000 * (time.perf_counter() - start)


async def burst_ms(es: EdgeServer, models: list[str], seed: int) -> float:
    async def one(model: str, i: int) -> float:
        start = time.perf_counter()
        prompt = [(seed * 7 + i * 13 + k) % 8000 + 1 for k in range(16)]
        async for _ in es.stream_complete(model, prompt, max_tokens=8, ignore_eos=True,
                                          temperature=0):
            break
        return time.perf_counter() - start
    return 1000 * max(await asyncio.gather(*[one(m, i) for i, m in enumerate(models)]))


async def main(gaps: list[float], repeats: int) -> None:
    make_store()
    heap = [torch.ones(64 << 20, dtype=torch.uint8) for _ in range(2)]
    huge = [host_buffer(64 << 20) for _ in range(2)]
    for t in huge:
        t.fill_(1)
    cfg = Config(models=OUT, device="cpu", dtype="float32",
                 pool=PoolConfig(pool_size=200 << 20),
                 tiers=TierConfig(host_size=200 << 20),
                 scheduler=SchedulerConfig(idle_hashing=False, prewarm=False))
    burst = ["base-a-ft1", "base-a-ft1", "base-a-ft1", "base-a-ft2"]
    async with EdgeServer(config=cfg) as es:
        await faulted(es)
        for model in set(burst):
            await es.load(model)
        for _ in range(3):
            copy_ms(*heap), copy_ms(*huge), await burst_ms(es, burst, 0)
        for gap in gaps:
            rows: dict[str, list[float]] = {"heap": [], "huge": [], "burst": []}
            for n in range(repeats):
                await asyncio.sleep(gap)
                rows["heap"].append(copy_ms(*heap))
                await asyncio.sleep(gap)
                rows["huge"].append(copy_ms(*huge))
                await asyncio.sleep(gap)
                rows["burst"].append(await burst_ms(es, burst, n))
            print(json.dumps({"bench": "idle", "gap_s": gap,
                              "copy_64mib_heap_ms": round(statistics.median(rows["heap"]), 1),
                              "copy_64mib_huge_pages_ms":
                                  round(statistics.median(rows["huge"]), 1),
                              "burst_ttft_ms": round(statistics.median(rows["burst"]), 1)}),
                  flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaps", default="0,0.3,1,2.5,4")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main([float(g) for g in args.gaps.split(",")], args.repeats))
