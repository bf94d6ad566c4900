"""Shared fixtures: tiny checkpoints saved by transformers, made once per session."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from hf_models import ARCHS, make_model  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A model store with one tiny random model per supported architecture."""
    root = tmp_path_factory.mktemp("store")
    for seed, arch in enumerate(ARCHS):      # distinct seeds: no two share their bytes
        make_model(arch, root / arch, seed=seed)
    return root


@pytest.fixture
def family_store(tmp_path, tiny_store) -> Path:
    """Three architectures and a fine-tune of the llama (for placement across devices)."""
    import shutil

    from test_reuse import fine_tune

    root = tmp_path / "store"
    for arch in ("llama", "qwen2", "mistral"):
        shutil.copytree(tiny_store / arch, root / arch)
    fine_tune(root / "llama", root / "llama-ft")
    return root


@pytest.fixture
def twins(tmp_path, tiny_store) -> Path:
    """A store of `llama` and `llama-copy`: equal bytes, never hashed."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store / "llama", store / "llama")
    shutil.copytree(tiny_store / "llama", store / "llama-copy")
    return store


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory) -> Path:
    """A store holding the demo model (real tokenizer and chat template, random weights)."""
    from edgeserve.demo import build_demo

    root = tmp_path_factory.mktemp("demo")
    build_demo(root)
    return root
