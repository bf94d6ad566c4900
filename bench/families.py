"""Forwards shared by fine-tunes: bursts of requests over bench/multimodel.py's six models
(two bases with two fine-tunes each), every model resident, with `batch_families` on and
off in alternation. Prints, per setting, the median over the bursts of the burst's TTFT
p50 / max, its time to the last token, and the steps and forwards it took.

    .venv/bin/python bench/families.py [--bursts 10] [--per-model 2] [--max-tokens 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from multimodel import MODELS, OUT, make_store

from edgeserve import EdgeServer
from edgeserve.config import Config, EngineConfig, PoolConfig
from edgeserve.engine import Engine

FORWARDS = [0]
_forward = Engine._forward


def _counted(self: Engine, seqs: list, limit: int) -> None:  # type: ignore[type-arg]
    FORWARDS[0] += 1
    _forward(self, seqs, limit)


async def burst(es: EdgeServer, per_model: int, max_tokens: int, seed: int
                ) -> dict[str, float]:
    start = time.perf_counter()
    ttft: list[float] = []

    async def one(model: str, i: int) -> None:
        prompt = [(seed * 31 + i * 7 + k) % 8000 + 1 for k in range(16)]
        first = True
        async for _ in es.stream_complete(model, prompt, max_tokens=max_tokens,
                                          ignore_eos=True, temperature=0):
            if first:
                ttft.append(time.perf_counter() - start)
                first = False

    engine = es.engine
    assert engine is not None
    steps, forwards = engine.steps, FORWARDS[0]
    await asyncio.gather(*[one(m, n * len(MODELS) + j) for j, m in enumerate(MODELS)
                           for n in range(per_model)])
    return {"ttft_p50_ms": 1000 * statistics.median(ttft), "ttft_max_ms": 1000 * max(ttft),
            "last_token_ms": 1000 * (time.perf_counter() - start),
            "steps": engine.steps - steps, "forwards": FORWARDS[0] - forwards}


async def run(families: bool, bursts: int, per_model: int, max_tokens: int
              ) -> dict[str, object]:
    total = make_store()
    cfg = Config(models=OUT, device="cpu", dtype="float32",
                 pool=PoolConfig(pool_size=total // 2 + (8 << 20)),
                 engine=EngineConfig(batch_families=families))
    async with EdgeServer(config=cfg) as es:
        for model in MODELS:
            await es.load(model)
        await burst(es, 1, 2, -1)                                       # warm-up
        rows = [await burst(es, per_model, max_tokens, b) for b in range(bursts)]
    return {"batch_families": families,
            **{k: round(statistics.median(r[k] for r in rows), 1) for k in rows[0]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=10)
    parser.add_argument("--per-model", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="on/off pairs")
    args = parser.parse_args()
    Engine._forward = _counted  # type: ignore[method-assign]
    for _ in range(args.rounds):
        for families in (True, False):
            print(json.dumps(asyncio.run(run(families, args.bursts, args.per_model,
                                             args.max_tokens))))


if __name__ == "__main__":
    main()
