"""First sight of a fine-tune: its load when its files were never hashed, against the same
load with the hashes cached.

A fine-tune whose base is resident must be hashed before its load (its units may share
the base's bytes, and placement must know); a base seen for the first time is hashed by
the reader threads as it streams in. Store: bench/multimodel.py's (made if missing). Each
round loads base-a, base-a-ft1 and base-a-ft2 into a fresh server, alternately with the
store's hash cache removed (fresh) and kept (cached). Prints one JSON line per model with
each round's milliseconds, then the medians' ratio for the fine-tunes.

    .venv/bin/python bench/first_sight.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time

from multimodel import OUT, make_store

from edgeserve import EdgeServer
from edgeserve.config import Config, PoolConfig, SchedulerConfig, TierConfig

MODELS = ("base-a", "base-a-ft1", "base-a-ft2")


async def once(fresh: bool) -> dict[str, float]:
    if fresh:
        shutil.rmtree(OUT / ".edgeserve", ignore_errors=True)
    cfg = Config(models=OUT, device="cpu", dtype="float32", pool=PoolConfig(pool_size=400 << 20),
                 tiers=TierConfig(host_size=0),
                 scheduler=SchedulerConfig(prewarm=False, idle_hashing=False))
    out = {}
    async with EdgeServer(config=cfg) as es:
        for model in MODELS:
            start = time.perf_counter()
            await es.load(model)
            out[model] = 1000 * (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    make_store()
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for _ in range(args.rounds):
        for fresh in (True, False):
            runs[fresh].append(asyncio.run(once(fresh)))
    med = {}
    for fresh in (True, False):
        for model in MODELS:
            each = [round(r[model], 1) for r in runs[fresh]]
            med[fresh, model] = statistics.median(each)
            print(json.dumps({"bench": "first_sight", "hashes": "fresh" if fresh else "cached",
                              "model": model, "ms_each": each, "ms_median": med[fresh, model]}))
    fine_tunes = [med[True, m] / med[False, m] for m in MODELS[1:]]
    print(json.dumps({"bench": "first_sight",
                      "fine_tune_fresh_vs_cached": round(statistics.median(fine_tunes), 2)}))


if __name__ == "__main__":
    main()
