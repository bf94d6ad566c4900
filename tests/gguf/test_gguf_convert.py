"""GGUF files of every dense family served with the logits of the model they hold."""

from __future__ import annotations

import json

import pytest
import torch
from gguf_files import write_gguf
from hf_models import MOE_ARCHS, load_resident, make_model, reference
from safetensors.torch import load_file

from edgeserve.batch import build_batch
from edgeserve.gguf import ensure_folder
from edgeserve.gguf.convert import summary
from edgeserve.pool import BlockPool

ARCHS = ["llama", "llama3-rope", "qwen2", "qwen3"]    # llama: q/k rows interleaved
CPU = torch.device("cpu")


def logits_of(folder, name: str, ids: list[int]) -> torch.Tensor:
    pool = BlockPool("cpu", 32 << 20, 4096)
    model = load_resident(name, folder, pool)
    pages: list = []
    model.kv.grow(pages, len(ids))
    out = model.forward(build_batch([(ids, 0, pages)], model.kv.layout.page_tokens, CPU),
                        all_logits=True)[0]
    model.kv.release(pages)
    model.release(retain=False)
    pool.check_integrity()
    assert pool.free_bytes == pool.total_bytes
    return out


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


IDS = torch.randint(0, 320, (17,), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-hf")
    # K-quant super-blocks hold 256 weights: rows of 256
    return {arch: make_model(arch, root / arch, seed=7, hidden_size=256, intermediate_size=256)
            for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_file_gives_the_original_weights_and_logits(arch, hf_models, tmp_path):
    gguf = write_gguf(hf_models[arch], tmp_path / f"{arch}.gguf", "F32")
    folder = ensure_folder(gguf, tmp_path / "converted")
    ours, theirs = load_file(str(folder / "model.safetensors")), \
        load_file(str(hf_models[arch] / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():               # q/k rows back in Hugging Face order
        assert torch.equal(ours[name], t.float()), name
    with torch.no_grad():
        expected = reference(hf_models[arch])(torch.tensor([IDS])).logits[0]
    assert rel_err(logits_of(folder, arch, IDS), expected) < 1e-4


TYPES = {"blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "Q4_0",
         "blk.0.attn_v.weight": "Q4_0", "blk.0.attn_output.weight": "Q8_0",
         "blk.0.ffn_gate.weight": "Q4_K", "blk.0.ffn_up.weight": "Q4_K",
         "blk.0.ffn_down.weight": "Q6_K", "blk.1.attn_q.weight": "Q4_1",
         "blk.1.attn_k.weight": "Q4_1", "blk.1.attn_v.weight": "Q8_0",
         "blk.1.ffn_down.weight": "Q5_K", "token_embd.weight": "Q8_0"}


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_file_matches_transformers_reading_the_same_file(arch, hf_models, tmp_path):
    """Every supported type, dequantized: the logits of transformers reading the file."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gguf = write_gguf(hf_models[arch], tmp_path / f"{arch}.gguf", "F16", TYPES)
    folder = ensure_folder(gguf, tmp_path / "converted", dequantize=True)
    assert not (folder / "quant.json").exists()
    # transformers reads the weights from the file (its own dequantization and q/k order);
    # the config from the original, as it guesses Qwen3's head size from the file wrong.
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf.name,
                                               config=AutoConfig.from_pretrained(hf_models[arch]),
                                               dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(torch.tensor([IDS])).logits[0]
    assert rel_err(logits_of(folder, arch, IDS), expected) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_units_keep_int4_and_requantize_the_rest(arch, hf_models, tmp_path):
    """Q4_0 / Q4_1 kept as int4 and Q8_0 as int8 exactly, Q4_K as int4 with float16 scales,
    Q6_K / Q5_K re-quantized to int8 (a fused q/k/v unit of mixed types too), F16 float:
    logits close to the dequantized file's."""
    gguf = write_gguf(hf_models[arch], tmp_path / f"{arch}.gguf", "F16", TYPES)
    folder = ensure_folder(gguf, tmp_path / "quantized")
    quant = json.loads((folder / "quant.json").read_text())["tensors"]
    p = "model.layers.{}."
    assert quant[p.format(0) + "self_attn.q_proj.weight"] == "int4"
    assert quant[p.format(0) + "mlp.gate_proj.weight"] == "int4"
    assert quant[p.format(0) + "mlp.down_proj.weight"] == "int8"
    assert quant[p.format(1) + "self_attn.q_proj.weight"] == "int8"   # fused with a Q8_0 v
    assert p.format(1) + "mlp.up_proj.weight" not in quant              # F16 stays float
    report = json.loads((folder / "gguf.json").read_text())["types"]
    assert report["Q4_0"]["became"] == {"int4": 3}
    assert 0 < report["Q6_K"]["max_relative_error"] < 0.01
    assert "Q6_K x1 -> int8 (re-quantized, relative error <= " in summary(folder)
    assert "Q4_0 x3 -> int4 (exact)," in summary(folder)
    assert "max_relative_error" not in report["Q8_0"]               # Q8_0 is int8 exactly
    assert "Q8_0 x3 -> float32/int8 (exact)," in summary(folder)
    # Q4_K's group scales (a float16 times a 6-bit integer) rounded to float16: about
    # 2^-12 relative per scale.
    assert 0 < report["Q4_K"]["max_relative_error"] < 1e-3
    plain = ensure_folder(gguf, tmp_path / "plain", dequantize=True)
    assert rel_err(logits_of(folder, arch, IDS), logits_of(plain, arch, IDS)) < 5e-2


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_moe_files_give_the_original_experts_and_logits(arch, tmp_path):
    """llama.cpp stacks each layer's experts into one (E, rows, cols) tensor: split back into
    the Hugging Face experts; F32 gives transformers' logits, Q4_0 int4 experts close ones."""
    sizes = {"qwen2-moe": dict(moe_intermediate_size=64, shared_expert_intermediate_size=64),
             "qwen3-moe": dict(moe_intermediate_size=64)}.get(arch, {})
    hf = make_model(arch, tmp_path / "hf", seed=11, intermediate_size=64, **sizes)
    gguf = write_gguf(hf, tmp_path / f"{arch}.gguf", "F32")
    folder = ensure_folder(gguf, tmp_path / "f32")
    ours, theirs = load_file(str(folder / "model.safetensors")), \
        load_file(str(hf / "model.safetensors"))
    assert set(ours) == set(theirs)
    for name, t in theirs.items():
        assert torch.equal(ours[name], t.float()), name
    with torch.no_grad():
        expected = reference(hf)(torch.tensor([IDS])).logits[0]
    assert rel_err(logits_of(folder, arch, IDS), expected) < 1e-4
    q4 = ensure_folder(write_gguf(hf, tmp_path / "q4.gguf", "Q4_0"), tmp_path / "q4")
    quant = json.loads((q4 / "quant.json").read_text())["tensors"]
    assert sum(".experts." in n for n in quant) == 2 * 8 * 3     # 2 sparse layers, 8 experts
    assert rel_err(logits_of(q4, arch, IDS), expected) < 0.2
