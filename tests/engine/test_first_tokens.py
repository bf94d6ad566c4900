"""First tokens first: in a step, every group's prefills run before the decodes."""

from __future__ import annotations

import asyncio
import shutil

from edgeserve import EdgeServer
from edgeserve.config import Config, PoolConfig
from engine.spy import record_forwards


async def test_prefills_run_before_decodes_in_a_step(tmp_path, tiny_store, monkeypatch):
    for arch in ("llama", "qwen2"):
        shutil.copytree(tiny_store / arch, tmp_path / arch)
    seen = record_forwards(monkeypatch)
    cfg = Config(models=tmp_path, device="cpu", pool=PoolConfig(pool_size=32 << 20,
                                                                block_size=4096))
    async with EdgeServer(config=cfg) as es:
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
