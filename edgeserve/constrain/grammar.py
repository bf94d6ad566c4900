"""What a sequence is constrained to (`Grammar`) and its compilation for one vocabulary.

A vocabulary is a tokenizer seen with a model's vocabulary size and stop tokens. Its
compiler is made once (the token bytes of every id) and keeps the compiled grammars in a
cache keyed by the schema text, so a schema is compiled once per vocabulary.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import xgrammar as xgr

from edgeserve.tokenizer import Tokenizer

COMPILER_THREADS = 2
CACHE_BYTES = 256 << 20       # compiled grammars kept per vocabulary


class GrammarError(ValueError):
    """The grammar (a JSON schema) cannot be compiled."""


@dataclass(frozen=True, slots=True)
class Grammar:
    """Output constrained to a JSON object (`json`) or to a JSON schema (`json_schema`).

    JSON is written compactly (no whitespace between tokens), so that every token makes
    progress. `strict` (OpenAI's flag) forbids properties and items the schema does not
    declare even where the schema leaves them open.
    """

    kind: Literal["json", "json_schema"]
    schema: str = ""                # canonical JSON text of the schema (json_schema only)
    strict: bool = False

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's `json_object`, Ollama's `"json"`)."""
        return cls("json")

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | bool, strict: bool = False) -> Grammar:
        if not isinstance(schema, dict | bool):
            raise GrammarError(f"a JSON schema is an object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema), bool(strict))


_compilers: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, frozenset[int]],
                                                      xgr.GrammarCompiler]] = \
    weakref.WeakKeyDictionary()
_lock = threading.Lock()


def compiler_for(tokenizer: Tokenizer, vocab_size: int,
                 stop_ids: frozenset[int]) -> xgr.GrammarCompiler:
    """The compiler of one vocabulary (made once: it reads every token's bytes)."""
    with _lock:
        per_tokenizer = _compilers.setdefault(tokenizer, {})
        key = (vocab_size, stop_ids)
        if key not in per_tokenizer:
            special = tokenizer.special_ids
            # Special tokens and ids past the tokenizer are never text: no bytes, never allowed.
            vocab = [b"" if i in special or i >= tokenizer.vocab_size
                     else tokenizer.token_bytes(i) for i in range(vocab_size)]
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=vocab_size,
                                     stop_token_ids=sorted(stop_ids))
            per_tokenizer[key] = xgr.GrammarCompiler(info, max_threads=COMPILER_THREADS,
                                                     cache_limit_bytes=CACHE_BYTES)
        return per_tokenizer[key]


def compile_grammar(grammar: Grammar, tokenizer: Tokenizer, vocab_size: int,
                    stop_ids: frozenset[int]) -> xgr.CompiledGrammar:
    """The compiled grammar (from the compiler's cache when this schema was seen before)."""
    compiler = compiler_for(tokenizer, vocab_size, stop_ids)
    schema = '{"type": "object"}' if grammar.kind == "json" else grammar.schema
    try:
        return compiler.compile_grammar(_ebnf(schema, grammar.strict))
    except (RuntimeError, ValueError, TypeError) as e:
        raise GrammarError(f"the JSON schema cannot be used: {e}") from e


# xgrammar 0.2 writes the characters of a string with minLength / maxLength as this class,
# which lets raw control characters in (JSON forbids them); they are taken out of it.
_LENIENT, _JSON_CHAR = r'[^\"\\\r\n]', r'[^\"\\\0-\x1f]'


@functools.lru_cache(maxsize=256)
def _ebnf(schema: str, strict: bool) -> str:
    """The grammar of a JSON schema, compact JSON, as EBNF text (the compiler caches by it)."""
    try:
        text = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False,
                                                separators=(",", ":"), strict_mode=strict))
    except (RuntimeError, ValueError, TypeError) as e:
        raise GrammarError(f"the JSON schema cannot be used: {e}") from e
    return text.replace(_LENIENT, _JSON_CHAR)
