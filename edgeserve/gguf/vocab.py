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

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from edgeserve.gguf.reader import GGUFError, GGUFFile

CONTROL, USER_DEFINED = 3, 4          # llama.cpp's token types
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
    """The byte-level BPE tokenizer of the file; GGUFError for any other kind."""
    kind = f.get("tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise GGUFError(f"{f.path}: tokenizer model '{kind}' is not supported "
                        "(supported: gpt2, byte-level BPE)")
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
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
    types: list[int] = f.get("tokenizer.ggml.token_type", [])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types, strict=False)
                            if k == CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, k in zip(tokens, types, strict=False) if k == USER_DEFINED])
    return tok


def tokenizer_config(f: GGUFFile) -> dict[str, Any]:
    """tokenizer_config.json: the named special tokens and the chat template."""
    tokens: list[str] = f.get("tokenizer.ggml.tokens")
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                              "add_bos_token": False, "clean_up_tokenization_spaces": False}
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
