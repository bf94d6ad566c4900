"""Fixtures of the engine's tests."""

from __future__ import annotations

import shutil

import pytest

from edgeserve.config import Config, PoolConfig


@pytest.fixture
def two_models(tmp_path, tiny_store) -> Config:
    """A server's settings over a store of two small models, `llama` and `qwen2`."""
    for arch in ("llama", "qwen2"):
        shutil.copytree(tiny_store / arch, tmp_path / arch)
    return Config(models=tmp_path, device="cpu", pool=PoolConfig(pool_size=32 << 20,
                                                                 block_size=4096))
