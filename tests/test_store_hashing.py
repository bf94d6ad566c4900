"""Store hashing: never-hashed files hashed in idle time into the cache loads read; it
yields to requests at once, is off when switched off, and follows changed files."""

from __future__ import annotations

import os
import shutil
import threading

from hf_models import make_model
from safetensors.torch import load_file, save_file
from test_reuse import fine_tune
from test_scheduler import wait_for

from edgeserve import EdgeServer, store_hashing
from edgeserve.blocks.build import pack_tasks
from edgeserve.checkpoint import HashCache, hash_file, read_header
from edgeserve.cli import build_parser, edge_server
from edgeserve.config import Config, PoolConfig, SchedulerConfig, TierConfig, from_env
from edgeserve.store_hashing import plan


def server(store, idle: bool = True, policy: str = "edgeserve") -> EdgeServer:
    return EdgeServer(config=Config(
        models=store, device="cpu", pool=PoolConfig(pool_size=16 << 20, block_size=4096),
        tiers=TierConfig(policy=policy),
        scheduler=SchedulerConfig(prewarm=False, first_sight=True, idle_hashing=idle)))


def file_of(store, model: str):
    return store / model / "model.safetensors"


def tensor_bytes(path) -> int:
    return sum(t.nbytes for t in read_header(path))


def hashed(es: EdgeServer) -> int:
    return int(es.stats()["idle_hashing"]["files"])


async def keys_after_load(es: EdgeServer, model: str) -> dict[str, str | None]:
    await es.load(model)
    es.pools["cpu"].check_integrity()
    return {n: u.key for n, u in es.models[model].units.items()}


async def test_idle_time_hashes_never_seen_files_for_their_first_load(twins):
    async with server(twins) as es:
        await wait_for(lambda: hashed(es) == 2)
        cache = es.scheduler.hashes
        for model in ("llama", "llama-copy"):
            assert cache.cached(file_of(twins, model)) == hash_file(file_of(twins, model))
        nbytes = 2 * tensor_bytes(file_of(twins, "llama"))
        assert es.stats()["idle_hashing"]["bytes"] == nbytes
        metrics = es.metrics.render().decode()
        assert "edgeserve:idle_hashed_files 2.0" in metrics
        assert f"edgeserve:idle_hashed_bytes {float(nbytes)}" in metrics
        keys = await keys_after_load(es, "llama")
        assert (cache.streamed, cache.computed) == (0, 0)     # a load with cached hashes
        report = await es.load("llama-copy")
        assert report.bytes_from_disk == 0                    # matched unit by unit
        assert (cache.streamed, cache.computed) == (0, 0)
        assert await keys_after_load(es, "llama-copy") == keys
    shutil.rmtree(twins / ".edgeserve")
    async with server(twins, idle=False) as es:               # first sight, then cached
        first = await keys_after_load(es, "llama")
        assert es.scheduler.hashes.streamed == 1
    async with server(twins, idle=False) as es:
        assert await keys_after_load(es, "llama") == first == keys
        assert es.scheduler.hashes.computed == 0


async def test_a_request_does_not_wait_for_the_file_being_hashed(twins, monkeypatch):
    """The hashing is held inside its third chunk's read; a request arriving then runs to
    its end meanwhile, and no chunk is read while the server is busy."""
    monkeypatch.setattr(store_hashing, "CHUNK", 4096)
    held, release = threading.Event(), threading.Event()
    busy_at_read: list[bool] = []
    read_into = store_hashing.read_into

    def read(path, offset, view):
        engine, loading = es.engine, es.scheduler._loading
        busy_at_read.append(engine.num_running + engine.num_waiting > 0 or bool(loading))
        if len(busy_at_read) == 3:
            held.set()
            release.wait(10)
        read_into(path, offset, view)

    monkeypatch.setattr(store_hashing, "read_into", read)
    async with server(twins) as es:
        await wait_for(held.is_set)
        out = await es.complete("llama", [1, 2, 3], max_tokens=4, temperature=0,
                                ignore_eos=True)
        assert len(out.token_ids) == 4 and not release.is_set()  # done while hashing is held
        assert len(busy_at_read) == 3 and hashed(es) == 0
        release.set()
        await wait_for(lambda: es.stats()["idle_hashing"]["yielded"] == 1)
        await wait_for(lambda: es.stats()["idle_hashing"]["pending"] == 0 and hashed(es) >= 1)
        assert not any(busy_at_read)
        assert es.scheduler.hashes.streamed == 1     # llama: its load hashed it as it read
        copy = file_of(twins, "llama-copy")
        assert es.scheduler.hashes.cached(copy) == hash_file(copy)
        es.pools["cpu"].check_integrity()


async def test_off_hashes_nothing(twins, monkeypatch):
    monkeypatch.setattr(store_hashing, "TICK", 0.001)
    for kw in ({"idle": False}, {"policy": "ollama"}):          # ollama: keys of no use
        async with server(twins, **kw) as es:
            assert es.stats()["idle_hashing"]["enabled"] is False
            await es.complete("llama", [1, 2], max_tokens=2)
            await es.unload("llama")
            for _ in range(20):                 # idle ticks go by: nothing is hashed
                await es.scheduler.idle_hashing.tick()
            assert hashed(es) == 0
            assert es.scheduler.hashes.cached(file_of(twins, "llama-copy")) is None


def test_the_switch_from_the_environment_and_the_command_line(monkeypatch):
    assert SchedulerConfig().idle_hashing is True
    monkeypatch.setenv("EDGESERVE_IDLE_HASHING", "off")
    cfg = from_env()
    assert cfg.scheduler.idle_hashing is False
    args = build_parser(cfg).parse_args(["serve"])
    assert args.idle_hashing == "off"
    args = build_parser(cfg).parse_args(["serve", "--idle-hashing", "on"])
    assert edge_server(args).config.scheduler.idle_hashing is True
    assert EdgeServer(idle_hashing=True).config.scheduler.idle_hashing is True   # over the env


def change(path) -> None:
    tensors = load_file(path)
    name = sorted(n for n in tensors if n.endswith("q_proj.weight"))[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, path, metadata={"format": "pt"})
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


async def test_a_file_changed_after_its_hashing_is_hashed_again(twins, monkeypatch):
    monkeypatch.setattr(store_hashing, "RESCAN", 0.05)
    copy = file_of(twins, "llama-copy")
    async with server(twins) as es:
        await wait_for(lambda: hashed(es) == 2)
        cache = es.scheduler.hashes
        old = cache.cached(copy)
        keys = await keys_after_load(es, "llama")
        change(copy)
        assert cache.cached(copy) is None                     # its stamp no longer holds
        await wait_for(lambda: hashed(es) == 3)
        assert cache.cached(copy) == hash_file(copy) != old
        changed = await keys_after_load(es, "llama-copy")
        assert (cache.streamed, cache.computed) == (0, 0)
        assert sum(keys[n] != changed[n] for n in keys) == 1  # the unit of the changed tensor
        es.pools["cpu"].check_integrity()


async def test_a_file_changed_while_being_hashed_is_hashed_again(twins, monkeypatch):
    monkeypatch.setattr(store_hashing, "CHUNK", 4096)
    copy = file_of(twins, "llama-copy")
    shutil.rmtree(twins / "llama")
    changed = threading.Event()
    read_into = store_hashing.read_into

    def read(path, offset, view):
        if not changed.is_set():
            changed.set()
            change(path)
        read_into(path, offset, view)

    monkeypatch.setattr(store_hashing, "read_into", read)
    async with server(twins) as es:
        await wait_for(lambda: hashed(es) == 1)
        assert es.scheduler.hashes.cached(copy) == hash_file(copy)


def test_files_of_models_like_the_resident_ones_come_first(tmp_path, tiny_store):
    root = tmp_path / "store"
    for name in ("mistral", "llama", "qwen2"):
        shutil.copytree(tiny_store / "llama", root / name)
    make_model("llama", root / "other", seed=3, hidden_size=32, intermediate_size=48)
    entries = [(p.name, p) for p in sorted(root.iterdir())]   # llama mistral other qwen2
    cache = HashCache(root)
    resident = [root / "llama"]
    order = [p.parent.name for p, _ in plan(entries, cache, resident, {"other": 2.0})]
    assert order == ["llama", "mistral", "qwen2", "other"]    # shapes first, then demand
    order = [p.parent.name for p, _ in plan(entries, cache, [], {"qwen2": 1.0, "other": 2.0})]
    assert order == ["other", "qwen2", "llama", "mistral"]
    cache.get(root / "mistral" / "model.safetensors")
    assert [p.parent.name for p, _ in plan(entries, cache, resident, {})] == \
        ["llama", "qwen2", "other"]
    assert plan(entries, cache, resident, {}, lambda: False) is None


async def test_a_task_pack_s_base_is_hashed_with_blake2b_too(tmp_path, tiny_store):
    store = tmp_path / "store"
    shutil.copytree(tiny_store / "llama", store / "llama")
    tuned = fine_tune(store / "llama", tmp_path / "tuned")
    pack_tasks(store / "llama", [tuned], store, block=(16, 16), budget=1.0, names=["task"])
    shutil.rmtree(store / ".edgeserve")                          # a fresh store
    base = file_of(store, "llama")
    async with server(store) as es:
        await wait_for(lambda: hashed(es) == 2)
        cache = es.scheduler.hashes
        assert cache.cached(base, "blake2b") == hash_file(base, "blake2b")
        assert cache.cached(base) == hash_file(base)
        await es.load("task")                                    # checked against them
        assert cache.computed == 0
        es.pools["cpu"].check_integrity()
