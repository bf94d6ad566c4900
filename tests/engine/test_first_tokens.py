"""First tokens first: in a step, every group's prefills run before the decodes."""

from __future__ import annotations

import asyncio

from edgeserve import EdgeServer
from engine.spy import record_forwards


async def test_prefills_run_before_decodes_in_a_step(two_models, monkeypatch):
    seen = record_forwards(monkeypatch)
    async with EdgeServer(config=two_models) as es:
        for model in ("llama", "qwen2"):
            await es.load(model)
        long = [asyncio.create_task(es.complete(m, [3, 4, 5], max_tokens=40, ignore_eos=True))
                for m in ("llama", "qwen2")]
        while len(seen) < 6:
            await asyncio.sleep(0.001)
        late = await asyncio.gather(*[es.complete(m, [7, 8, 9, 10], max_tokens=2)
                                      for m in ("qwen2", "llama")])
        await asyncio.gather(*long)
    assert all(len(out.token_ids) == 2 for out in late)
    steps: dict[int, list[bool]] = {}
    for step, _, prefill in seen:
        steps.setdefault(step, []).append(prefill)
    mixed = [kinds for kinds in steps.values() if any(kinds) and not all(kinds)]
    assert mixed                                    # the late requests joined running ones
    for kinds in mixed:
        assert kinds == sorted(kinds, reverse=True)  # every prefill before every decode
