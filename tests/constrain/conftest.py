"""A store of tiny random models of every architecture family, sharing the demo tokenizer
(so that grammars have a real byte-level vocabulary to mask)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hf_models import make_model

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3-moe")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")


@pytest.fixture(scope="session")
def family_store(tmp_path_factory: pytest.TempPathFactory, demo_store: Path) -> Path:
    root = tmp_path_factory.mktemp("families")
    demo = demo_store / "demo-llama"
    config = json.loads((demo / "config.json").read_text())
    for seed, arch in enumerate(FAMILIES):
        make_model(arch, root / arch, seed=seed, vocab_size=config["vocab_size"],
                   bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"])
        for name in TOKENIZER_FILES:
            shutil.copy(demo / name, root / arch / name)
    return root
