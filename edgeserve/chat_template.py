"""Chat templates rendered as transformers renders them: jinja2's immutable sandbox with
transformers' filters, globals and tags."""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The chat template is missing, invalid, or rejected the conversation."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    # Unlike jinja's own tojson: no HTML escaping, non-ASCII kept; takes
    # json.dumps' separators and sort_keys too, as transformers' filter does.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (no reach into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]  # jinja's signature trick: `self` may be a key
        jinja2.utils.Namespace.__init__(self)
        for key, value in dict(*rest, **kwargs).items():
            _Namespace.__setitem__(self, key, value)  # attribute lookup would hit the keys

    def __setitem__(self, name: str, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")
        jinja2.utils.Namespace.__setitem__(self, name, value)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for
    transformers' assistant-token masks; rendering just passes the body through."""

    tags = {"generation"}  # noqa: RUF012 (jinja reads this class attribute)

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = _Namespace
    return env


@functools.lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"invalid chat template (line {e.lineno}): {e.message}") from e
