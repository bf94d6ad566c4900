"""Grammar-constrained decoding: replies valid under their schema on every architecture
family, constrained and free sequences in one batch, the logits mask itself."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
import xgrammar as xgr

from edgeserve import EdgeServer
from edgeserve.constrain import Grammar, GrammarState, compile_grammar, mask_logits
from edgeserve.constrain.grammar import compiler_for
from edgeserve.results import InvalidRequest
from edgeserve.tokenizer import Tokenizer

from .conftest import FAMILIES

MESSAGES = [{"role": "user", "content": "Describe a person."}]
# Random weights fill every open string and number to the limit: the schemas bound them.
SCHEMAS: dict[str, dict[str, Any]] = {
    "object": {"type": "object",
               "properties": {"name": {"type": "string", "maxLength": 8},
                              "age": {"type": "integer", "minimum": 0, "maximum": 120},
                              "ok": {"type": "boolean"}},
               "required": ["name", "age", "ok"], "additionalProperties": False},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9},
              "minItems": 1, "maxItems": 4},
    "enum": {"enum": ["red", "green", "blue"]},
    "nested": {"type": "object",
               "properties": {"user": {"type": "object",
                                       "properties": {"id": {"type": "integer", "minimum": 0,
                                                             "maximum": 99},
                                                      "tags": {"type": "array", "maxItems": 2,
                                                               "items": {"enum": ["a", "b"]}}},
                                       "required": ["id", "tags"],
                                       "additionalProperties": False},
                              "kind": {"enum": ["x", "y"]}},
               "required": ["user", "kind"], "additionalProperties": False},
}


@pytest.mark.parametrize("arch", FAMILIES)
async def test_schema_replies_validate_on_every_family(family_store: Path, arch: str) -> None:
    async with EdgeServer(models=family_store, device="cpu", pool_size="256MiB") as es:
        for name, schema in SCHEMAS.items():
            for seed in (None, 1):      # greedy and sampled
                out = await es.chat(arch, MESSAGES, max_tokens=200, seed=seed,
                                    temperature=0 if seed is None else 1.0,
                                    grammar=Grammar.json_schema(schema))
                assert out.finish_reason == "stop", (name, out.text)
                jsonschema.validate(json.loads(out.text), schema)


async def test_constrained_and_free_batch_together(demo_store: Path) -> None:
    grammar = Grammar.json_schema(SCHEMAS["nested"])
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    kinds = [grammar, None, grammar, None]
    async with EdgeServer(models=demo_store, device="cpu", pool_size="256MiB") as es:
        async def one(i: int) -> list[int]:
            out = await es.chat("demo-llama", prompts[i], max_tokens=40, temperature=0,
                                grammar=kinds[i])
            return out.token_ids
        alone = [await one(i) for i in range(4)]
        steps = es.engine.steps if es.engine else 0
        together = await asyncio.gather(*(one(i) for i in range(4)))
        ran = (es.engine.steps if es.engine else 0) - steps
    assert together == alone
    # One batch: far fewer steps than the four run one after another.
    assert ran < sum(len(t) for t in alone) * 0.6
    for i in (0, 2):
        assert json.loads(Tokenizer.from_dir(demo_store / "demo-llama").decode(together[i]))


def test_mask_allows_only_grammar_tokens(demo_store: Path) -> None:
    tok = Tokenizer.from_dir(demo_store / "demo-llama")
    vocab = 3072
    compiled = compile_grammar(Grammar.json_schema(SCHEMAS["enum"]), tok, vocab,
                               tok.eos_token_ids)
    states: list[GrammarState | None] = [GrammarState(compiled), None]
    logits = torch.zeros(2, vocab)
    mask_logits(logits, states)
    allowed = [i for i in range(vocab) if logits[0, i] == 0]
    assert allowed and all(tok.token_bytes(i) and b'"'.startswith(tok.token_bytes(i)[:1])
                           for i in allowed)
    assert bool((logits[1] == 0).all())                # the free row is untouched
    # The same mask as the library's own kernel, rows constrained or not.
    random = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    ours = mask_logits(random.clone(), [None, GrammarState(compiled), GrammarState(compiled)])
    bitmask = xgr.allocate_token_bitmask(3, vocab)
    GrammarState(compiled).fill(bitmask, 1)
    GrammarState(compiled).fill(bitmask, 2)
    theirs = random.clone()
    xgr.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab)
    assert torch.equal(ours, theirs) and torch.equal(ours[0], random[0])
    # Compiled once per schema: the second compile comes from the cache.
    again = compile_grammar(Grammar.json_schema(SCHEMAS["enum"]), tok, vocab, tok.eos_token_ids)
    assert compiler_for(tok, vocab, tok.eos_token_ids).get_cache_size_bytes() > 0
    assert again.memory_size_bytes == compiled.memory_size_bytes


async def test_bad_schema_is_an_invalid_request(demo_store: Path) -> None:
    async with EdgeServer(models=demo_store, device="cpu", pool_size="256MiB") as es:
        with pytest.raises(InvalidRequest) as bad:
            await es.chat("demo-llama", MESSAGES, max_tokens=4,
                          grammar=Grammar.json_schema({"type": "no-such-type"}))
        assert bad.value.param == "grammar"


def test_bounded_strings_hold_no_control_characters(demo_store: Path) -> None:
    tok = Tokenizer.from_dir(demo_store / "demo-llama")
    compiled = compile_grammar(Grammar.json_schema({"type": "string", "maxLength": 4}), tok,
                               3072, tok.eos_token_ids)

    def takes(text: str) -> bool:
        return bool(xgr.GrammarMatcher(compiled).accept_string(text))
    assert takes('"abcd"') and takes('""')
    assert not takes('"abcde') and not takes('"a\x1d') and not takes('"a\n')
