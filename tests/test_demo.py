"""The demo model: Hugging Face layout that transformers loads, built fast and reproducibly."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from edgeserve import demo
from edgeserve.demo import build_demo

FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "README.md",
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    start = time.perf_counter()
    path = build_demo(tmp_path_factory.mktemp("models"))
    return path, time.perf_counter() - start


@pytest.fixture(scope="module")
def folder(built: tuple[Path, float]) -> Path:
    return built[0]


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def test_layout(folder: Path) -> None:
    assert folder.name == "demo-llama"
    assert {p.name for p in folder.iterdir()} == FILES
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left
    assert "random" in (folder / "README.md").read_text()


def test_build_is_fast(built: tuple[Path, float]) -> None:
    assert built[1] < 60


def test_config(folder: Path) -> None:
    cfg = _json(folder / "config.json")
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    expected = {
        "model_type": "llama",
        "hidden_size": 256,
        "intermediate_size": 704,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    assert {k: cfg[k] for k in expected} == expected
    vocab = _json(folder / "tokenizer.json")["model"]["vocab"]
    assert 2000 <= len(vocab) <= 4000
    assert cfg["vocab_size"] % 64 == 0 and len(vocab) <= cfg["vocab_size"] < len(vocab) + 64
    gen = _json(folder / "generation_config.json")
    assert gen["eos_token_id"] == [vocab["<|end_of_text|>"], vocab["<|eot_id|>"]]
    assert gen["bos_token_id"] == cfg["bos_token_id"] == vocab["<|begin_of_text|>"]
    tok_cfg = _json(folder / "tokenizer_config.json")
    assert tok_cfg["eos_token"] == "<|eot_id|>"
    assert {v["content"] for v in tok_cfg["added_tokens_decoder"].values()} == set(
        demo.SPECIAL_TOKENS
    )


def test_weights(folder: Path) -> None:
    cfg = _json(folder / "config.json")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    assert len(tensors) == 3 + 9 * cfg["num_hidden_layers"]
    assert tensors["model.layers.3.self_attn.k_proj.weight"].shape == (128, 256)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (256, 704)
    assert tensors["lm_head.weight"].shape == (cfg["vocab_size"], 256)
    assert torch.equal(tensors["model.norm.weight"], torch.ones(256))
    std = tensors["model.embed_tokens.weight"].std().item()
    assert 0.018 < std < 0.022
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_transformers_loads_it(folder: Path) -> None:
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("Hello, world! 😀")["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, world! 😀"
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    model: Any = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads) == (256, 4, 4)
    assert cfg.head_dim == 32 and cfg.intermediate_size == 704
    assert cfg.rope_parameters["rope_theta"] == 10000.0
    assert cfg.vocab_size == model.lm_head.out_features
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert set(model.state_dict()) == set(f.keys())
        # Loaded as-is: no weight was missing and re-initialised.
        assert torch.equal(model.lm_head.weight, f.get_tensor("lm_head.weight"))
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_same_seed_same_bytes(tmp_path: Path, folder: Path) -> None:
    again = build_demo(tmp_path)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()
    other = build_demo(tmp_path, "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (folder / "model.safetensors").read_bytes()


def test_existing_folder_is_kept(tmp_path: Path) -> None:
    path = build_demo(tmp_path)
    marker = path / "marker"
    marker.write_text("mine")
    config_before = (path / "config.json").stat().st_mtime_ns
    assert build_demo(tmp_path) == path
    assert marker.exists() and (path / "config.json").stat().st_mtime_ns == config_before
    assert build_demo(tmp_path, force=True) == path
    assert not marker.exists()
    assert {p.name for p in path.iterdir()} == FILES
    assert [p.name for p in tmp_path.iterdir()] == ["demo-llama"]


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
        raise KeyboardInterrupt

    good = build_demo(tmp_path, "kept")
    monkeypatch.setattr(demo, "random_weights", boom)
    with pytest.raises(KeyboardInterrupt):
        build_demo(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        build_demo(tmp_path, "kept", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert {p.name for p in good.iterdir()} == FILES
