"""A file seen for the first time is hashed by the reader threads as it loads: the same
units and keys as a load with cached hashes, and no second pass over the file."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hf_models import hf_greedy, make_model

from edgeserve import EdgeServer
from edgeserve.checkpoint import HashCache, hash_file
from edgeserve.config import Config, PoolConfig, SchedulerConfig


def server(store, device: str = "cpu", **kw) -> EdgeServer:
    config = Config(models=store, device=device,
                    pool=PoolConfig(pool_size=kw.pop("pool_size", 16 << 20),
                                    block_size=kw.pop("block_size", 4096)),
                    scheduler=SchedulerConfig(prewarm=False, first_sight=True,
                                              idle_hashing=False), **kw)
    return EdgeServer(config=config)


async def keys_of(store, model_id: str) -> tuple[dict[str, str | None], dict[str, int], int]:
    async with server(store) as es:
        report = await es.load(model_id)
        units = es.models[model_id].units
        es.pools["cpu"].check_integrity()
        hashes = es.scheduler.hashes
        out = await es.complete(model_id, [4, 8, 15, 16], max_tokens=5, temperature=0,
                                ignore_eos=True)
        assert out.token_ids == hf_greedy(store / model_id, [4, 8, 15, 16], 5)
        assert report.bytes_from_disk == report.bytes_total > 0
        return ({n: u.key for n, u in units.items()}, {n: u.nbytes for n, u in units.items()},
                hashes.streamed * 100 + hashes.computed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # direct and staged reads
async def test_first_sight_gives_the_keys_of_cached_hashes(tmp_path, dtype):
    store = tmp_path / "store"
    make_model("qwen2", store / "qwen2", seed=5, dtype=dtype)
    first, sizes, counts = await keys_of(store, "qwen2")
    assert counts == 101                    # hashed once, while the load read the file
    assert all(first.values())
    again, sizes_again, counts = await keys_of(store, "qwen2")
    assert counts == 0                      # the cache made by the first sight serves
    assert again == first and sizes_again == sizes
    file = store / "qwen2" / "model.safetensors"
    assert HashCache(store).cached(file) == hash_file(file)       # a separate pass agrees


async def test_legacy_blake2b_entries_are_kept_apart(tmp_path):
    store = tmp_path / "store"
    make_model("llama", store / "llama", seed=6)
    file = store / "llama" / "model.safetensors"
    legacy = HashCache(store).get(file, "blake2b")
    keys, _, counts = await keys_of(store, "llama")
    assert all(keys.values())
    assert counts == 101                    # blake3 hashes made once, by the load
    cache = HashCache(store)
    assert cache.cached(file, "blake2b") == legacy != cache.cached(file)


async def test_units_found_resident_after_the_read_are_released(twins):
    store = twins
    async with server(store) as es:
        await es.load("llama")
        pool = es.pools["cpu"]
        held = pool.bytes_by_kind()["weight"]
        # Pretend no resident unit could match, so the copy streams its hashes.
        es.scheduler.placer.resident_sizes = lambda: set()  # type: ignore[method-assign]
        report = await es.load("llama-copy")
        assert es.scheduler.hashes.streamed == 2          # both files, while read
        assert report.bytes_released == report.bytes_total == report.bytes_from_device
        assert report.bytes_from_disk == 0
        assert pool.bytes_by_kind()["weight"] == held
        ids = {u.id for u in es.models["llama"].units.values()}
        assert {u.id for u in es.models["llama-copy"].units.values()} == ids
        pool.check_integrity()
        out = await es.complete("llama-copy", [1, 2, 3], max_tokens=4, temperature=0,
                                ignore_eos=True)
        assert out.token_ids == hf_greedy(store / "llama", [1, 2, 3], 4)


@pytest.mark.gpu
async def test_first_sight_on_cuda_gives_the_keys_of_the_cpu(tmp_path):
    """On CUDA the reads are staged through pinned buffers: the readers hash those."""
    store = tmp_path / "store"
    make_model("llama", store / "llama", seed=8, dtype=torch.bfloat16)
    keys = {}
    for device in ("cuda", "cpu"):
        async with server(store, device, pool_size=64 << 20, block_size=None,
                          dtype="float32") as es:
            await es.load("llama")
            keys[device] = {n: u.key for n, u in es.models["llama"].units.items()}
            assert es.scheduler.hashes.streamed == (1 if device == "cuda" else 0)
    assert keys["cuda"] == keys["cpu"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_hashes_equal_a_hashing_pass_in_any_chunking(tmp_path, dtype):
    from safetensors.torch import save_file

    from edgeserve.checkpoint import StreamHashes, read_header, tensor_hasher
    from edgeserve.tiers import DiskJob, DiskLoader, ReadOptions

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(997 * i + 5, generator=g).to(dtype) for i in range(12)}
    file = tmp_path / "m.safetensors"
    save_file(tensors, file)
    raw = file.read_bytes()
    expected = {}
    for t in read_header(file):
        h = tensor_hasher(t)
        h.update(raw[t.start:t.end])
        expected[t.name] = h.hexdigest()
    for chunk in (4096, 1 << 20):
        assert hash_file(file, chunk=chunk) == expected
        streamed = StreamHashes()
        jobs = [DiskJob(t, torch.empty(t.shape, dtype=torch.float32)) for t in read_header(file)]
        DiskLoader(readers=3, chunk=chunk).load(jobs[:-2], options=ReadOptions(streamed))
        assert streamed.complete(file) == expected        # the last two: hashed after
        for job in jobs[:-2]:
            assert torch.equal(job.dest, tensors[job.tensor.name].float())


async def test_a_file_that_may_share_is_hashed_before_the_load_s_turn(twins):
    store = twins
    async with server(store) as es:
        await es.load("llama")
        hashes, grouping = es.scheduler.hashes, es.scheduler.grouping
        before = hashes.computed
        grouping.holder = object()  # type: ignore[assignment]    # another load's turn
        load = asyncio.create_task(es.load("llama-copy"))
        for _ in range(400):                     # hashed while it waits, not in its turn
            if hashes.computed > before:
                break
            await asyncio.sleep(0.005)
        assert hashes.computed == before + 1 and not load.done()
        grouping.holder = None
        report = await load
        assert report.bytes_from_device == report.bytes_total and report.bytes_released == 0
        assert hashes.computed == before + 1     # not hashed again in the turn
        es.pools["cpu"].check_integrity()


async def test_a_model_of_another_lineage_is_read_once_not_hashed_first(tmp_path, twins,
                                                                       monkeypatch):
    """Same architecture (every unit of a resident unit's size), other weights: two units
    are keyed to find that out, then the file is read once, hashed as it streams in (every
    tensor hashed once, the probe's included)."""
    from test_reuse import fine_tune

    import edgeserve.checkpoint as checkpoint

    store = twins
    make_model("llama", store / "stranger", seed=7)
    fine_tune(store / "llama", store / "llama-ft")
    async with server(store) as es:
        await es.load("llama")
        hashes = es.scheduler.hashes
        before = (hashes.computed, hashes.streamed, hashes.probed)
        hashed: list[str] = []
        real = checkpoint.tensor_hasher

        def counting(t, algorithm=checkpoint.ALGORITHM):
            hashed.append(t.name)
            return real(t, algorithm)

        monkeypatch.setattr(checkpoint, "tensor_hasher", counting)
        report = await es.load("stranger")
        monkeypatch.undo()
        assert (hashes.computed, hashes.streamed, hashes.probed) == \
            (before[0] + 1, before[1] + 1, before[2] + 1)   # one probe, no second pass
        names = [t.name for t in checkpoint.read_header(store / "stranger" / "model.safetensors")]
        assert sorted(hashed) == sorted(names)               # each tensor hashed once
        assert report.bytes_from_disk == report.bytes_total and report.bytes_released == 0
        keys = {n: u.key for n, u in es.models["stranger"].units.items()}
        # A fine-tune of the resident base is hashed whole first, and pins what it finds.
        report = await es.load("llama-ft")
        assert hashes.computed == before[0] + 2 and hashes.streamed == before[1] + 1
        assert hashes.probed == before[2] + 2
        assert report.bytes_released == 0 < report.bytes_from_device
        es.pools["cpu"].check_integrity()
        out = await es.complete("stranger", [1, 2, 3], max_tokens=4, temperature=0,
                                ignore_eos=True)
        assert out.token_ids == hf_greedy(store / "stranger", [1, 2, 3], 4)
    async with server(store) as es:                   # cached hashes: the same keys
        await es.load("stranger")
        assert {n: u.key for n, u in es.models["stranger"].units.items()} == keys


async def test_a_sharded_relative_is_hashed_whole_first(tmp_path, twins):
    """The unit that decides is found in whichever shard holds it; every shard is then
    hashed before the load, which pins the base's units instead of reading them."""
    from test_reuse import fine_tune
    from transformers import AutoModelForCausalLM

    store = twins
    fine_tune(store / "llama", tmp_path / "ft")
    AutoModelForCausalLM.from_pretrained(tmp_path / "ft").save_pretrained(
        store / "llama-ft", max_shard_size="100KB")
    shards = len(list((store / "llama-ft").glob("model-*.safetensors")))
    assert shards > 1
    async with server(store) as es:
        await es.load("llama")
        hashes = es.scheduler.hashes
        before = (hashes.computed, hashes.streamed)
        report = await es.load("llama-ft")
        assert (hashes.computed, hashes.streamed) == (before[0] + shards, before[1])
        assert hashes.probed >= 1 and report.bytes_released == 0
        assert 0 < report.bytes_from_disk < report.bytes_from_device
        es.pools["cpu"].check_integrity()
        out = await es.complete("llama-ft", [1, 2, 3], max_tokens=4, temperature=0,
                                ignore_eos=True)
        assert out.token_ids == hf_greedy(store / "llama-ft", [1, 2, 3], 4)


def test_a_pass_after_a_probe_hashes_only_the_rest(tmp_path, monkeypatch):
    import edgeserve.checkpoint as checkpoint

    path = make_model("llama", tmp_path / "m") / "model.safetensors"
    whole = hash_file(path)
    probe = "model.embed_tokens.weight"
    asked: list[set[str] | None] = []
    real = checkpoint.hash_file

    def counting(p, algorithm="blake3", chunk=checkpoint.HASH_CHUNK, only=None):
        asked.append(only)
        return real(p, algorithm, chunk, only)

    monkeypatch.setattr(checkpoint, "hash_file", counting)
    cache = HashCache(tmp_path)
    assert cache.some(path, {probe}) == {probe: whole[probe]}
    assert cache.some(path, {probe}) == {probe: whole[probe]}      # kept: not hashed again
    assert cache.cached(path) is None and cache.probed == 1
    assert cache.get(path) == whole and cache.cached(path) == whole
    assert asked == [{probe}, set(whole) - {probe}]


async def test_a_relative_of_a_queued_load_is_hashed_before_its_turn(twins):
    """The base is not in the pool yet, only queued (its hashes cached): a relative queued
    behind it is still found to share, and hashed whole while both wait."""
    store = twins
    HashCache(store).get(store / "llama" / "model.safetensors")
    async with server(store) as es:
        hashes, grouping = es.scheduler.hashes, es.scheduler.grouping
        grouping.holder = object()  # type: ignore[assignment]    # another load's turn
        base = asyncio.create_task(es.load("llama"))
        for _ in range(400):
            if "llama" in es.scheduler.placer.queued:
                break
            await asyncio.sleep(0.005)
        copy = asyncio.create_task(es.load("llama-copy"))
        for _ in range(400):                    # hashed while it waits, not in its turn
            if hashes.computed:
                break
            await asyncio.sleep(0.005)
        assert hashes.computed == 1 and hashes.probed == 1 and not copy.done()
        grouping.holder = None
        reports = [await base, await copy]
        assert sum(r.bytes_from_disk for r in reports) == reports[0].bytes_total
        assert all(r.bytes_released == 0 for r in reports) and hashes.streamed == 0
        es.pools["cpu"].check_integrity()
