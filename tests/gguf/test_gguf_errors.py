"""Broken or unsupported GGUF files: a clean error naming the cause, other models serve on."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf_files import write_gguf
from hf_models import make_model

from edgeserve.api import EdgeServer
from edgeserve.demo import build_demo
from edgeserve.gguf import GGUFError, GGUFFile, ensure_folder
from edgeserve.server import create_app


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-errors")
    hf = make_model("llama", root / "hf", seed=3, hidden_size=256, intermediate_size=256)
    return write_gguf(hf, root / "good.gguf", "Q4_0")


def truncated(good, path):
    data = good.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def unknown_type(good, path):
    path.write_bytes(good.read_bytes())
    reader = gguf.GGUFReader(path, "r+")
    reader.tensors[-1].field.parts[4][0] = 99        # the type id of the last tensor
    reader.data.flush()
    return path


def q2_k(good, path):
    hf = good.parent / "hf"
    return write_gguf(hf, path, "Q4_0", {"blk.1.attn_q.weight": "Q2_K"})


def phi2(path):
    w = gguf.GGUFWriter(str(path), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    _finish(w)
    return path


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_truncated_file_is_named_truncated(good_gguf, tmp_path):
    with pytest.raises(GGUFError, match=r"bad\.gguf.*truncated"):
        GGUFFile(truncated(good_gguf, tmp_path / "bad.gguf"))


def test_unknown_tensor_type_is_named(good_gguf, tmp_path):
    with pytest.raises(GGUFError, match=r"bad\.gguf: tensor type 99 is unknown"):
        GGUFFile(unknown_type(good_gguf, tmp_path / "bad.gguf"))


def test_unsupported_type_and_architecture_are_named(good_gguf, tmp_path):
    with pytest.raises(GGUFError, match=r"'blk\.1\.attn_q\.weight' has type Q2_K.*Q4_K"):
        ensure_folder(q2_k(good_gguf, tmp_path / "q2.gguf"), tmp_path / "q2")
    with pytest.raises(GGUFError, match=r"architecture 'phi2' is not supported"):
        ensure_folder(phi2(tmp_path / "phi.gguf"), tmp_path / "phi")
    assert not (tmp_path / "q2").exists()                  # nothing half written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phi.gguf", "q2.gguf"]


async def test_broken_files_fail_cleanly_while_other_models_serve(good_gguf, tmp_path,
                                                                  aiohttp_client):
    build_demo(tmp_path)
    truncated(good_gguf, tmp_path / "cut.gguf")
    (tmp_path / "odd").mkdir()
    unknown_type(good_gguf, tmp_path / "odd" / "weights.gguf")
    q2_k(good_gguf, tmp_path / "q2.gguf")
    (tmp_path / "tiny.gguf").write_bytes(good_gguf.read_bytes())
    edge = EdgeServer(models=tmp_path, device="cpu", pool_size="256MiB")
    client = await aiohttp_client(create_app(edge))
    listed = {m["id"] for m in (await (await client.get("/v1/models")).json())["data"]}
    assert {"cut", "odd", "q2", "tiny", "demo-llama"} <= listed
    hi = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    for model, cause in [("cut", "truncated"), ("odd", "tensor type 99 is unknown"),
                         ("q2", "has type Q2_K")]:
        resp = await client.post("/v1/chat/completions", json={**hi, "model": model})
        body = await resp.json()
        assert resp.status == 500 and body["error"]["code"] == "model_format_error", body
        assert cause in body["error"]["message"]
        ok = await client.post("/v1/chat/completions", json={**hi, "model": "demo-llama"})
        assert ok.status == 200, await ok.text()
        edge.pools["cpu"].check_integrity()
    shown = await client.post("/api/show", json={"model": "tiny"})     # not loaded yet
    assert shown.status == 200 and "im_start" in (await shown.json())["template"]
    resp = await client.post("/v1/chat/completions", json={**hi, "model": "tiny"})
    assert resp.status == 200, await resp.text()
    assert json.loads(await resp.text())["usage"]["completion_tokens"] == 4
    edge.pools["cpu"].check_integrity()
