"""Tool calling: the calls a model writes, parsed from its output in the format its chat
template teaches (Hermes/Qwen, Llama 3.x JSON, Mistral), whole or as a stream; and the
grammar that makes a required or named call valid JSON matching its parameter schema."""

from edgeserve.tools.calls import ToolChoice, call_grammar, tool_choice, tool_names
from edgeserve.tools.parser import FORMATS, ToolCallParser, detect_format, parse_calls
from edgeserve.tools.stream import ToolPlan, parse_stream, plan_tools

__all__ = ["FORMATS", "ToolCallParser", "ToolChoice", "ToolPlan", "call_grammar",
           "detect_format", "parse_calls", "parse_stream", "plan_tools", "tool_choice",
           "tool_names"]
