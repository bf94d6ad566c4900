"""Tokenizers, chat templates and incremental detokenization.

Behaves like transformers' fast tokenizers (``encode``/``decode``/
``apply_chat_template``) on a Hugging Face model folder, without importing
transformers: the ``tokenizers`` library does the encoding, chat_template.py renders the
chat template in the same sandbox with the same helpers transformers installs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from tokenizers import Tokenizer as _Backend

from edgeserve.chat_template import ChatTemplateError, compile_template

# The named special tokens transformers passes to chat templates (its special_tokens_map).
_SPECIAL_TOKEN_NAMES = tuple(
    f"{n}_token" for n in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
)
# Names a message's reasoning may come under; transformers fills in the first two from any.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """A Hugging Face tokenizer folder: encoding, decoding and chat templates."""

    def __init__(
        self,
        backend: _Backend,
        config: dict[str, Any],
        chat_template: str | dict[str, str] | None = None,
        generation_config: dict[str, Any] | None = None,
    ) -> None:
        self._backend = backend
        if isinstance(chat_template, str):
            chat_template = {"default": chat_template}
        # Named templates like transformers': "default", and "tool_use" when tools are given.
        self.chat_templates: dict[str, str] = dict(chat_template or {})
        self.special_tokens = {
            name: tok
            for name in _SPECIAL_TOKEN_NAMES
            if (tok := _token_content(config.get(name), name)) is not None
        }
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        bos = self.special_tokens.get("bos_token")
        self.bos_token_id: int | None = backend.token_to_id(bos) if bos is not None else None
        self.eos_token_ids: frozenset[int] = self._collect_eos(generation_config or {})
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        self._byte_level = "ByteLevel" in json.dumps(decoder)
        added = backend.get_added_tokens_decoder()
        self._special_ids = {t.content for t in added.values() if t.special}
        # Ids of special tokens (never text: a grammar does not allow them).
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load ``tokenizer.json``, ``tokenizer_config.json``, the chat templates
        (``chat_template.jinja`` and ``additional_chat_templates/*.jinja``, else
        the config's ``chat_template``) and ``generation_config.json`` if present."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} is missing")
        try:
            backend = _Backend.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{tok_file} is not a valid tokenizer: {e}") from e
        config = _read_json(folder / "tokenizer_config.json")
        gen_file = folder / "generation_config.json"
        gen_config = _read_json(gen_file) if gen_file.exists() else None
        return cls(backend, config, _find_chat_templates(folder, config), gen_config)

    def _collect_eos(self, generation_config: dict[str, Any]) -> frozenset[int]:
        ids: set[int] = set()
        eos = self.special_tokens.get("eos_token")
        if eos is not None and (eos_id := self._backend.token_to_id(eos)) is not None:
            ids.add(eos_id)
        gen_eos = generation_config.get("eos_token_id")
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif isinstance(gen_eos, list):
            ids.update(i for i in gen_eos if isinstance(i, int))
        return frozenset(ids)

    @property
    def has_chat_template(self) -> bool:
        """Whether the model ships a chat template."""
        return bool(self.chat_templates)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for, also when it is part of a character (byte-level
        BPE alphabet, `<0xNN>` byte fallback, SentencePiece's '\u2581' for a space)."""
        piece = self._backend.id_to_token(token_id)
        if piece is None:
            return b""
        if piece in self._special_ids:
            return piece.encode()
        if self._byte_level and all(ch in _UNICODE_TO_BYTE for ch in piece):
            return bytes(_UNICODE_TO_BYTE[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            with contextlib.suppress(ValueError):
                return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies the post-processor (e.g. bos)."""
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Like transformers 5, no clean-up of spaces for BPE."""
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render ``messages`` with the chat template, as transformers'
        ``apply_chat_template(..., tokenize=False)`` does. ``extra`` becomes
        template variables (e.g. ``tools``); it overrides the special tokens."""
        if not messages:
            raise ChatTemplateError("cannot render an empty conversation")
        template = compile_template(self._pick_template(extra.get("tools")))
        context = {"tools": None, "documents": None, **self.special_tokens, **extra}
        context["messages"] = [_normalise_message(m) for m in messages]
        context["add_generation_prompt"] = add_generation_prompt
        try:
            return template.render(**context)
        except (jinja2.TemplateError, TypeError) as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e

    def _pick_template(self, tools: Any) -> str:
        if not self.chat_templates:
            raise ChatTemplateError(
                "this model has no chat template (no chat_template.jinja and no "
                "chat_template in tokenizer_config.json); use a plain completion instead"
            )
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" not in self.chat_templates:
            names = sorted(self.chat_templates)
            raise ChatTemplateError(f"no default chat template among {names}")
        return self.chat_templates["default"]

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """Token ids of the rendered chat. The template writes the special tokens
        itself, so none are added (transformers' ``tokenize=True`` behaviour)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **extra)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turns a token stream into text deltas, never splitting a UTF-8 character.

    Only a small window is decoded per token: ``ids[prefix:read]`` is text that
    was already emitted (kept as context, so decoders that strip a leading
    space do so consistently) and ``ids[read:]`` is not yet emitted. New text is
    held back while it ends in U+FFFD, i.e. an incomplete byte sequence.
    """

    _PROMPT_CONTEXT = 5  # prompt tokens kept as decoding context

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids)[-self._PROMPT_CONTEXT :]
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text = self._decode(0, self._read)
        self.text = ""

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end])

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (maybe "")."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """End of stream: return whatever text is still held back."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        new_text = self._decode(self._prefix)
        if len(new_text) <= len(self._prefix_text):
            return ""  # e.g. a skipped special token
        if new_text.endswith(_REPLACEMENT) and not final:
            return ""  # maybe the next token completes the character
        delta = new_text[len(self._prefix_text) :]
        # The emitted text becomes the context; drop older ids so memory stays bounded.
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        self._prefix_text = self._decode(0)
        self.text += delta
        return delta


def _token_content(value: Any, name: str) -> str | None:
    # tokenizer_config.json stores tokens as strings or as AddedToken dicts.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    raise ValueError(f"tokenizer_config.json: {name} must be a string or {{'content': ...}}")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _find_chat_templates(folder: Path, config: dict[str, Any]) -> dict[str, str]:
    # As in transformers, template files take priority over the config entry.
    files = {}
    if (folder / "chat_template.jinja").is_file():
        files["default"] = folder / "chat_template.jinja"
    files.update((f.stem, f) for f in sorted(folder.glob("additional_chat_templates/*.jinja")))
    if files:
        return {name: f.read_text(encoding="utf-8") for name, f in files.items()}
    template = config.get("chat_template")
    if template is None:
        return {}
    if isinstance(template, str):
        return {"default": template}
    if isinstance(template, list) and all(isinstance(t, dict) for t in template):
        named = {t.get("name"): t.get("template") for t in template}
        valid = all(isinstance(k, str) and isinstance(v, str) for k, v in named.items())
        if valid and "default" in named:
            return {str(k): str(v) for k, v in named.items()}
    raise ValueError(
        f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list of "
        "{name, template} entries including one named 'default'"
    )


def _normalise_message(message: dict[str, Any]) -> dict[str, Any]:
    # Like transformers: keys set to None are dropped (templates test for presence).
    msg = {k: v for k, v in message.items() if v is not None}
    content = msg.get("content")
    if isinstance(content, list):
        msg["content"] = _join_text_parts(content)
    reasoning = next((msg[k] for k in _REASONING_FIELDS if k in msg), None)
    if reasoning is not None:
        msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
    return msg


def _join_text_parts(parts: list[Any]) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            texts.append(str(part.get("text", "")))
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ChatTemplateError(f"unsupported message content part {kind!r}: text only")
    return "\n".join(texts)


# --- the jinja2 environment transformers renders chat templates in -----------------


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE writes each byte as one printable character: printable Latin-1 bytes
    stand for themselves, the others are shifted past 255. This is its inverse."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    out, shift = {}, 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + shift)] = b
            shift += 1
    return out


_UNICODE_TO_BYTE = _byte_alphabet()
