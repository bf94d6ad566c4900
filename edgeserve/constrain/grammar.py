"""What a sequence is constrained to (`Grammar`) and its compilation for one vocabulary.

A vocabulary is a tokenizer seen with a model's vocabulary size and stop tokens. Its
compiler is made once (the token bytes of every id) and keeps the compiled grammars in a
cache keyed by the schema text, so a schema is compiled once per vocabulary.
"""

from __future__ import annotations

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
        return cls("json_schema", json.dumps(_bounded_strings(schema)), bool(strict))


# xgrammar 0.2 lets a string with minLength / maxLength hold raw control characters, which
# JSON forbids; the same bounds as a pattern over the characters that need no escape keep
# the output valid JSON (such strings then hold no quote or backslash).
_SAFE_CHAR = r'[^"\\\x00-\x1f]'


def _bounded_strings(node: Any) -> Any:
    if isinstance(node, list):
        return [_bounded_strings(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_strings(v) for k, v in node.items()}
    bounds = ("minLength", "maxLength")
    if out.get("type") == "string" and any(b in out for b in bounds) and \
            "pattern" not in out and "format" not in out:
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f"^{_SAFE_CHAR}{{{low},{high}}}$"
    return out


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
    compact = (",", ":")
    try:
        schema = '{"type": "object"}' if grammar.kind == "json" else grammar.schema
        return compiler.compile_json_schema(schema, any_whitespace=False,
                                            separators=compact, strict_mode=grammar.strict)
    except (RuntimeError, ValueError, TypeError) as e:
        raise GrammarError(f"the JSON schema cannot be used: {e}") from e
