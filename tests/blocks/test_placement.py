"""A task loads on the device where its base's units are (a task counts its base plus its
blocks), with the pools of two simulated devices."""

from __future__ import annotations

from blocks.conftest import BLOCK
from edgeserve import EdgeServer
from edgeserve.blocks.build import pack_tasks


async def test_a_task_goes_to_its_bases_device(store, finetunes):
    _, fts = finetunes
    pack_tasks(store / "base", [fts["task-a"]], store, block=BLOCK, budget=0.3)
    async with EdgeServer(models=store, device="cpu:0,cpu:1", pool_size="8MiB,16MiB",
                          block_size="64KiB", prewarm=False) as es:
        await es.load("base", device="cpu:0")
        await es.unload("base")                  # retained: the task needs no base load
        report = await es.load("task-a")
        assert report.device == "cpu:0"
        terms = report.placement["scores"]
        assert terms["cpu:1"]["free_bytes"] > terms["cpu:0"]["free_bytes"]
        # Only the task's blocks are missing on cpu:0; base and blocks on cpu:1.
        assert 0 < terms["cpu:0"]["missing_bytes"] < 0.5 * terms["cpu:1"]["missing_bytes"]
        assert es.models["task-a"].pool is es.pools["cpu:0"]
        out = await es.complete("task-a", [5, 6, 7], max_tokens=4, temperature=0)
        assert out.usage.completion_tokens >= 1
        for pool in es.pools.values():
            pool.check_integrity()
