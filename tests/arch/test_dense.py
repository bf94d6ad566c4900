"""Numerical equivalence with transformers for every dense architecture (fp32)."""

from __future__ import annotations

import pytest
import torch
from hf_models import ARCHS, load_resident, reference

from edgeserve.batch import build_batch
from edgeserve.pool import BlockPool

CPU = torch.device("cpu")


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.fixture
def pool() -> BlockPool:
    return BlockPool("cpu", 32 << 20, 4096)     # small blocks: many KV pages per sequence


@pytest.mark.parametrize("arch", list(ARCHS))
def test_prefill_and_decode_logits_match(arch, tiny_store, pool):
    model = load_resident(arch, tiny_store / arch, pool)
    ref = reference(tiny_store / arch)
    ids = torch.randint(0, model.spec.vocab_size, (23,), generator=torch.Generator().manual_seed(1))
    ids = ids.tolist()
    pages: list = []
    model.kv.grow(pages, len(ids))
    logits = model.forward(build_batch([(ids, 0, pages)], model.kv.layout.page_tokens, CPU),
                           all_logits=True)[0]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0]
    assert rel_err(logits, expected) < 1e-4
    for _ in range(20):                               # past the Mistral window of 12 too
        ids.append(int(logits[-1].argmax()))
        model.kv.grow(pages, len(ids))
        batch = build_batch([([ids[-1]], len(ids) - 1, pages)], model.kv.layout.page_tokens, CPU)
        logits = model.forward(batch)
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0, -1]
        assert rel_err(logits[0], expected) < 1e-4
    assert len(pages) > 2                              # the sequence really spans pages
    model.kv.release(pages)
    model.release(retain=False)
    pool.check_integrity()
    assert pool.free_bytes == pool.total_bytes


def test_unsupported_architecture_names_the_field(tmp_path):
    import json

    from edgeserve.arch.spec import ModelFormatError, load_spec

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelFormatError, match="architectures"):
        load_spec(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": "64"}))
    with pytest.raises(ModelFormatError, match="hidden_size"):
        load_spec(tmp_path)
    with pytest.raises(ModelFormatError, match=r"config\.json"):
        load_spec(tmp_path / "missing")
