"""Calls on the step thread (a load's placement and allocation) are served between the
forwards of a step, not only between steps."""

from __future__ import annotations

import asyncio
import time

from edgeserve import EdgeServer
from edgeserve.engine import Engine


async def test_a_call_runs_between_two_forwards_of_one_step(two_models, monkeypatch):
    log: list[tuple[str, int]] = []
    forward = Engine._forward

    def slow(self, seqs, limit):
        log.append(("forward", self.steps))
        time.sleep(0.02)                    # a forward long enough for calls to arrive
        return forward(self, seqs, limit)

    monkeypatch.setattr(Engine, "_forward", slow)
    async with EdgeServer(config=two_models) as es:
        for model in ("llama", "qwen2"):
            await es.load(model)
        work = [asyncio.create_task(es.complete(m, [3, 4, 5], max_tokens=30, ignore_eos=True))
                for m in ("llama", "qwen2")]
        engine = es.engine
        assert engine is not None
        while not log:
            await asyncio.sleep(0.001)
        for _ in range(20):
            await engine.run(lambda: log.append(("call", engine.steps)))
        await asyncio.gather(*work)
    inside = [i for i, (kind, step) in enumerate(log) if kind == "call"
              and 0 < i < len(log) - 1 and log[i - 1] == ("forward", step)
              and log[i + 1] == ("forward", step)]
    assert len(inside) >= 5                 # most calls wait for one forward, not a step
