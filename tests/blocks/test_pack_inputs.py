"""`edgeserve tasks pack` on the inputs users pass: other dtypes, shards, architectures,
PEFT adapters as PEFT writes them, odd blocks and budgets, names; clear errors otherwise."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from hf_models import make_model
from safetensors.torch import load_file, save_file

from blocks.finetunes import (
    load_weights,
    make_finetune,
    make_full_finetune,
    reconstruct,
    save_weights,
)
from edgeserve.arch.spec import ModelFormatError
from edgeserve.blocks.build import pack_tasks
from edgeserve.blocks.command import parse_budget
from edgeserve.blocks.pack import TaskPack
from edgeserve.cli import main

BLOCK = (16, 16)


def variant(src: Path, out: Path, values: dict[str, torch.Tensor],
            config: dict | None = None) -> Path:
    """A copy of the model folder src with other tensors (and config fields)."""
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors*"))
    if config:
        cfg = json.loads((out / "config.json").read_text()) | config
        (out / "config.json").write_text(json.dumps(cfg))
    return save_weights(out, values)


def shard(folder: Path) -> Path:
    """Rewrite a single-file checkpoint as two shards with model.safetensors.index.json."""
    values = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(values)
    files = {"model-00001-of-00002.safetensors": names[::2],
             "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in files.items():
        save_file({n: values[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def rebuilt(store: Path, task: str, tmp: Path, base: Path | None = None
            ) -> dict[str, torch.Tensor]:
    """The checkpoint the pack stands for (base: an unsharded copy of the store's base)."""
    return load_file(str(reconstruct(base or store / "base", store / task, tmp / f"r-{task}")
                         / "model.safetensors"))


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                atol: float = 0.0) -> None:
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, name
        assert torch.allclose(g.double(), w.double(), rtol=0, atol=atol), name


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """Bases made once (copied into each test's store)."""
    root = tmp_path_factory.mktemp("zoo")
    return {"llama": make_model("llama", root / "llama", seed=3),
            "llama-bf16": make_model("llama", root / "llama-bf16", seed=3, dtype=torch.bfloat16),
            "qwen2": make_model("qwen2", root / "qwen2", seed=4),
            "qwen3": make_model("qwen3", root / "qwen3", seed=5),
            "mistral": make_model("mistral", root / "mistral", seed=6)}


def in_store(tmp_path: Path, base: Path) -> Path:
    store = tmp_path / "store"
    shutil.copytree(base, store / "base")
    return store


# -- dtypes, shards, architectures --------------------------------------------------------

def test_a_bf16_copy_of_an_fp32_base_is_no_change(tmp_path, zoo):
    store = in_store(tmp_path, zoo["llama"])
    base = load_weights(store / "base")
    ft = variant(store / "base", tmp_path / "bf16", {k: v.bfloat16() for k, v in base.items()},
                 {"torch_dtype": "bfloat16", "dtype": "bfloat16"})
    (report,) = pack_tasks(store / "base", [ft], store, block=BLOCK, budget=1.0)
    assert report.blocks == 0 and report.vectors == 0 and not report.unpacked


@pytest.mark.parametrize("saved, base_name", [
    (torch.bfloat16, "llama"), (torch.float16, "llama"), (torch.float32, "llama-bf16")])
def test_a_fine_tune_in_another_dtype_packs_its_real_changes(tmp_path, zoo, saved, base_name):
    store = in_store(tmp_path, zoo[base_name])
    ft32 = make_full_finetune(store / "base", tmp_path / "full", 9)
    values = load_weights(ft32)
    # Only some blocks changed for real: the rest is the base, rounded to the saved dtype.
    base = load_weights(store / "base")
    for name, v in values.items():
        if v.dim() == 2 and "layers.1." not in name:
            values[name] = base[name]
    values = {k: v.to(saved) for k, v in values.items()}
    ft = variant(store / "base", tmp_path / "ft", values)
    (report,) = pack_tasks(store / "base", [ft], store, block=BLOCK, budget=1.0)
    pack = TaskPack.read(store / "ft")
    assert pack.weights and all("layers.1." in n for n in pack.weights)
    assert report.change_error == 0 and not report.unpacked
    got = rebuilt(store, "ft", tmp_path)
    for name in pack.weights:
        assert torch.equal(got[name].to(saved), values[name]), name
    assert report.vectors == sum(v.dim() == 1 for v in values.values())


def test_sharded_base_and_fine_tune(tmp_path, zoo):
    store = in_store(tmp_path, zoo["llama"])
    ft = make_finetune(store / "base", tmp_path / "ft", 11)
    want = load_weights(ft)
    shard(store / "base")
    shard(ft)
    (report,) = pack_tasks(store / "base", [ft], store, block=BLOCK, budget=1.0)
    assert report.blocks > 0 and report.change_error == 0
    assert_same(rebuilt(store, "ft", tmp_path, zoo["llama"]), want)


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("aligned", [True, False])
def test_full_fine_tunes_of_each_architecture_are_exact(tmp_path, zoo, arch, aligned):
    """Every tensor changed: linears, embeddings (tied in qwen2/qwen3), norms, q/k/v biases
    (qwen2), q/k norms (qwen3)."""
    store = in_store(tmp_path, zoo[arch])
    fts = [make_full_finetune(store / "base", tmp_path / f"t{i}", 20 + i) for i in range(2)]
    reports = pack_tasks(store / "base", fts, store, block=(8, 16), budget=1.0,
                         aligned=aligned)
    for r, ft in zip(reports, fts, strict=True):
        assert r.change_error == 0 and not r.unpacked, r
        assert_same(rebuilt(store, r.task, tmp_path), load_weights(ft))
    if arch == "qwen2":
        assert any(n.endswith("q_proj.bias") for n in TaskPack.read(store / "t0").vectors)
    if arch == "qwen3":
        assert any(n.endswith("k_norm.weight") for n in TaskPack.read(store / "t0").vectors)


def test_prefixed_tensor_names(tmp_path, zoo):
    """One prefix on every name (a wrapper's state dict) is read without it; names prefixed
    only in part are a clear error."""
    store = in_store(tmp_path, zoo["llama"])
    values = load_weights(make_finetune(store / "base", tmp_path / "ft", 11))
    ft = variant(store / "base", tmp_path / "pre", {"_orig_mod." + k: v for k, v in values.items()})
    (report,) = pack_tasks(store / "base", [ft], store, block=BLOCK, budget=1.0)
    assert report.blocks > 0 and report.change_error == 0
    assert_same(rebuilt(store, "pre", tmp_path), values)
    part = {("module." + k if "layers.1." in k else k): v for k, v in values.items()}
    ft = variant(store / "base", tmp_path / "part", part)
    with pytest.raises(ModelFormatError, match=r"lacks tensor .* carry a prefix"):
        pack_tasks(store / "base", [ft], store, block=BLOCK)


# -- fine-tunes that are not fine-tunes of the base -----------------------------------------

@pytest.mark.parametrize("block", [BLOCK, (32, 48)])     # 32x48: tiles no embedding row
def test_a_resized_vocabulary_is_an_error_naming_the_tensor(tmp_path, zoo, block):
    store = in_store(tmp_path, zoo["qwen2"])                # tied: the embeddings only
    values = load_weights(store / "base")
    values["model.embed_tokens.weight"] = torch.randn(336, 64)
    ft = variant(store / "base", tmp_path / "vocab", values, {"vocab_size": 336})
    with pytest.raises(ModelFormatError, match=r"'model\.embed_tokens\.weight' has shape"):
        pack_tasks(store / "base", [ft], store, block=block)
    assert not (store / "vocab").exists()


@pytest.mark.parametrize("change, match", [
    ("extra layer", "'model.layers.2.self_attn.q_proj.weight' that the base lacks"),
    ("no head", "lacks tensor 'lm_head.weight'"),
    ("rope", "config.json: differs from the base's in rope"),
    ("bias", "'model.layers.0.self_attn.q_proj.bias' that the base lacks"),
])
def test_a_changed_architecture_is_an_error(tmp_path, zoo, change, match):
    store = in_store(tmp_path, zoo["llama"])
    values, config = load_weights(store / "base"), None
    if change == "extra layer":
        values["model.layers.2.self_attn.q_proj.weight"] = torch.randn(64, 64)
    elif change == "no head":
        del values["lm_head.weight"]
    elif change == "rope":
        config = {"rope_theta": 1e6, "rope_parameters": {"rope_type": "default",
                                                          "rope_theta": 1e6}}
    else:
        values["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    ft = variant(store / "base", tmp_path / "ft", values, config)
    with pytest.raises(ModelFormatError, match=match):
        pack_tasks(store / "base", [ft], store, block=BLOCK)


def test_a_head_saved_beside_tied_embeddings(tmp_path, zoo):
    store = in_store(tmp_path, zoo["qwen2"])
    values = load_weights(store / "base")
    values["lm_head.weight"] = values["model.embed_tokens.weight"].clone()
    tied = variant(store / "base", tmp_path / "tied", values)     # ignored, as transformers does
    (report,) = pack_tasks(store / "base", [tied], store, block=BLOCK)
    assert report.blocks == 0
    untied = variant(store / "base", tmp_path / "untied", values, {"tie_word_embeddings": False})
    with pytest.raises(ModelFormatError, match="unties the head"):
        pack_tasks(store / "base", [untied], store, block=BLOCK)
    # The other way: the base saved a head beside its tied embeddings, the fine-tune did not.
    shutil.copytree(tied, store / "tied-base")
    ft = make_finetune(store / "base", tmp_path / "ft", 11)
    (report,) = pack_tasks(store / "tied-base", [ft], store, block=BLOCK, budget=1.0)
    assert report.blocks > 0 and not report.unpacked


# -- PEFT LoRA adapters ---------------------------------------------------------------------

def adapter(folder: Path, values: dict[str, torch.Tensor], **config) -> Path:
    folder.mkdir(parents=True)
    save_file(values, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
           "bias": "none", "base_model_name_or_path": "base"} | config
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def pair(module: str, rows: int, cols: int, rank: int, seed: int, suffix: str = ""
         ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(rank, cols, generator=g), torch.randn(rows, rank, generator=g)
    return {f"base_model.model.{module}.lora_A{suffix}.weight": a,
            f"base_model.model.{module}.lora_B{suffix}.weight": b}


def merged(base: dict[str, torch.Tensor], values: dict[str, torch.Tensor], module: str,
           scale: float, suffix: str = "") -> torch.Tensor:
    a = values[f"base_model.model.{module}.lora_A{suffix}.weight"]
    b = values[f"base_model.model.{module}.lora_B{suffix}.weight"]
    return base[module + ".weight"] + scale * (b @ a)


def test_lora_scales_ranks_and_names_as_peft_saves_them(tmp_path, zoo):
    store = in_store(tmp_path, zoo["llama"])
    base = load_weights(store / "base")
    q0, v1, o0 = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                  "model.layers.0.self_attn.o_proj")
    values = pair(q0, 64, 64, 4, 1) | pair(v1, 32, 64, 8, 2) | pair(o0, 64, 64, 4, 3, ".default")
    ad = adapter(tmp_path / "lora", values, target_modules="all-linear",
                 rank_pattern={"v_proj": 8}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 2})
    rs = adapter(tmp_path / "rslora", values, target_modules=".*(q|v|o)_proj",
                 rank_pattern={"v_proj": 8}, use_rslora=True)
    reports = pack_tasks(store / "base", [ad, rs], store, block=BLOCK, budget=1.0)
    assert all(r.change_error == 0 for r in reports)
    got = rebuilt(store, "lora", tmp_path)
    assert_same(got, {q0 + ".weight": merged(base, values, q0, 2 / 4),
                      v1 + ".weight": merged(base, values, v1, 8 / 8),
                      o0 + ".weight": merged(base, values, o0, 8 / 4, ".default")}, atol=1e-5)
    got = rebuilt(store, "rslora", tmp_path)
    assert_same(got, {q0 + ".weight": merged(base, values, q0, 8 / 2),
                      v1 + ".weight": merged(base, values, v1, 8 / math.sqrt(8))}, atol=1e-5)


@pytest.mark.parametrize("wrapped", [False, True])
def test_lora_modules_to_save_replace_the_base(tmp_path, zoo, wrapped):
    store = in_store(tmp_path, zoo["llama"])
    base = load_weights(store / "base")
    q0 = "model.layers.0.self_attn.q_proj"
    head = base["lm_head.weight"] + 0.5 * torch.randn(320, 64)
    key = "lm_head.modules_to_save.default.weight" if wrapped else "lm_head.weight"
    values = pair(q0, 64, 64, 4, 1) | {f"base_model.model.{key}": head}
    ad = adapter(tmp_path / "mts", values, modules_to_save=["lm_head"])
    (report,) = pack_tasks(store / "base", [ad], store, block=BLOCK, budget=1.0)
    assert report.change_error == 0
    assert_same(rebuilt(store, "mts", tmp_path),
                {"lm_head.weight": head, q0 + ".weight": merged(base, values, q0, 2)}, atol=1e-5)


def test_lora_of_embeddings_and_trained_biases(tmp_path, zoo):
    """Qwen2 (tied, q/k/v biases): lora_embedding_A/B on the embeddings; bias='all' saves
    the biases whole (a targeted layer's under base_layer)."""
    store = in_store(tmp_path, zoo["qwen2"])
    base = load_weights(store / "base")
    g = torch.Generator().manual_seed(7)
    emb_a, emb_b = torch.randn(4, 320, generator=g), torch.randn(64, 4, generator=g)
    q0 = "model.layers.0.self_attn.q_proj"
    q_bias, k_bias = torch.randn(64, generator=g), torch.randn(32, generator=g)
    values = pair(q0, 64, 64, 4, 1) | {
        "base_model.model.model.embed_tokens.lora_embedding_A": emb_a,
        "base_model.model.model.embed_tokens.lora_embedding_B": emb_b,
        "base_model.model.model.embed_tokens.base_layer.weight": base["model.embed_tokens.weight"],
        f"base_model.model.{q0}.base_layer.bias": q_bias,
        "base_model.model.model.layers.1.self_attn.k_proj.bias": k_bias}
    ad = adapter(tmp_path / "emb", values, target_modules=["q_proj", "embed_tokens"], bias="all")
    (report,) = pack_tasks(store / "base", [ad], store, block=BLOCK, budget=1.0)
    assert report.change_error == 0 and report.vectors == 2
    assert_same(rebuilt(store, "emb", tmp_path), {
        "model.embed_tokens.weight": base["model.embed_tokens.weight"] + 2 * (emb_b @ emb_a).T,
        q0 + ".weight": merged(base, values, q0, 2), q0 + ".bias": q_bias,
        "model.layers.1.self_attn.k_proj.bias": k_bias}, atol=1e-5)


@pytest.mark.parametrize("arch, values, config, match", [
    ("llama", {}, {"use_dora": True}, "DoRA"),
    ("llama", {}, {"fan_in_fan_out": True}, "fan_in_fan_out"),
    ("llama", {}, {"lora_bias": True}, "lora_bias"),
    ("llama", {}, {"peft_type": "IA3"}, "is not LORA"),
    ("llama", {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector":
               torch.ones(64)}, {}, "lora_magnitude_vector"),
    ("llama", {"base_model.model.score.weight": torch.ones(2, 64)}, {}, "'score.weight'"),
    ("llama", {"base_model.model.lm_head.weight": torch.ones(336, 64)}, {},
     "'lm_head.weight' has shape"),
    ("qwen2", pair("lm_head", 320, 64, 4, 5), {}, "ties to its embeddings"),
    ("qwen2", {"base_model.model.lm_head.weight": torch.ones(320, 64)}, {},
     "ties to its embeddings"),
])
def test_adapters_that_cannot_be_packed_are_refused(tmp_path, zoo, arch, values, config, match):
    store = in_store(tmp_path, zoo[arch])
    values = pair("model.layers.0.self_attn.q_proj", 64, 64, 4, 1) | values
    ad = adapter(tmp_path / "bad", values, **config)
    with pytest.raises(ModelFormatError, match=match):
        pack_tasks(store / "base", [ad], store, block=BLOCK)
    assert not (store / "bad").exists()


# -- blocks, budgets, names -----------------------------------------------------------------

def test_a_non_square_block_is_exact_at_full_budget(tmp_path, zoo):
    store = in_store(tmp_path, zoo["llama"])
    ft = make_finetune(store / "base", tmp_path / "ft", 11, prune=1)
    (report,) = pack_tasks(store / "base", [ft], store, block="16x8", budget=1.0)
    assert TaskPack.read(store / "ft").block == (16, 8) and report.change_error == 0
    assert_same(rebuilt(store, "ft", tmp_path), load_weights(ft))
    with pytest.raises(ValueError, match="must be positive"):
        pack_tasks(store / "base", [ft], store, block=(0, 16))


def test_budgets():
    assert parse_budget("0.5%") == pytest.approx(0.005)
    assert parse_budget("100%") == 1.0 and parse_budget("0.25") == 0.25
    for bad in ("0", "0%", "150%", "1.5", "abc", "%", "-10%", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_budget(bad)


def test_a_tiny_budget_keeps_one_block(tmp_path, zoo):
    store = in_store(tmp_path, zoo["llama"])
    ft = make_finetune(store / "base", tmp_path / "ft", 11)
    (report,) = pack_tasks(store / "base", [ft], store, block=BLOCK, budget=0.0001)
    assert report.blocks == 1 and 0 < report.change_error < 1
    with pytest.raises(ValueError, match="budget"):
        pack_tasks(store / "base", [ft], store, block=BLOCK, budget=0)


def test_command_line_refusals(tmp_path, zoo, capsys):
    store = in_store(tmp_path, zoo["llama"])
    ft = make_finetune(store / "base", tmp_path / "ft", 11)
    args = ["tasks", "pack", "base", str(ft), "--models", str(store)]
    two = ["tasks", "pack", "base", str(ft), str(ft), "--models", str(store)]
    for bad in ("abc", "0", "150%"):
        with pytest.raises(SystemExit):
            main([*args, "--budget", bad])
        assert "budget" in capsys.readouterr().err
    for bad in ("0", "16x", "16x16x16", "big"):
        with pytest.raises(SystemExit):
            main([*args, "--block", bad])
        assert "block size" in capsys.readouterr().err
    assert main([*two, "--name", "a", "--name", "a"]) == 1
    assert "repeat" in capsys.readouterr().err
    assert main([*args, "--name", "base"]) == 1
    assert "cannot be a task id" in capsys.readouterr().err
    assert main(["tasks", "pack", "base", str(ft), "--models", str(tmp_path / "empty")]) == 1
    assert "not a model of the store" in capsys.readouterr().err
    assert main([*args, "--block", "48"]) == 1
    assert "tiles none" in capsys.readouterr().err
    with pytest.raises(ValueError, match="1 task ids for 2"):
        pack_tasks(store / "base", [ft, ft], store, block=BLOCK, names=["x"])
    assert not any(p.name in ("a", "x") for p in store.iterdir())


async def test_the_base_itself_is_an_empty_pack_that_serves(tmp_path, zoo, capsys):
    from edgeserve import EdgeServer
    from edgeserve.config import Config, PoolConfig

    store = in_store(tmp_path, zoo["llama"])
    for aligned in ([], ["--no-align"]):
        assert main(["tasks", "pack", "base", str(store / "base"), "--models", str(store),
                     "--block", "16", "--budget", "100%", "--name", "same", *aligned]) == 0
        assert "same" in capsys.readouterr().out
        pack = TaskPack.read(store / "same")
        assert pack.num_blocks == 0 and not pack.vectors and pack.base == "base"
    assert main(["tasks", "pack", "same", str(store / "base"), "--models", str(store)]) == 1
    assert "is a task pack, not a model" in capsys.readouterr().err
    with pytest.raises(ModelFormatError, match="a task pack, not a fine-tuned"):
        pack_tasks(store / "base", [store / "same"], store, names=["again"])
    config = Config(models=store, device="cpu", pool=PoolConfig(pool_size=32 << 20,
                                                                 block_size=64 << 10))
    async with EdgeServer(config=config) as es:
        want = await es.complete("base", [1, 2, 3], max_tokens=6, temperature=0)
        await es.load("same")
        got = await es.complete("same", [1, 2, 3], max_tokens=6, temperature=0)
    assert got.token_ids == want.token_ids


def test_an_adapter_kept_in_the_store_packs_under_its_own_name(tmp_path, zoo):
    store = in_store(tmp_path, zoo["llama"])
    ad = adapter(store / "mine", pair("model.layers.0.self_attn.q_proj", 64, 64, 4, 1))
    (ad / "tokenizer_config.json").write_text("{}")
    (report,) = pack_tasks(store / "base", [ad], store, block=BLOCK, budget=1.0)
    assert report.task == "mine" and TaskPack.read(store / "mine").num_blocks > 0
    assert (store / "mine" / "tokenizer_config.json").read_text() == "{}"
    # Packed again from a fine-tune without tokenizer files: the old one goes.
    ft = make_finetune(store / "base", tmp_path / "ft", 11)
    pack_tasks(store / "base", [ft], store, block=BLOCK, names=["other"])
    (store / "other" / "tokenizer.json").write_text("{}")
    pack_tasks(store / "base", [ft], store, block=BLOCK, names=["other"])
    assert not (store / "other" / "tokenizer.json").exists()
