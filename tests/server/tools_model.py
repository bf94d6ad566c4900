"""A copy of the demo model whose chat template renders tools the Hermes way."""

from __future__ import annotations

import shutil
from pathlib import Path

HERMES_TEMPLATE = """{{- bos_token }}
{%- if tools %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\nFunctions you may call:\\n' }}
{%- for tool in tools %}{{- tool | tojson }}{{- '\\n' }}{%- endfor %}
{{- 'Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|eot_id|>' }}
{%- endif %}
{%- for message in messages %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
{%- if message.tool_calls is defined %}
{%- for call in message.tool_calls %}
{{- '<tool_call>' + {'name': call.function.name, 'arguments': call.function.arguments} | tojson
    + '</tool_call>' }}
{%- endfor %}
{%- else %}{{- message['content'] | trim }}{%- endif %}
{{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def make_tools_model(demo_store: Path, root: Path, name: str = "tool-llama") -> Path:
    folder = root / name
    shutil.copytree(demo_store / "demo-llama", folder)
    (folder / "chat_template.jinja").write_text(HERMES_TEMPLATE, encoding="utf-8")
    return folder
