"""A tiny Llama base in a store, and fine-tunes of it made outside the store."""

from __future__ import annotations

from pathlib import Path

import pytest
from hf_models import make_model

from blocks.finetunes import common_change, make_finetune, make_lora

BLOCK = (16, 16)


@pytest.fixture(scope="session")
def finetunes(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    """(base folder, task id -> fine-tuned folder): task-a has 2 pruned blocks, task-a and
    task-b share a change exactly (tuned from one intermediate), task-c is a LoRA adapter."""
    root = tmp_path_factory.mktemp("base")
    base = make_model("llama", root / "base", seed=3)
    out = tmp_path_factory.mktemp("finetunes")
    common = common_change(base, 7)
    return base, {"task-a": make_finetune(base, out / "task-a", 11, common=common, prune=2),
                  "task-b": make_finetune(base, out / "task-b", 12, common=common),
                  "task-c": make_lora(base, out / "task-c", 13)}


@pytest.fixture
def store(tmp_path, finetunes) -> Path:
    """A fresh store holding the base (as a symlink-free copy)."""
    import shutil

    base, _ = finetunes
    root = tmp_path / "store"
    shutil.copytree(base, root / "base")
    return root
