"""GGUF entries of the model store: NAME.gguf, or a folder holding one .gguf."""

from __future__ import annotations

import pytest
from gguf_files import write_gguf
from hf_models import make_model

from edgeserve.api import EdgeServer
from edgeserve.gguf.entries import cache_root
from edgeserve.store import ModelStore, UnknownModel


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-entries")
    hf = make_model("qwen2", root / "hf", seed=5, intermediate_size=128)
    return write_gguf(hf, root / "tiny.gguf", "Q4_1")


def test_gguf_files_and_folders_are_models(tiny_gguf, tmp_path):
    (tmp_path / "alpha.gguf").write_bytes(tiny_gguf.read_bytes())
    (tmp_path / "beta").mkdir()
    (tmp_path / "beta" / "any-name.Q4_1.gguf").write_bytes(tiny_gguf.read_bytes())
    (tmp_path / "two").mkdir()                     # two files: which one is unclear
    for n in ("a", "b"):
        (tmp_path / "two" / f"{n}.gguf").write_bytes(tiny_gguf.read_bytes())
    (tmp_path / "notes.txt").write_text("not a model")
    store = ModelStore(tmp_path)
    listed = {m.id: m for m in store.list()}
    assert set(listed) == {"alpha", "beta"}
    assert listed["alpha"].size_bytes == tiny_gguf.stat().st_size
    for name in ("two", "notes", "alpha.gguf"):
        with pytest.raises(UnknownModel):
            store.path(name)
    folder = store.prepare("beta")
    assert folder == cache_root(tmp_path.resolve()) / "beta" == store.path("beta")
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    assert store.prepare("beta") == folder                      # current: not remade
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    assert {m.id for m in store.list()} == {"alpha", "beta"}    # the cache is not a model


async def test_gguf_model_and_its_tags_generate(tiny_gguf, tmp_path):
    (tmp_path / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    async with EdgeServer(models=tmp_path, device="cpu", pool_size="256MiB") as es:
        report = await es.load("tiny")
        assert report.scheme == "int4"
        tagged = await es.load("tiny:int8")     # quantized from the dequantized file
        assert tagged.scheme == "int8"
        for model in ("tiny", "tiny:int8"):
            out = await es.complete(model, [5, 6, 7], max_tokens=6, temperature=0)
            assert out.usage.completion_tokens >= 1
        es.pools["cpu"].check_integrity()
        assert {m.id: m.tag for m in es.store.list()} == {"tiny": None, "tiny:int8": "int8"}
