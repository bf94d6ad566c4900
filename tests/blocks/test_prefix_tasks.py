"""Prefix KV reuse with tasks: a task's pages are its own, and outputs equal reuse off."""

from __future__ import annotations

from blocks.conftest import BLOCK
from edgeserve import EdgeServer
from edgeserve.blocks.build import pack_tasks
from edgeserve.config import Config, EngineConfig, PoolConfig


async def test_tasks_reuse_their_own_prefixes_only(store, finetunes):
    _, fts = finetunes
    pack_tasks(store / "base", [fts["task-a"], fts["task-b"]], store, block=BLOCK, budget=0.3)
    prompt = [3 + (7 * i) % 300 for i in range(70)]
    outs: dict[bool, dict[str, list]] = {}
    for reuse in (False, True):
        config = Config(models=store, device="cpu",
                        pool=PoolConfig(pool_size=64 << 20, block_size=4 << 10),
                        engine=EngineConfig(prefix_cache=reuse))
        async with EdgeServer(config=config) as es:
            got: dict[str, list] = {}
            for model in ("base", "task-a", "task-b", "task-a", "base"):
                out = await es.complete(model, prompt, max_tokens=6, temperature=0,
                                        ignore_eos=True)
                got.setdefault(model, []).append(out)
            es.pools["cpu"].check_integrity()
            page = es.models["base"].kv.layout.page_tokens
        outs[reuse] = got
    for model, runs in outs[True].items():
        assert [o.token_ids for o in runs] == [o.token_ids for o in outs[False][model]]
        # The first run of each model finds nothing (tasks change the KV), its second finds
        # every full page of the prompt.
        assert runs[0].usage.cached_tokens == 0
        assert all(o.usage.cached_tokens == (len(prompt) - 1) // page * page for o in runs[1:])
