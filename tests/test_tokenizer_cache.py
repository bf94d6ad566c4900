"""Tokenizers kept by content: equal files are parsed once, changed files again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from edgeserve import EdgeServer
from edgeserve.tokenizer_cache import TokenizerCache, tokenizer_files


@pytest.fixture
def demo_dir(demo_store: Path) -> Path:
    return next(p for p in demo_store.iterdir() if (p / "tokenizer.json").is_file())


def copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in tokenizer_files(src):
        shutil.copy(f, dst / f.name)
    return dst


def test_equal_files_are_parsed_once(demo_dir: Path, tmp_path: Path) -> None:
    cache = TokenizerCache()
    first = cache.load(demo_dir)
    copy = copy_tokenizer(demo_dir, tmp_path / "copy")
    assert cache.load(copy) is first and cache.load(demo_dir) is first
    assert cache.parsed == 1
    (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    changed = cache.load(copy)
    assert changed is not first and cache.parsed == 2
    assert changed.render_chat([{"role": "user", "content": "hi"}]) == "hi"
    assert first.render_chat([{"role": "user", "content": "hi"}]) != "hi"


def test_least_recently_used_goes(demo_dir: Path, tmp_path: Path) -> None:
    cache = TokenizerCache(keep=1)
    copy = copy_tokenizer(demo_dir, tmp_path / "copy")
    (copy / "generation_config.json").write_text('{"eos_token_id": 7}')
    a, b = cache.load(demo_dir), cache.load(copy)
    assert 7 in b.eos_token_ids and a is not b
    assert cache.load(demo_dir) is not a and cache.parsed == 3
    with pytest.raises(FileNotFoundError):
        cache.load(tmp_path / "none")


async def test_models_with_equal_tokenizers_share_one(demo_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(demo_dir, store / "one")
    shutil.copytree(demo_dir, store / "two")
    async with EdgeServer(models=store, device="cpu", pool_size="256MiB") as es:
        await es.load("one")
        await es.load("two")
        assert es.scheduler.tokenizers["one"] is es.scheduler.tokenizers["two"]
        assert es.scheduler.tokenizer_cache.parsed == 1
        out = await es.chat("two", [{"role": "user", "content": "hi"}], max_tokens=3,
                            temperature=0, ignore_eos=True)
        assert len(out.token_ids) == 3


def test_a_file_rewritten_with_its_old_size_and_mtime_is_read_again(demo_dir: Path,
                                                                     tmp_path: Path) -> None:
    import os

    cache = TokenizerCache()
    copy = copy_tokenizer(demo_dir, tmp_path / "copy")
    template = copy / "chat_template.jinja"
    template.write_text("{{ 'A' }}")
    first = cache.load(copy)
    stat = template.stat()
    template.write_text("{{ 'B' }}")                     # same size
    os.utime(template, ns=(stat.st_atime_ns, stat.st_mtime_ns))   # same mtime
    again = cache.load(copy)
    assert again is not first and again.render_chat([{"role": "user", "content": "x"}]) == "B"
