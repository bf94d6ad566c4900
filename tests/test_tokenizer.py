"""edgeserve.tokenizer against transformers' AutoTokenizer on the demo model."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import TemplateError
from transformers import AutoTokenizer

from edgeserve.demo import build_demo
from edgeserve.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand more   \n",
    "emoji 😀🚀 and rarer ones 🦀🧬🪐",
    "中文文本和日本語のテキスト、한국어도",
    "Straße naïve café ﷺ 𝄞 ∑∫√",
    "def f(x):\n    return x ** 2  # square\n",
    "special <|eot_id|> inside <|begin_of_text|> text",
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Why? 😀 \n"}],
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": 'Tell me\nabout <tags> & "quotes".'},
    ],
]

# Exercises what transformers sets up for templates: tojson (no HTML escaping),
# namespace, loop controls, the {% generation %} tag, extra variables and tokens.
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(turns=0) %}
{% if tools %}Tools: {{ tools | tojson }}
{{ tools | tojson(indent=2) }}
{% endif %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
<|im_start|>{{ m.role }}{% if m.name is defined %} ({{ m.name }}){% endif %}

{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}
{% else %}{{ m.content }}{% endif %}<|im_end|>
{% if ns.turns > 5 %}{% break %}{% endif %}
{% endfor %}
{{ messages | tojson }} [{{ pad_token }}|{{ unk_token }}|{{ eos_token }}]
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

RAISING_TEMPLATE = """{% for m in messages %}
{% if m.role not in ['user', 'assistant'] %}
{{ raise_exception('Only user and assistant roles are supported, got ' + m.role) }}
{% endif %}{{ m.role }}: {{ m.content }}
{% endfor %}"""


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tok(demo_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(demo_dir)


@pytest.fixture(scope="module")
def hf(demo_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(demo_dir)


def _variant(demo_dir: Path, tmp_path: Path, **config_changes: Any) -> Path:
    """A copy of the demo tokenizer with tokenizer_config.json edited and no .jinja file."""
    folder = tmp_path / "variant"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(demo_dir / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(config_changes)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _hf_ids(hf: Any, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
    return list(hf.apply_chat_template(messages, tokenize=True, return_dict=False, **kw))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf: Any, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # the post-processor prepends bos
    assert (
        tok.encode(text, add_special_tokens=False)
        == hf(text, add_special_tokens=False)["input_ids"]
    )
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids)
    assert tok.decode(ids) == text.replace("<|eot_id|>", "").replace("<|begin_of_text|>", "")


def test_special_token_ids(tok: Tokenizer, hf: Any) -> None:
    assert tok.vocab_size == len(hf)
    assert tok.bos_token_id == hf.bos_token_id
    end_ids = hf.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    assert tok.eos_token_ids == frozenset(end_ids)
    assert tok.has_chat_template


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen_prompt", [True, False])
def test_render_chat_matches_transformers(
    tok: Tokenizer, hf: Any, messages: list[dict[str, Any]], gen_prompt: bool
) -> None:
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)
    assert tok.render_chat(messages, add_generation_prompt=gen_prompt) == expected
    ids = tok.encode_chat(messages, add_generation_prompt=gen_prompt)
    assert ids == _hf_ids(hf, messages, add_generation_prompt=gen_prompt)
    assert ids.count(hf.bos_token_id) == 1  # the template's bos only, none added


def test_content_parts_are_joined(tok: Tokenizer, hf: Any) -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    as_parts = [{"role": "user", "content": parts, "name": None}]
    as_text = [{"role": "user", "content": "first\nsecond"}]
    expected = hf.apply_chat_template(as_text, tokenize=False, add_generation_prompt=True)
    assert tok.render_chat(as_parts) == expected
    with pytest.raises(ChatTemplateError, match="image_url"):
        tok.render_chat([{"role": "user", "content": [{"type": "image_url"}]}])


@pytest.mark.parametrize("form", ["string", "list"])
def test_template_in_tokenizer_config(demo_dir: Path, tmp_path: Path, form: str) -> None:
    template: Any = FEATURE_TEMPLATE
    if form == "list":
        template = [
            {"name": "tool_use", "template": "wrong one"},
            {"name": "default", "template": FEATURE_TEMPLATE},
        ]
    eos = {"content": "<|eot_id|>", "special": True, "__type": "AddedToken"}
    folder = _variant(
        demo_dir,
        tmp_path,
        chat_template=template,
        eos_token=eos,
        pad_token="<|end_of_text|>",
        unk_token={"content": "<|end_header_id|>", "__type": "AddedToken"},
    )
    ours, theirs = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    theirs_eos = theirs.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])
    assert ours.eos_token_ids == frozenset(theirs_eos)  # type: ignore[arg-type]
    tools: Any = [{"type": "function", "function": {"name": "f", "description": "<b>ü</b>"}}]
    messages = [
        *CONVERSATIONS[2],
        {"role": "skip", "content": "dropped"},
        {"role": "user", "content": "named", "name": "ann"},
        {"role": "user", "content": "unnamed", "name": None},  # None keys are dropped
    ]
    extras: list[dict[str, Any]] = [{}, {"tools": tools}]
    for extra in extras:
        expected = theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **extra
        )
        assert ours.render_chat(messages, **extra) == expected


def test_raise_exception(demo_dir: Path, tmp_path: Path) -> None:
    folder = _variant(demo_dir, tmp_path, chat_template=RAISING_TEMPLATE)
    ours, theirs = Tokenizer.from_dir(folder), AutoTokenizer.from_pretrained(folder)
    fine = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert ours.render_chat(fine) == theirs.apply_chat_template(fine, tokenize=False)
    bad = [{"role": "system", "content": "x"}]
    with pytest.raises(TemplateError, match="got system"):
        theirs.apply_chat_template(bad, tokenize=False)
    with pytest.raises(ChatTemplateError, match=r"Only user and assistant roles.*got system"):
        ours.render_chat(bad)


def test_no_chat_template(demo_dir: Path, tmp_path: Path) -> None:
    folder = _variant(demo_dir, tmp_path)
    ours = Tokenizer.from_dir(folder)
    assert not ours.has_chat_template
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ours.render_chat([{"role": "user", "content": "hi"}])


def test_invalid_template_syntax(demo_dir: Path, tmp_path: Path) -> None:
    ours = Tokenizer.from_dir(_variant(demo_dir, tmp_path, chat_template="{% for %}"))
    with pytest.raises(ChatTemplateError, match="invalid chat template"):
        ours.render_chat([{"role": "user", "content": "hi"}])


def test_missing_and_malformed_files(demo_dir: Path, tmp_path: Path) -> None:
    folder = _variant(demo_dir, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(folder)
    shutil.copy(demo_dir / "tokenizer.json", folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer_config.json").write_text('{"chat_template": [{"name": "x"}]}')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json"):
        Tokenizer.from_dir(folder)
    (folder / "tokenizer.json").write_text("[]")
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(folder)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_dir(tmp_path / "nowhere")


def test_generation_config_eos_as_int(demo_dir: Path, tmp_path: Path) -> None:
    folder = _variant(demo_dir, tmp_path)
    (folder / "generation_config.json").write_text('{"eos_token_id": 2}')
    ours = Tokenizer.from_dir(folder)
    assert ours.eos_token_ids == {2, ours.encode("<|eot_id|>", add_special_tokens=False)[0]}


# --- incremental detokenization ----------------------------------------------------


def _stream(tok: Tokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt or ())
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_detokenizer_random_ids(tok: Tokenizer, data: st.DataObject) -> None:
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    deltas = _stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(deltas) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_multibyte_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    deltas = _stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_detokenizer_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("🦀𝄞", add_special_tokens=False)
    # Unseen in the corpus, these characters are split over byte tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = [d for d in _stream(tok, ids) if d]
    assert deltas == ["🦀", "𝄞"]


def test_detokenizer_with_prompt_and_specials(tok: Tokenizer) -> None:
    prompt = tok.encode("Hello there")
    out = tok.encode(" world 😀 你好", add_special_tokens=False)
    eot = tok.encode("<|eot_id|>", add_special_tokens=False)
    deltas = _stream(tok, out + eot, prompt)
    assert "".join(deltas) == tok.decode(out) == " world 😀 你好"


def test_detokenizer_decodes_a_small_window(
    tok: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = tok.encode("Some text with emoji 🦀 and 中文. " * 100)
    longest = 0
    real_decode = tok.decode

    def spy(window: list[int], skip_special_tokens: bool = True) -> str:
        nonlocal longest
        longest = max(longest, len(window))
        return real_decode(window, skip_special_tokens)

    monkeypatch.setattr(tok, "decode", spy)
    assert "".join(_stream(tok, ids)) == real_decode(ids)
    assert longest <= 8  # bounded, not growing with the sequence


def test_sandbox_helpers(demo_dir: Path, tmp_path: Path) -> None:
    template = "{{ strftime_now('%Y') }}{% set ns = namespace() %}{% set ns._x = 1 %}"
    ours = Tokenizer.from_dir(_variant(demo_dir, tmp_path, chat_template=template))
    with pytest.raises(ChatTemplateError, match="'_x' is not allowed"):
        ours.render_chat([{"role": "user", "content": "hi"}])
    ours.chat_templates["default"] = template.split("{% set")[0]
    assert ours.render_chat([{"role": "user", "content": "hi"}]) == str(datetime.now().year)


def test_token_bytes_rebuild_the_text_byte_for_byte(tok: Tokenizer) -> None:
    """A multi-byte character split across tokens: each token's own bytes, joined, are the
    UTF-8 of the text (what OpenAI's logprobs `bytes` field carries)."""
    text = "naïve 🎉 汉字 ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    partial = [i for i in ids if tok.decode([i]).endswith("\ufffd")]
    assert partial and all(b"\xef\xbf\xbd" not in tok.token_bytes(i) for i in partial)
    eos = min(tok.eos_token_ids)
    assert tok.token_bytes(eos) == tok.decode([eos], skip_special_tokens=False).encode()
