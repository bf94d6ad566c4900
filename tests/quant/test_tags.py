"""Tags in every API: the Python EdgeServer, OpenAI, Ollama and admin routes; the default
scheme of untagged ids; the second cold load reading only the quantized bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgeserve import EdgeServer
from edgeserve.cli import build_parser
from edgeserve.config import from_env
from edgeserve.demo import build_demo
from edgeserve.server import create_app
from edgeserve.store import ModelStore, split_tag

MODEL = "demo-llama"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    build_demo(tmp_path)         # a store of its own: quantized variants get listed
    return tmp_path


def check(es: EdgeServer) -> None:
    for pool in es.pools.values():
        pool.check_integrity()


def test_split_tag_and_store_paths(store: Path) -> None:
    assert split_tag("a:int8") == ("a", "int8") and split_tag("a:int4") == ("a", "int4")
    assert split_tag("a:latest") == ("a:latest", None) and split_tag("a") == ("a", None)
    s = ModelStore(store)
    assert s.path(f"{MODEL}:int8") == s.path(MODEL)
    assert [m.id for m in s.list()] == [MODEL]            # nothing quantized yet


async def test_second_cold_load_reads_only_the_quantized_bytes(store: Path,
                                                               monkeypatch: Any) -> None:
    async with EdgeServer(models=store, device="cpu", pool_size="256MiB") as es:
        first = await es.load(f"{MODEL}:int8")
        fp32 = await es.load(MODEL)
        out = await es.chat(f"{MODEL}:int8", [{"role": "user", "content": "hi"}],
                            max_tokens=4, temperature=0)
        assert len(out.token_ids) == 4
        check(es)
    assert first.scheme == "int8" and first.quantize_seconds > 0
    assert first.bytes_total < 0.3 * fp32.bytes_total
    read: list[str] = []
    import edgeserve.tiers as tiers

    real = tiers.read_into
    monkeypatch.setattr(tiers, "read_into", lambda p, o, b: (read.append(str(p)),
                                                             real(p, o, b))[1])
    async with EdgeServer(models=store, device="cpu", pool_size="256MiB") as es:
        again = await es.load(f"{MODEL}:int8")
        check(es)
    assert again.quantize_seconds == 0 and again.source == first.source
    assert again.bytes_from_disk == again.bytes_total == first.bytes_total
    assert read and set(read) == {str(Path(first.source) / "model.safetensors")}


async def test_default_scheme_for_untagged_ids(store: Path, monkeypatch: Any) -> None:
    async with EdgeServer(models=store, device="cpu", pool_size="256MiB",
                          quantize="int4") as es:
        report = await es.load(MODEL)
        assert report.scheme == "mixed"          # int4 linears, int8 embeddings
        assert es.models[MODEL].schemes["model.layers.0.self_attn.qkv_proj.weight"] == "int4"
        tagged = await es.load(f"{MODEL}:int8")          # a tag still wins
        assert tagged.scheme == "int8"
        check(es)
    monkeypatch.setenv("EDGESERVE_QUANTIZE", "int8")
    assert from_env().quantize == "int8"
    monkeypatch.setenv("EDGESERVE_QUANTIZE", "int5")
    with pytest.raises(ValueError, match="int8 or int4"):
        from_env()
    monkeypatch.delenv("EDGESERVE_QUANTIZE")
    args = build_parser(from_env(quantize="int4")).parse_args(["serve", "--quantize", "int8"])
    assert args.quantize == "int8"


async def test_tags_over_http(aiohttp_client: Any, store: Path) -> None:
    es = EdgeServer(models=store, device="cpu", pool_size="256MiB")
    client = await aiohttp_client(create_app(es))
    resp = await client.post(f"/admin/models/{MODEL}:int8/load")
    assert resp.status == 200 and (await resp.json())["scheme"] == "int8"
    body = {"model": f"{MODEL}:int4", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3, "temperature": 0}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 200 and (await resp.json())["model"] == f"{MODEL}:int4"
    resp = await client.post("/api/chat", json={**body, "model": f"{MODEL}:int8",
                                                "stream": False})
    assert resp.status == 200 and (await resp.json())["model"] == f"{MODEL}:int8"
    models = {m["id"]: m for m in (await (await client.get("/v1/models")).json())["data"]}
    assert set(models) == {MODEL, f"{MODEL}:int8", f"{MODEL}:int4"}
    assert models[f"{MODEL}:int4"]["parent"] == MODEL
    tags = {m["name"]: m for m in (await (await client.get("/api/tags")).json())["models"]}
    assert tags[f"{MODEL}:int8"]["details"]["quantization_level"] == "INT8"
    assert tags[MODEL]["details"]["quantization_level"] == "F32"
    assert tags[f"{MODEL}:int4"]["size"] < tags[MODEL]["size"] / 4
    show = await (await client.post("/api/show", json={"model": f"{MODEL}:int4"})).json()
    assert show["details"]["quantization_level"] == "INT4"
    ps = {m["name"] for m in (await (await client.get("/api/ps")).json())["models"]}
    assert ps == {f"{MODEL}:int8", f"{MODEL}:int4"}
    resp = await client.post(f"/admin/models/{MODEL}:int8/unload")
    assert resp.status == 200
    resp = await client.post("/v1/chat/completions", json={**body, "model": f"{MODEL}:int3"})
    assert resp.status == 404
    check(es)
