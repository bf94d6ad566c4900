"""Mixture-of-experts architectures: numerical equivalence with transformers (fp32), greedy
continuations through EdgeServer, both checkpoint layouts, and experts as pool units."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from hf_models import MOE_ARCHS, hf_greedy, load_resident, make_model, reference

from edgeserve import EdgeServer
from edgeserve.arch.moe import MoeModel, route
from edgeserve.arch.spec import ModelFormatError, parse_config
from edgeserve.batch import build_batch
from edgeserve.loader import scan_checkpoint
from edgeserve.pool import BlockPool, UnitKind

CPU = torch.device("cpu")
STACKED = ("mixtral", "qwen2-moe")


@pytest.fixture(scope="module")
def moe_store(tmp_path_factory) -> Path:
    """One tiny model per MoE architecture, as save_pretrained writes it (one tensor per
    expert), and two with stacked (E, ...) expert tensors, of the same weights."""
    root = tmp_path_factory.mktemp("moe")
    for seed, arch in enumerate(MOE_ARCHS):
        make_model(arch, root / arch, seed=100 + seed)
        if arch in STACKED:
            make_model(arch, root / f"{arch}-stacked", seed=100 + seed, stacked_experts=True)
    return root


@pytest.fixture
def pool() -> BlockPool:
    return BlockPool("cpu", 32 << 20, 4096)


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def prefill_and_decode(path: Path, pool: BlockPool, steps: int = 20) -> list[torch.Tensor]:
    """Our logits for a 23-token prompt (every position), then for each greedy decode step,
    each checked against transformers on the whole sequence."""
    model = load_resident(path.name, path, pool)
    ref = reference(path)
    ids = torch.randint(0, model.spec.vocab_size, (23,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    pages: list = []
    model.kv.grow(pages, len(ids))
    page_tokens = model.kv.layout.page_tokens
    logits = model.forward(build_batch([(ids, 0, pages)], page_tokens, CPU), all_logits=True)[0]
    with torch.no_grad():
        assert rel_err(logits, ref(torch.tensor([ids])).logits[0]) < 1e-4
    seen = [logits]
    for _ in range(steps):                            # past Mixtral's window of 12 too
        ids.append(int(seen[-1][-1].argmax()))
        model.kv.grow(pages, len(ids))
        logits = model.forward(build_batch([([ids[-1]], len(ids) - 1, pages)], page_tokens, CPU))
        with torch.no_grad():
            assert rel_err(logits[0], ref(torch.tensor([ids])).logits[0, -1]) < 1e-4
        seen.append(logits)
    model.kv.release(pages)
    model.release(retain=False)
    pool.check_integrity()
    assert pool.free_bytes == pool.total_bytes
    return seen


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
def test_prefill_and_decode_logits_match(arch, moe_store, pool):
    names = scan_checkpoint(moe_store / arch)       # the classic layout: a tensor per expert
    assert any(n.endswith((".experts.7.w1.weight", ".experts.7.gate_proj.weight")) for n in names)
    prefill_and_decode(moe_store / arch, pool)


@pytest.mark.parametrize("arch", STACKED)
def test_stacked_expert_tensors_load_and_match(arch, moe_store, pool):
    stacked = moe_store / f"{arch}-stacked"
    assert scan_checkpoint(stacked)["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 8
    ours = prefill_and_decode(stacked, pool, steps=3)
    classic = prefill_and_decode(moe_store / arch, pool, steps=3)
    for a, b in zip(ours, classic, strict=True):      # the same weights, either layout
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", list(MOE_ARCHS))
async def test_batched_greedy_equals_transformers(arch, moe_store):
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 320, (n,), generator=g).tolist() for n in (3, 11, 6, 25)]
    async with EdgeServer(models=moe_store, device="cpu", pool_size="64MiB",
                          block_size="4KiB") as es:
        outs = await asyncio.gather(*[es.complete(arch, p, max_tokens=32, temperature=0,
                                                  ignore_eos=True) for p in prompts])
        for p, out in zip(prompts, outs, strict=True):
            assert out.token_ids == hf_greedy(moe_store / arch, p, 32)
        es.pools["cpu"].check_integrity()


def test_experts_are_pool_units_of_kind_expert(moe_store, pool):
    model = load_resident("qwen2-moe", moe_store / "qwen2-moe", pool)
    spec = model.spec
    assert spec.sparse_layers == (True, False, True)   # mlp_only_layers=[1]
    for name, unit in model.units.items():
        assert (unit.kind is UnitKind.EXPERT) == (".experts." in name), name
    d, i = spec.hidden_size, spec.expert_intermediate_size
    per_expert = pool.blocks_for(2 * i * d * 4) + pool.blocks_for(d * i * 4)
    expected = 2 * spec.num_experts * per_expert * pool.block_size
    assert pool.bytes_by_kind()["expert"] == expected > 0
    assert "model.layers.0.mlp.shared_expert.gate_up_proj.weight" in model.units
    model.release(retain=False)
    pool.check_integrity()


def test_grouped_experts_equal_each_token_summed_alone(moe_store, pool):
    model = load_resident("olmoe", moe_store / "olmoe", pool)
    runner = model.runner
    assert isinstance(runner, MoeModel)
    x = torch.randn(40, model.spec.hidden_size, generator=torch.Generator().manual_seed(3))
    ids, gates = route(x, runner.sparse[1].router, 2, normalize=True)
    assert torch.allclose(gates.sum(-1), torch.ones(40)) and ids.unique().numel() > 4
    out = runner.run_experts(1, x, ids, gates)
    for t in range(40):
        want = torch.zeros(model.spec.hidden_size)
        for e, w in zip(ids[t].tolist(), gates[t].tolist(), strict=True):
            gate_up, down = runner.expert_weights(1, e)
            g, u = (gate_up @ x[t]).chunk(2)
            want += w * (down @ (torch.nn.functional.silu(g) * u))
        assert torch.allclose(out[t], want, atol=1e-5)
    model.release(retain=False)


def config(arch: str, **fields) -> dict:
    base = dict(architectures=[arch], vocab_size=320, hidden_size=64, intermediate_size=96,
                num_hidden_layers=4, num_attention_heads=4, num_experts=8,
                num_experts_per_tok=2, moe_intermediate_size=32)
    return base | fields


def test_moe_config_fields(tmp_path):
    path = tmp_path / "config.json"
    spec = parse_config(path, config("Qwen3MoeForCausalLM", decoder_sparse_step=2,
                                     mlp_only_layers=[3], sliding_window=4096))
    assert spec.family == "moe" and spec.sparse_layers == (False, True, False, False)
    assert spec.sliding_windows == (None,) * 4        # use_sliding_window is off
    assert spec.expert_intermediate_size == 32 and not spec.norm_topk_prob
    spec = parse_config(path, config("MixtralForCausalLM", num_local_experts=4,
                                     sliding_window=16))
    assert (spec.num_experts, spec.expert_intermediate_size, spec.norm_topk_prob) == (4, 96, True)
    assert spec.sliding_windows == (16,) * 4 and all(spec.sparse_layers)
    spec = parse_config(path, config("OlmoeForCausalLM", clip_qkv=8, attention_bias=True))
    assert (spec.clip_qkv, spec.qk_norm_per_head, spec.o_bias) == (8.0, False, True)
    spec = parse_config(path, config("Qwen2MoeForCausalLM", qkv_bias=False,
                                     shared_expert_intermediate_size=48))
    assert not spec.qkv_bias and spec.shared_expert_intermediate_size == 48
    with pytest.raises(ModelFormatError, match="num_experts_per_tok"):
        parse_config(path, config("OlmoeForCausalLM", num_experts_per_tok=9))
    with pytest.raises(ModelFormatError, match="mlp_only_layers"):
        parse_config(path, config("Qwen2MoeForCausalLM", mlp_only_layers=["1"]))
    no_experts = config("MixtralForCausalLM")
    del no_experts["num_experts"]
    with pytest.raises(ModelFormatError, match="'num_local_experts'"):
        parse_config(path, no_experts)
