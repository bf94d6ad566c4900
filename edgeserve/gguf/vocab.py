"""The tokenizer a GGUF file describes, built with the `tokenizers` library.

A GGUF carries no tokenizer.json: its metadata holds the vocabulary, the merges, a token
type per token, the special token ids, the name of the pre-tokenizer the merges were
learned with, and the chat template. Byte-level BPE ("gpt2", the tokenizer of Llama 3,
Qwen and SmolLM) is rebuilt from those: tokens typed control become special added tokens,
user-defined ones plain added tokens, and the pre-tokenizer splits text with the pattern
its model family uses (as llama.cpp does for the same name).
"""

from __future__ import annotations

import functools
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from edgeserve.gguf.reader import GGUFError, GGUFFile

CONTROL, USER_DEFINED = 3, 4          # llama.cpp's token types
SPACE = "\u2581"                      # sentencepiece's visible space
_CONTRACTIONS = r"'s|'t|'re|'ve|'m|'ll|'d"
_LLAMA3 = (rf"(?i:{_CONTRACTIONS})|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}{{1,3}}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (rf"(?i:{_CONTRACTIONS})|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|\p{{N}}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the splits before byte-level encoding; None: GPT-2's own pattern.
_SPLITS: dict[str, list[str] | None] = {
    "default": None, "gpt2": None, "gpt-2": None,
    "smollm": [r"\p{N}"],                       # every digit alone, then GPT-2's pattern
    "llama3": [_LLAMA3], "llama-v3": [_LLAMA3], "llama-bpe": [_LLAMA3], "smaug-bpe": [_LLAMA3],
    "qwen2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2], "megrez": [_QWEN2],
}
# Control tokens that end a turn, besides the file's eos / eot / eom ids (llama.cpp's list).
_END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                "<|eom_id|>", "<EOT>", "</s>", "<|end_of_text|>")


@functools.cache
def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte (the alphabet of byte-level vocabularies)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in spelling:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def build_tokenizer(f: GGUFFile) -> Tokenizer:
    """The tokenizer of the file: byte-level BPE ("gpt2") or sentencepiece BPE ("llama")."""
    kind = f.get("tokenizer.ggml.model", None)
    if kind not in ("gpt2", "llama"):
        raise GGUFError(f"{f.path}: tokenizer model '{kind}' is not supported "
                        "(supported: gpt2 (byte-level BPE), llama (sentencepiece BPE))")
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    types: list[int] = f.get("tokenizer.ggml.token_type", [])
    tok = _byte_level(f, tokens) if kind == "gpt2" else _sentencepiece(f, tokens, types)
    # In a byte-level vocabulary every real token is spelled in the byte alphabet: a
    # control token spelled otherwise is a mislabel, left out.
    spelled = set(byte_alphabet().values()) if kind == "gpt2" else None
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types, strict=False)
                            if k == CONTROL and (spelled is None or set(t) <= spelled)])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types, strict=False) if k == USER_DEFINED])
    if kind == "llama" and f.get("tokenizer.ggml.add_bos_token", True):
        bos = tokens[int(f.get("tokenizer.ggml.bos_token_id", 1))]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokens.index(bos))])
    return tok


def _byte_level(f: GGUFFile, tokens: list[str]) -> Tokenizer:
    merges: list[str] = f.get("tokenizer.ggml.merges")
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in _SPLITS:
        raise GGUFError(f"{f.path}: pre-tokenizer '{pre}' is not supported "
                        f"(supported: {', '.join(_SPLITS)})")
    alphabet = set(byte_alphabet().values())
    spell = byte_alphabet()
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()): i
             for i, t in enumerate(tokens)}
    pairs = [(a, b) for a, _, b in (m.partition(" ") for m in merges)]
    tok = Tokenizer(BPE(vocab, pairs, fuse_unk=False, continuing_subword_prefix="",
                        end_of_word_suffix=""))
    splits = _SPLITS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=splits is None
                                          or pre == "smollm")
    steps: list[Any] = [pre_tokenizers.Split(Regex(s), behavior="isolated")
                        for s in splits or []]
    tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, byte_level])
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(f: GGUFFile, tokens: list[str], types: list[int]) -> Tokenizer:
    """Sentencepiece BPE (Llama 2, Mistral): pieces with scores, "▁" for spaces, bytes
    as <0xNN> pieces when no piece covers them."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = f.get("tokenizer.ggml.merges", None)
    pairs = [(a, b) for a, _, b in (m.partition(" ") for m in merges)] if merges else \
        spm_merges(vocab, f.get("tokenizer.ggml.scores"))
    unk = f.get("tokenizer.ggml.unknown_token_id", None)
    tok = Tokenizer(BPE(vocab, pairs, unk_token=tokens[int(unk)] if unk is not None else None,
                        fuse_unk=True, byte_fallback=True))
    prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPACE, prepend_scheme="first" if prefix else "never", split=False)
    steps: list[Any] = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a sentencepiece vocabulary implies: every split of a piece into two
    pieces, the best-scored merged piece first (sentencepiece's BPE merges the pair whose
    result scores highest); among equal scores, longer left then right parts first."""
    found = []
    for piece, i in vocab.items():
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        found += [(a, b, scores[i]) for a, b in sorted(splits, key=lambda p: (vocab[p[0]],
                                                                            vocab[p[1]]))]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in found]


def tokenizer_config(f: GGUFFile) -> dict[str, Any]:
    """tokenizer_config.json: the named special tokens and the chat template."""
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    # A sentencepiece vocabulary's tokenizer adds BOS (its post-processor); byte-level
    # ones add none, as transformers reads them.
    adds_bos = f.get("tokenizer.ggml.model", None) == "llama" and \
        bool(f.get("tokenizer.ggml.add_bos_token", True))
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "add_bos_token": adds_bos, "clean_up_tokenization_spaces": False}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"),
                      ("pad_token", "padding")):
        token_id = f.get(f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None and 0 <= int(token_id) < len(tokens):
            config[name] = tokens[int(token_id)]
    template = f.get("tokenizer.chat_template", None)
    if template:
        config["chat_template"] = template
    return config


def end_of_generation_ids(f: GGUFFile) -> list[int]:
    """Token ids that end generation: the file's eos / eot / eom ids and the control tokens
    that end a turn (a chat model ends its answer with those)."""
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    types: list[int] = f.get("tokenizer.ggml.token_type", [])
    ids = {int(i) for key in ("eos", "eot", "eom")
           if (i := f.get(f"tokenizer.ggml.{key}_token_id", None)) is not None}
    ids |= {i for i, (t, k) in enumerate(zip(tokens, types, strict=False))
            if k == CONTROL and t in _END_OF_TURN}
    return sorted(ids)
