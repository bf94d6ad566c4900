"""Which grammar library constrains decoding fastest here: llguidance, xgrammar, outlines-core.

Each compiles the same moderately complex JSON schema for the same byte-level BPE
vocabulary, then walks one valid document token by token: per step it fills the
allowed-token bitmask and advances by the document's next token. Prints one JSON line per
library (compile seconds, mean, median and p90 mask+advance microseconds per step) and the
vocabulary size. A library that is not installed is reported as missing.

    .venv/bin/python bench/grammars.py [--vocab 32000] [--repeats 5]

The vocabulary is trained locally on the standard library's source (nothing downloaded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from schemas import DOCUMENT, SCHEMA

OUT = Path(__file__).parent / "out"


def train(vocab: int) -> Tokenizer:
    """A byte-level BPE over the standard library's .py files (cached in bench/out)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    path = OUT / f"grammars-bpe-{vocab}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    files = sorted(Path(json.__file__).parent.parent.glob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((f.read_text(errors="replace") for f in files), trainer=trainer)
    OUT.mkdir(exist_ok=True)
    tok.save(str(path))
    return tok


def token_bytes(tok: Tokenizer) -> list[bytes]:
    from edgeserve.tokenizer import _UNICODE_TO_BYTE

    out = []
    for i in range(tok.get_vocab_size()):
        piece = tok.id_to_token(i) or ""
        out.append(bytes(_UNICODE_TO_BYTE.get(c, 0) for c in piece) if i else b"")
    return out


Walk = tuple[Callable[[], Any], Callable[[Any], Callable[[int, torch.Tensor], None]]]


def llguidance_walk(tok: Tokenizer, vocab: int) -> Walk:
    import llguidance
    import llguidance.torch as llt

    lltok = llguidance.LLTokenizer(tok.to_str(), eos_token=0)

    def compile_() -> Any:
        # The grammar text is built at once; the matcher builds its parser and lexer.
        return llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA))

    def start(matcher: Any) -> Callable[[int, torch.Tensor], None]:

        def step(token: int, mask: torch.Tensor) -> None:
            llt.fill_next_token_bitmask(matcher, mask)
            assert matcher.consume_token(token), matcher.get_error()
        return step
    return compile_, start


def xgrammar_walk(tok: Tokenizer, vocab: int) -> Walk:
    import xgrammar as xgr

    info = xgr.TokenizerInfo(token_bytes(tok), xgr.VocabType.RAW, vocab_size=vocab,
                             stop_token_ids=[0])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)

    def compile_() -> Any:
        return compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                            separators=(",", ":"))

    def start(grammar: Any) -> Callable[[int, torch.Tensor], None]:
        matcher = xgr.GrammarMatcher(grammar)

        def step(token: int, mask: torch.Tensor) -> None:
            matcher.fill_next_token_bitmask(mask)
            assert matcher.accept_token(token)
        return step
    return compile_, start


def outlines_walk(tok: Tokenizer, vocab: int) -> Walk:
    import outlines_core as oc

    pieces: dict[bytes, list[int]] = {}
    for i, b in enumerate(token_bytes(tok)):
        if i:
            pieces.setdefault(b, []).append(i)
    vocabulary = oc.Vocabulary(0, pieces)

    def compile_() -> Any:
        regex = oc.json_schema.build_regex_from_schema(json.dumps(SCHEMA), r"")
        return oc.Index(regex, vocabulary)

    def start(index: Any) -> Callable[[int, torch.Tensor], None]:
        guide = oc.Guide(index)

        def step(token: int, mask: torch.Tensor) -> None:
            guide.write_mask_into(mask.data_ptr(), mask.numel(), 4)
            guide.advance(token)
        return step
    return compile_, start


def measure(walk: Walk, doc: list[int], vocab: int, repeats: int) -> dict[str, float]:
    compile_, start = walk
    compiles, steps = [], []
    mask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    for _ in range(repeats):
        t0 = time.perf_counter()
        grammar = compile_()
        compiles.append(time.perf_counter() - t0)
        step = start(grammar)
        for token in doc:
            t0 = time.perf_counter()
            step(token, mask)
            steps.append(time.perf_counter() - t0)
    steps.sort()
    return {"compile_s": statistics.median(compiles),
            "step_us_mean": 1e6 * statistics.fmean(steps),
            "step_us_median": 1e6 * statistics.median(steps),
            "step_us_p90": 1e6 * steps[int(0.9 * len(steps))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tok = train(args.vocab)
    vocab = tok.get_vocab_size()
    doc = tok.encode(json.dumps(DOCUMENT, separators=(",", ":"))).ids
    walks = {"llguidance": llguidance_walk, "xgrammar": xgrammar_walk,
             "outlines-core": outlines_walk}
    for name, make in walks.items():
        try:
            walk = make(tok, vocab)
        except ImportError as e:
            print(json.dumps({"library": name, "missing": str(e)}))
            continue
        figures = measure(walk, doc, vocab, args.repeats)
        print(json.dumps({"library": name, "vocab": vocab, "doc_tokens": len(doc),
                          **{k: round(v, 4) for k, v in figures.items()}}), flush=True)


if __name__ == "__main__":
    main()
