"""First sight of a fine-tune: its load when its files were never hashed, against the same
load with the hashes cached.

A fine-tune whose base is resident must be hashed before its load (its units may share
the base's bytes, and placement must know); a base seen for the first time is hashed by
the reader threads as it streams in. Store: bench/multimodel.py's (made if missing). Each
round loads base-a, base-a-ft1 and base-a-ft2 into a fresh server, alternately with the
store's hash cache removed (fresh) and kept (cached), and, with `--idle`, a third way: the
cache removed, then the new server left idle until idle hashing has hashed the store before
the first load (idle). Idle hashing is off in the other two. Prints one JSON line per model
with each round's milliseconds, then the medians' ratios for the fine-tunes.

    .venv/bin/python bench/first_sight.py [--rounds 3] [--idle]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time

from multimodel import OUT, make_store
from tracelog import faulted

from edgeserve import EdgeServer
from edgeserve.config import Config, PoolConfig, SchedulerConfig, TierConfig

MODELS = ("base-a", "base-a-ft1", "base-a-ft2")


async def once(mode: str) -> dict[str, float]:
    """mode: fresh, cached, or idle (fresh, then hashed while the server is idle)."""
    if mode != "cached":
        shutil.rmtree(OUT / ".edgeserve", ignore_errors=True)
    cfg = Config(models=OUT, device="cpu", dtype="float32", pool=PoolConfig(pool_size=400 << 20),
                 tiers=TierConfig(host_size=0),
                 scheduler=SchedulerConfig(prewarm=False, idle_hashing=mode == "idle"))
    out = {}
    async with EdgeServer(config=cfg) as es:
        await faulted(es)
        while mode == "idle" and not (es.stats()["idle_hashing"]["files"] and
                                      es.stats()["idle_hashing"]["pending"] == 0):
            await asyncio.sleep(0.01)
        for model in MODELS:
            start = time.perf_counter()
            await es.load(model)
            out[model] = 1000 * (time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", action="store_true",
                        help="also loads after idle hashing has hashed the fresh store")
    args = parser.parse_args()
    make_store()
    modes = ("fresh", "cached", "idle") if args.idle else ("fresh", "cached")
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            runs[mode].append(asyncio.run(once(mode)))
    med = {}
    for mode in modes:
        for model in MODELS:
            each = [round(r[model], 1) for r in runs[mode]]
            med[mode, model] = statistics.median(each)
            print(json.dumps({"bench": "first_sight", "hashes": mode, "model": model,
                              "ms_each": each, "ms_median": med[mode, model]}))
    for mode in modes:
        if mode != "cached":
            fine_tunes = [med[mode, m] / med["cached", m] for m in MODELS[1:]]
            print(json.dumps({"bench": "first_sight", f"fine_tune_{mode}_vs_cached":
                              round(statistics.median(fine_tunes), 2)}))


if __name__ == "__main__":
    main()
