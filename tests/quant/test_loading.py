"""Quantized models: agreement with fp32 for every family, the store's quantized cache,
sharing with fine-tunes, pre-quantized folders, and pool integrity throughout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_models import load_resident, make_model
from safetensors.torch import load_file, save_file

from edgeserve.arch.spec import ModelFormatError
from edgeserve.checkpoint import HashCache
from edgeserve.loader import read_spec
from edgeserve.pool import BlockPool
from edgeserve.quant.cache import QuantCache
from edgeserve.quant.format import QuantInfo, quantize
from edgeserve.quant.linear import QWeight
from edgeserve.quant.quality import agreement

# Teacher-forced agreement with fp32 on tiny random models (near-flat logits make top-1
# fragile; a real model agrees more, see bench/RESULTS.md), and mean KL in nats.
TOP1 = {"int8": 0.93, "int4": 0.70}
KL = {"int8": 1e-6, "int4": 1e-5}
FAMILIES = ["llama", "qwen2", "qwen3", "mixtral"]


# Both schemes quantize in groups of 32 along the input, so these models take widths
# that are multiples of 32, as real models' are (the tests' default widths, 112, 48 and 40,
# are not: such weights stay float, see test_widths_without_whole_groups_stay_float).
WIDTHS = {"intermediate_size": 128}


@pytest.fixture(scope="module")
def quant_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("quant")
    for arch in FAMILIES:
        make_model(arch, root / arch, seed=3, **WIDTHS)
    make_model("qwen3-moe", root / "stacked", seed=4, stacked_experts=True,
               moe_intermediate_size=64)
    return root


def prompts(n: int = 4, length: int = 32, vocab: int = 320) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def quantized(root: Path, name: str, scheme: str) -> Path:
    return QuantCache(root, HashCache(root)).folder(root / name, scheme)[0]


@pytest.mark.parametrize("arch", [*FAMILIES, "stacked"])
def test_quantized_logits_agree_with_fp32(quant_store: Path, arch: str) -> None:
    pool = BlockPool("cpu", 64 << 20, 4096)
    ref = load_resident(arch, quant_store / arch, pool)
    for scheme in ("int8", "int4"):
        model = load_resident(f"{arch}:{scheme}", quantized(quant_store, arch, scheme), pool)
        assert set(model.schemes.values()) <= {"int8", "int4"} and model.schemes
        assert model.weight_bytes < ref.weight_bytes * (0.4 if scheme == "int8" else 0.3)
        got = agreement(ref, model, prompts())
        assert got.top1 >= TOP1[scheme], (scheme, got)
        assert got.kl <= KL[scheme], (scheme, got)
        model.release(retain=False)
        pool.check_integrity()
    ref.release(retain=False)
    pool.check_integrity()
    assert pool.free_bytes == pool.total_bytes


def test_every_linear_and_the_embeddings_are_quantized(quant_store: Path) -> None:
    folder = quantized(quant_store, "mixtral", "int4")
    info = json.loads((folder / "quant.json").read_text())
    spec = read_spec(quant_store / "mixtral")
    assert info["scheme"] == "mixed"          # int8 embeddings and head under int4
    names = set(info["tensors"])
    assert info["tensors"]["model.embed_tokens.weight"] == "int8"
    assert info["tensors"]["lm_head.weight"] == "int8"
    assert info["tensors"]["model.layers.0.block_sparse_moe.experts.7.w2.weight"] == "int4"
    assert info["tensors"]["model.layers.1.self_attn.q_proj.weight"] == "int4"
    assert not any("norm" in n or n.endswith("gate.weight") for n in names)   # routers stay
    assert len([n for n in names if ".experts." in n]) == spec.num_layers * 8 * 3


def test_widths_without_whole_groups_stay_float(tmp_path: Path) -> None:
    """down_proj's input (112) is not a multiple of 32: it stays float in both schemes."""
    path = make_model("llama", tmp_path / "m")
    for scheme in ("int8", "int4"):
        folder = quantized(tmp_path, "m", scheme)
        tensors = json.loads((folder / "quant.json").read_text())["tensors"]
        assert "model.layers.0.mlp.down_proj.weight" not in tensors
        assert tensors["model.layers.0.mlp.up_proj.weight"] == scheme
        stored = load_file(folder / "model.safetensors")
        assert stored["model.layers.0.mlp.down_proj.weight"].dtype == torch.float32
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize("int8", load_file(path / "model.safetensors")[
            "model.layers.0.mlp.down_proj.weight"])


def test_cache_is_made_once_and_remade_when_the_source_changes(tmp_path: Path) -> None:
    path = make_model("llama", tmp_path / "m", **WIDTHS)
    cache = QuantCache(tmp_path, HashCache(tmp_path))
    first, seconds = cache.folder(path, "int8")
    assert seconds > 0 and cache.made == 1
    assert cache.folder(path, "int8") == (first, 0.0) and cache.made == 1
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] += 1
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    again, seconds = cache.folder(path, "int8")
    assert again == first and seconds > 0 and cache.made == 2
    stored = load_file(again / "model.safetensors")["model.layers.0.mlp.down_proj.weight.qweight"]
    want = quantize("int8", tensors["model.layers.0.mlp.down_proj.weight"])["qweight"]
    assert torch.equal(stored, want)


def test_cache_folders_of_an_older_format_are_remade(tmp_path: Path) -> None:
    """A folder quantized by an older version (format 1: its stamp a bare list of files,
    its quant.json format 1) is made again rather than served."""
    path = make_model("llama", tmp_path / "m", **WIDTHS)
    cache = QuantCache(tmp_path, HashCache(tmp_path))
    folder, _ = cache.folder(path, "int8")
    stamp = json.loads((folder / "source.json").read_text())
    (folder / "source.json").write_text(json.dumps(stamp["files"]))
    info = json.loads((folder / "quant.json").read_text())
    (folder / "quant.json").write_text(json.dumps(info | {"format": 1}))
    again, seconds = cache.folder(path, "int8")
    assert again == folder and seconds > 0 and cache.made == 2
    assert json.loads((folder / "quant.json").read_text())["format"] == 2


def test_finetune_shares_its_quantized_units_with_the_base(tmp_path: Path) -> None:
    base = make_model("llama", tmp_path / "base")
    tune = tmp_path / "tune"
    shutil.copytree(base, tune)
    tensors = load_file(base / "model.safetensors")
    changed = "model.layers.1.self_attn.o_proj.weight"
    tensors[changed] = tensors[changed] * 1.5
    save_file(tensors, tune / "model.safetensors", metadata={"format": "pt"})
    pool = BlockPool("cpu", 32 << 20, 4096)
    for scheme in ("int8", "int4"):
        a = load_resident("base", quantized(tmp_path, "base", scheme), pool)
        b = load_resident("tune", quantized(tmp_path, "tune", scheme), pool)
        shared = {n for n in a.units if a.units[n] is b.units[n]}
        assert shared == set(a.units) - {changed}
        assert b.schemes[changed] == scheme
        for model in (a, b):
            model.release(retain=False)
        pool.check_integrity()


def test_prequantized_folder_is_read_as_it_is(tmp_path: Path) -> None:
    """A folder written by another tool (no source hashes): its bytes become the units."""
    src = make_model("qwen2", tmp_path / "src")
    out = tmp_path / "pre"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(src / "model.safetensors")
    chosen = {n: "int4" for n in tensors if n.endswith("_proj.weight") and "down" not in n}
    stored = {}
    for name, t in tensors.items():
        if name in chosen:
            stored |= {f"{name}.{k}": v for k, v in quantize("int4", t).items()}
        else:
            stored[name] = t
    save_file(stored, out / "model.safetensors")
    (out / "quant.json").write_text(QuantInfo("int4", chosen, "test").to_json())
    pool = BlockPool("cpu", 32 << 20, 4096)
    model = load_resident("pre", out, pool)
    q = model.runner.layers[0].attn.qkv           # type: ignore[attr-defined]
    assert isinstance(q, QWeight) and q.scheme == "int4"
    want = stored["model.layers.0.self_attn.k_proj.weight.qweight"]
    assert torch.equal(q.qweight[64:96], want)
    # The same folder with one of q/k/v in another scheme is refused with a clear message.
    chosen["model.layers.0.self_attn.k_proj.weight"] = "int8"
    (out / "quant.json").write_text(QuantInfo("mixed", chosen, "test").to_json())
    with pytest.raises(ModelFormatError, match="must be stored alike"):
        load_resident("pre2", out, pool)
    model.release(retain=False)
    pool.check_integrity()


def test_prequantized_components_of_another_dtype_are_refused(tmp_path: Path) -> None:
    """Format 2 stores scales and minimums in float16: a folder with float32 ones (as
    format 1 had) is refused naming the tensor, not converted on the way in."""
    src = make_model("llama", tmp_path / "src", **WIDTHS)
    out = tmp_path / "pre"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    stored = {n: t for n, t in tensors.items() if n != name}
    stored |= {f"{name}.{k}": v.float() if k == "scale" else v
               for k, v in quantize("int8", tensors[name]).items()}
    save_file(stored, out / "model.safetensors")
    (out / "quant.json").write_text(QuantInfo("int8", {name: "int8"}, "test").to_json())
    pool = BlockPool("cpu", 32 << 20, 4096)
    with pytest.raises(ModelFormatError, match=rf"'{name}\.scale' is torch\.float32, "
                                               r"int8 scale needs torch\.float16"):
        load_resident("pre", out, pool)
    pool.check_integrity()
