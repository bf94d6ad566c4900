"""The choice of tools a request allows, and the grammar of a forced call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeserve.constrain import Grammar
from edgeserve.results import InvalidRequest


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """`none`, `auto`, `required`, or one function by name (`function` set)."""

    mode: str = "auto"
    function: str | None = None

    @property
    def forced(self) -> bool:
        """Generation must be one call (it is grammar-constrained)."""
        return self.mode == "required" or self.function is not None


def tool_names(tools: list[dict[str, Any]]) -> list[str]:
    """The function names of OpenAI-shaped tools, checked."""
    names = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or \
                tool.get("type", "function") != "function":
            raise InvalidRequest(f"tools[{i}] must be {{'type': 'function', 'function': "
                                 "{'name': ..., 'parameters': ...}}", "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object",
                                 "tools")
        names.append(fn["name"])
    return names


def call_grammar(tools: list[dict[str, Any]], choice: ToolChoice) -> Grammar:
    """The grammar of one call {"name": ..., "arguments": {...}}: of the named function, or
    of any of the tools (`required`); arguments match the function's parameter schema."""
    names = tool_names(tools)
    if choice.function is not None and choice.function not in names:
        raise InvalidRequest(f"tool_choice names function '{choice.function}', which is not "
                             f"among the tools ({', '.join(names) or 'none'})", "tool_choice")
    if not names:
        raise InvalidRequest(f"tool_choice '{choice.mode}' needs at least one tool", "tool_choice")
    options = [_call_schema(t["function"]) for t in tools
               if choice.function in (None, t["function"]["name"])]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    strict = any(t["function"].get("strict") for t in tools)
    return Grammar.json_schema(schema, strict=strict)


def _call_schema(fn: dict[str, Any]) -> dict[str, Any]:
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_choice(value: Any) -> ToolChoice:
    """OpenAI's tool_choice: "none" | "auto" | "required" |
    {"type": "function", "function": {"name": ...}} (None: auto)."""
    if value is None or value in ("none", "auto", "required"):
        return ToolChoice(value or "auto")
    fn = value.get("function") if isinstance(value, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("name"), str):
        return ToolChoice("function", fn["name"])
    raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or "
                         "{'type': 'function', 'function': {'name': ...}}", "tool_choice")
