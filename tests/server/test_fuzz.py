"""Hypothesis-made request bodies: whatever arrives, the answer is a 2xx, or a 4xx in
OpenAI's error shape that names the field at fault. Never a 5xx."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import event as note_event
from hypothesis import strategies as st

MODEL = "demo-llama"
ERROR_KEYS = {"message", "type", "param", "code"}
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# ---- values -----------------------------------------------------------------------------
scalars = (st.none() | st.booleans() | st.integers() | st.text(max_size=12)
           | st.floats(allow_nan=False, allow_infinity=False))
garbage = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
huge = (st.integers(min_value=2**63 - 2, max_value=10**40)
        | st.integers(min_value=-(10**40), max_value=-(2**63) + 2)
        | st.sampled_from([1e308, -1e308, 1e-320, -0.0]))
negative = st.integers(-5, -1) | st.floats(-2, -1e-9)
nan_like = st.sampled_from(["NaN", "nan", "Infinity", "-inf", "1e999", "", "null", "0x10"])
bad = garbage | huge | negative | nan_like
# Generation stays tiny: max_tokens is always sent, never null (the default is 256 tokens)
# and never large (valid: it generates to the end of the context).
tiny_max_tokens = (st.integers(-3, 3) | st.integers(max_value=-(2**63)) | nan_like
                   | st.booleans() | st.floats(-1, 4) | st.lists(garbage, max_size=2))

# Plausible values: mostly valid; bodies() breaks a few fields on purpose.
content = st.text(max_size=30) | st.lists(st.fixed_dictionaries(
    {"type": st.just("text"), "text": st.text(max_size=10)}), min_size=1, max_size=2)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
     "content": content}, optional={"name": st.text(max_size=5)})
token_ids = st.lists(st.integers(0, 3071), min_size=1, max_size=8)
prompts = (st.text(max_size=30) | token_ids | st.lists(st.text(max_size=10), min_size=1,
                                                        max_size=3)
           | st.lists(token_ids, min_size=1, max_size=3))
SAMPLING = {
    "temperature": st.floats(0, 2) | st.none(), "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.integers(-1, 50), "seed": st.integers(-(2**70), 2**70),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4),
                                                       max_size=3),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries(
        {"include_usage": st.booleans()}), "n": st.integers(1, 3),
    "ignore_eos": st.booleans(), "user": st.text(max_size=5),
}
CHAT = {**SAMPLING, "messages": st.lists(message, min_size=1, max_size=3),
        "logprobs": st.booleans(), "top_logprobs": st.integers(0, 3),
        "max_completion_tokens": st.integers(1, 3)}
COMPLETION = {**SAMPLING, "prompt": prompts, "logprobs": st.integers(0, 3),
              "echo": st.just(False), "suffix": st.none(), "best_of": st.integers(1, 3)}


@st.composite
def bodies(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]], required: str) -> Any:
    """Mostly plausible bodies with a few fields broken, missing or of the wrong type."""
    body: dict[str, Any] = {"model": MODEL if draw(st.integers(0, 9)) else draw(garbage),
                            required: draw(fields[required]),
                            "max_tokens": draw(st.integers(1, 3)),
                            "stream": draw(st.booleans())}
    body |= draw(st.fixed_dictionaries({}, optional=fields))
    for _ in range(draw(st.integers(0, 3))):
        name = draw(st.sampled_from(sorted([*fields, "model", "max_tokens", "nested"])))
        if name in ("max_tokens", "max_completion_tokens"):
            body[name] = draw(tiny_max_tokens)
        elif draw(st.booleans()):
            body.pop(name, None)
        else:
            body[name] = draw(bad)
    return draw(garbage) if draw(st.integers(0, 19)) == 0 else body


# ---- checks -----------------------------------------------------------------------------
def field_of(param: str) -> str:
    return re.split(r"[.\[]", param, maxsplit=1)[0]


async def check(client: Any, path: str, data: bytes, body: Any = None) -> None:
    resp = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    raw = await resp.read()
    assert resp.status < 500, raw
    note_event(f"{resp.status} {resp.content_type}")     # --hypothesis-show-statistics
    if resp.status >= 400:
        error = json.loads(raw)["error"]
        assert error.keys() == ERROR_KEYS and error["type"] == "invalid_request_error", error
        if isinstance(body, dict):      # a JSON object: some field is at fault
            assert error["param"] is not None, error
            fields = {*body, "model", "messages", "prompt"}     # present, or required
            assert field_of(error["param"]) in fields, (error, body)
    elif resp.content_type == "text/event-stream":
        events = [e for e in raw.decode().split("\n\n") if e.startswith("data: ")]
        assert events, raw
        for event in events[:-1]:
            assert "error" not in json.loads(event.removeprefix("data: ")), raw
        if events[-1] != "data: [DONE]":
            error = json.loads(events[-1].removeprefix("data: "))["error"]
            assert error["type"] == "invalid_request_error", error
    else:
        assert json.loads(raw)["choices"]


@FUZZ
@given(body=bodies(CHAT, "messages"))
async def test_fuzz_chat(client: Any, body: Any) -> None:
    await check(client, "/v1/chat/completions", json.dumps(body).encode(), body)


@FUZZ
@given(body=bodies(COMPLETION, "prompt"))
async def test_fuzz_completions(client: Any, body: Any) -> None:
    await check(client, "/v1/completions", json.dumps(body).encode(), body)


@settings(FUZZ, max_examples=50)
@given(data=st.binary(max_size=64) | st.text(max_size=64).map(str.encode),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
async def test_fuzz_bytes(client: Any, data: bytes, path: str) -> None:
    await check(client, path, data)
