"""Sentencepiece vocabularies (Llama 2, Mistral) rebuilt from GGUF metadata, against
transformers' GGUF tokenizer."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from edgeserve.gguf import GGUFFile
from edgeserve.gguf.vocab import build_tokenizer, tokenizer_config

PIECES = ["▁", "t", "h", "e", "a", "n", "d", "c", "s", "o", "w", "r", "l", "é", "▁t", "he",
          "▁the", "▁a", "an", "▁an", "nd", "▁and", "at", "▁c", "▁cat", "▁s", "ow", "▁w",
          "or", "ld", "▁wor", "▁world", "ca", "▁h", "▁hat", "▁é", "ét", "▁ét", "é▁"]
TEXTS = ["the cat and the hat", "  leading spaces and  double", "hello world", "été",
         "émoji 🤖 and 中文", "a\nb\tc", "<s>the</s> cat", "theworld"]


def spm_file(path, add_bos: bool = True):
    w = gguf.GGUFWriter(str(path), "llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    scores = [0.0] * 259 + [-float(i) for i in range(len(PIECES))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_vocabulary_encodes_and_decodes_as_transformers(tmp_path):
    from transformers import AutoTokenizer

    path = spm_file(tmp_path / "spm.gguf")
    ours = build_tokenizer(GGUFFile(path))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == 1                                # BOS, as add_bos_token says
        assert ours.decode(ids, skip_special_tokens=False) == \
            theirs.decode(ids, skip_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
        if not text.startswith(" "):       # the prefix space is stripped, one leading too
            assert ours.decode(ids) == text.replace("<s>", "").replace("</s>", "")
    assert ours.encode("the cat").tokens == ["<s>", "▁the", "▁cat"]
    assert ours.encode("🤖").tokens[1:] == ["▁", "<0xF0>", "<0x9F>", "<0xA4>", "<0x96>"]
    assert tokenizer_config(GGUFFile(path))["add_bos_token"] is True


def test_unsupported_tokenizer_model_is_named(tmp_path):
    path = tmp_path / "t5.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("t5")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="tokenizer model 't5' is not supported"):
        build_tokenizer(GGUFFile(path))
