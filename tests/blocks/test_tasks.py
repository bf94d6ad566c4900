"""Serving tasks: outputs equal transformers on the checkpoint a pack stands for, switches
move only missing blocks, shared blocks are held once, concurrent tasks stay correct."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch
from hf_models import ARCHS, hf_greedy, reference
from safetensors.torch import load_file, save_file

from blocks.conftest import BLOCK
from blocks.finetunes import make_finetune, make_full_finetune, reconstruct
from edgeserve import EdgeServer
from edgeserve.batch import build_batch
from edgeserve.blocks.build import pack_tasks
from edgeserve.blocks.pack import TaskPack
from edgeserve.config import Config, EngineConfig, PoolConfig
from edgeserve.pool import UnitKind

TILE = BLOCK[0] * BLOCK[1] * 4          # bytes of one fp32 block in the pool


def server(store, pool: int = 64 << 20, batch_tasks=True) -> EdgeServer:
    return EdgeServer(config=Config(models=store, device="cpu",
                                    pool=PoolConfig(pool_size=pool, block_size=64 << 10),
                                    engine=EngineConfig(batch_tasks=batch_tasks)))


async def logits_of(es: EdgeServer, model_id: str, ids: list[int]) -> torch.Tensor:
    """All-position logits of one prefill, run on the engine thread as a step would."""
    from edgeserve.blocks.delta import task_delta

    model = es.models[model_id]

    def run() -> torch.Tensor:
        pages: list = []
        model.kv.grow(pages, len(ids))
        try:
            batch = build_batch([(ids, 0, pages)], model.kv.layout.page_tokens,
                                torch.device("cpu"))
            batch.delta = task_delta([model.task])
            return model.forward(batch, all_logits=True)[0]
        finally:
            model.kv.release(pages)

    return await es._engine.run(run)


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.mark.parametrize("budget", [1.0, 0.1])
async def test_task_logits_match_transformers(store, finetunes, tmp_path, budget):
    base, fts = finetunes
    pack_tasks(store / "base", list(fts.values()), store, block=BLOCK, budget=budget)
    ids = torch.randint(0, 320, (19,), generator=torch.Generator().manual_seed(5)).tolist()
    async with server(store) as es:
        for task in fts:
            await es.load(task)
            # At 100% the reference is the fine-tuned checkpoint itself (the LoRA one merged);
            # below, the checkpoint the pack stands for: the base with its blocks written in.
            if budget == 1.0 and task != "task-c":
                ref = reference(fts[task])
            else:
                ref = reference(reconstruct(base, store / task, tmp_path / task))
            with torch.no_grad():
                expected = ref(torch.tensor([ids])).logits[0]
            assert rel_err(await logits_of(es, task, ids), expected) < 1e-4
        with torch.no_grad():
            plain = reference(base)(torch.tensor([ids])).logits[0]
        assert rel_err(await logits_of(es, "task-a", ids), plain) > 1e-2   # it does differ


async def test_a_switch_moves_exactly_the_missing_blocks(store, finetunes):
    _, fts = finetunes
    pack_tasks(store / "base", [fts["task-a"], fts["task-b"]], store, block=BLOCK, budget=0.3)
    a, b = (TaskPack.read(store / t) for t in ("task-a", "task-b"))
    async with server(store) as es:
        await es.load("base")
        first = await es.load("task-a")
        assert first.bytes_from_disk == len(a.keys) * TILE      # the base was resident
        await es.unload("task-a")
        before = es.stats()["loads"]["bytes_from_disk"]
        switch = await es.load("task-b")
        missing = b.keys - a.keys
        assert 0 < len(missing) < len(b.keys)                   # some blocks are shared
        assert switch.bytes_from_disk == len(missing) * TILE
        assert es.stats()["loads"]["bytes_from_disk"] - before == len(missing) * TILE
        back = await es.load("task-a")                          # a's blocks were retained
        assert back.bytes_from_disk == 0
        tasks = es.stats()["devices"]["cpu"]["tasks"]
        assert tasks["blocks"] == len(a.keys | b.keys) + 1     # and one zero block
        assert es.stats()["devices"]["cpu"]["models"]["task-b"]["task_bytes"] == \
            len(b.keys) * TILE


async def test_shared_blocks_are_held_once(store, finetunes):
    _, fts = finetunes
    pack_tasks(store / "base", [fts["task-a"], fts["task-b"]], store, block=BLOCK, budget=1.0)
    a, b = (TaskPack.read(store / t) for t in ("task-a", "task-b"))
    assert a.keys & b.keys                                      # the common change
    async with server(store) as es:
        await es.load("task-a")
        await es.load("task-b")
        (arena,) = es.scheduler.tasks.arenas.values()
        assert len(arena.table) == len(a.keys | b.keys) + 1
        pool = es.pools["cpu"]
        chunks = [u for u in pool.units.values() if u.kind is UnitKind.TASK_BLOCK]
        assert pool.bytes_by_kind()["task_block"] == sum(u.nblocks for u in chunks) * \
            pool.block_size
        # Each load's new blocks fill chunks of their own, just large enough.
        sizes = sorted(u.nbytes for u in chunks)
        need = sorted(-(-n * TILE // arena.min_chunk) * arena.min_chunk
                      for n in (len(a.keys) + 1, len(b.keys - a.keys)))
        assert sizes == need
        pool.check_integrity()
        arena.check()


@pytest.mark.parametrize("batch_tasks", [True, False])
async def test_concurrent_requests_for_different_tasks(store, finetunes, tmp_path, batch_tasks):
    base, fts = finetunes
    pack_tasks(store / "base", list(fts.values()), store, block=BLOCK, budget=0.1)
    prompts = {m: [[3 + i, 40 + 7 * i, 9, 100 + j] for j in range(2)]
               for i, m in enumerate(["base", *fts])}
    expected = {}
    for model, ps in prompts.items():
        path = base if model == "base" else reconstruct(base, store / model, tmp_path / model)
        expected[model] = [hf_greedy(path, p, 10) for p in ps]
    async with server(store, batch_tasks=batch_tasks) as es:
        for model in prompts:
            await es.load(model)
        steps = es._engine.steps
        jobs = [es.complete(m, p, max_tokens=10, temperature=0, ignore_eos=True)
                for m, ps in prompts.items() for p in ps]
        outs = await asyncio.gather(*jobs)
        got = [o.token_ids for o in outs]
        assert got == [t for m in prompts for t in expected[m]]
        assert es._engine.steps > steps
        es.pools["cpu"].check_integrity()


async def test_blocks_are_evicted_under_pressure_and_read_again(store, finetunes, tmp_path):
    base, fts = finetunes
    pack_tasks(store / "base", [fts["task-a"], fts["task-c"]], store, block=BLOCK, budget=1.0)
    async with server(store) as es:                 # measure what the base takes
        await es.load("base")
        base_bytes = es.pools["cpu"].bytes_by_kind()["weight"]
        await es.load("task-a")
        task_bytes = es.stats()["devices"]["cpu"]["tasks"]["chunk_bytes"]
    # Room for the base and the blocks of one task and a half: a and c share none.
    async with server(store, pool=base_bytes + task_bytes * 3 // 2) as es:
        await es.load("task-a")
        await es.unload("task-a")
        await es.load("task-c")       # a's blocks go to make room
        await es.unload("task-c")
        again = await es.load("task-a")
        assert again.bytes_from_disk > 0
        assert es.pools["cpu"].evictions > 0
        out = await es.complete("task-a", [5, 6, 7], max_tokens=6, temperature=0,
                                ignore_eos=True)
        ref = reconstruct(base, store / "task-a", tmp_path / "a")
        assert out.token_ids == hf_greedy(ref, [5, 6, 7], 6)
        es.pools["cpu"].check_integrity()


async def test_listing_and_errors(store, finetunes):
    _, fts = finetunes
    pack_tasks(store / "base", [fts["task-a"]], store, block=BLOCK, budget=0.1)
    from edgeserve.store import ModelStore

    listed = {m.id: m.parent for m in ModelStore(store).list()}
    assert listed == {"base": None, "task-a": "base"}
    raw = json.loads((store / "task-a" / "task.json").read_text())
    (store / "orphan").mkdir()
    (store / "orphan" / "task.json").write_text(json.dumps(raw | {"base": "gone"}))
    (store / "broken").mkdir()
    (store / "broken" / "task.json").write_text(json.dumps(raw))   # no blocks file
    async with server(store) as es:
        with pytest.raises(ValueError, match="base model 'gone' is not in the store"):
            await es.load("orphan")
        with pytest.raises(ValueError, match=r"blocks\.safetensors"):
            await es.load("broken")
        w = store / "base" / "model.safetensors"          # the base changes under the pack
        tensors = load_file(str(w))
        tensors["model.layers.0.mlp.down_proj.weight"] += 1.0
        save_file(tensors, str(w), metadata={"format": "pt"})
        with pytest.raises(ValueError, match="pack the task again"):
            await es.load("task-a")
        es.pools["cpu"].check_integrity()


async def test_tasks_over_http(store, finetunes, aiohttp_client):
    from edgeserve.server import create_app

    _, fts = finetunes
    pack_tasks(store / "base", [fts["task-a"]], store, block=BLOCK, budget=0.1)
    client = await aiohttp_client(create_app(server(store)))
    models = await (await client.get("/v1/models")).json()
    assert {m["id"]: m["parent"] for m in models["data"]} == {"base": None, "task-a": "base"}
    resp = await client.post("/v1/completions", json={"model": "task-a", "prompt": [1, 2, 3],
                                                      "max_tokens": 4, "temperature": 0})
    assert resp.status == 200
    body = await resp.json()
    assert body["model"] == "task-a" and body["usage"]["completion_tokens"] >= 1
    shown = await (await client.post("/api/show", json={"model": "task-a"})).json()
    assert shown["details"]["parent_model"] == "base"
    assert shown["details"]["family"] == "llama"


@pytest.mark.gpu
async def test_tasks_on_cuda_equal_cpu(store, finetunes):
    """Several tasks batched with their base on CUDA (the kernel path) give the CPU's tokens."""
    _, fts = finetunes
    pack_tasks(store / "base", list(fts.values()), store, block=BLOCK, budget=0.3)
    jobs = [(m, [2 + i, 30, 7 * i + 1]) for i, m in enumerate(["base", *fts, "task-a"])]

    async def run(device: str) -> list[list[int]]:
        async with EdgeServer(models=store, device=device, pool_size="256MiB",
                              dtype="float32", block_size="64KiB") as es:
            outs = await asyncio.gather(*[es.complete(m, p, max_tokens=12, temperature=0,
                                                      ignore_eos=True) for m, p in jobs])
            for pool in es.pools.values():
                pool.check_integrity()
            return [o.token_ids for o in outs]

    assert await run("cuda:0") == await run("cpu")


@pytest.mark.parametrize("arch", list(ARCHS))
async def test_every_dense_architecture(arch, tiny_store, tmp_path):
    """Fused q/k/v and gate/up of every layout (biases, q/k norms, other head sizes, tied
    embeddings): a task's logits equal transformers on its reconstructed checkpoint."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store / arch, store / "base")
    ft = make_finetune(store / "base", tmp_path / "ft", 9, block=8, fraction=0.4, prune=1)
    pack_tasks(store / "base", [ft], store, block=(8, 8), budget=0.2, names=["t"])
    ref = reference(reconstruct(store / "base", store / "t", tmp_path / "rec"))
    ids = list(range(3, 20))
    async with server(store) as es:
        await es.load("t")
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0]
        assert rel_err(await logits_of(es, "t", ids), expected) < 1e-4


@pytest.mark.parametrize("arch", list(ARCHS))
async def test_full_finetunes_are_exact_at_full_budget(arch, tiny_store, tmp_path):
    """Every tensor changed (norms, biases, q/k norms, embeddings, a tied head): a 100%
    pack serves the fine-tuned checkpoint itself."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store / arch, store / "base")
    ft = make_full_finetune(store / "base", tmp_path / "ft", 4)
    (report,) = pack_tasks(store / "base", [ft], store, block=(8, 8), budget=1.0, names=["t"])
    assert report.change_error == 0 and report.unpacked == {}
    ids = list(range(3, 20))
    async with server(store) as es:
        await es.load("t")
        with torch.no_grad():
            expected = reference(ft)(torch.tensor([ids])).logits[0]
        assert rel_err(await logits_of(es, "t", ids), expected) < 1e-4


@pytest.mark.parametrize("arch", ["llama-bias", "qwen2"])
async def test_concurrent_full_finetunes_with_their_base(arch, tiny_store, tmp_path):
    """Rows of the base and of two full fine-tunes in one batch: each row gets its own
    biases, norms, embeddings and head."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store / arch, store / "base")
    fts = [make_full_finetune(store / "base", tmp_path / f"ft{i}", 10 + i) for i in range(2)]
    pack_tasks(store / "base", fts, store, block=(8, 8), budget=1.0, names=["t0", "t1"])
    jobs = [("base", store / "base", [5, 9, 2]), ("t0", fts[0], [7, 1, 4, 4]),
            ("t1", fts[1], [3, 8]), ("t0", fts[0], [11, 12])]
    async with server(store) as es:
        outs = await asyncio.gather(*[es.complete(m, p, max_tokens=8, temperature=0,
                                                  ignore_eos=True) for m, _, p in jobs])
    assert [o.token_ids for o in outs] == [hf_greedy(path, p, 8) for _, path, p in jobs]
