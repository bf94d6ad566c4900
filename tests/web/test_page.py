"""The web page in a real browser (headless Chromium through Playwright)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

pytestmark = pytest.mark.browser
TIMEOUT = 30_000     # ms: a 2-core CI box under load


def open_page(page: Any, url: str) -> None:
    page.page.goto(url)
    page.page.wait_for_selector("#conn.ok", timeout=TIMEOUT)      # the live feed is up


def summary(page: Any, device: str = "cpu") -> dict[str, Any]:
    data = page.page.get_attribute(f'.device[data-device="{device}"] canvas', "data-summary")
    return json.loads(data or "{}")


def wait_summary(page: Any, check: str) -> dict[str, Any]:
    """Wait until the map's summary satisfies `check` (JavaScript over `s`)."""
    page.page.wait_for_function(
        "check => { const c = document.querySelector('.device canvas');"
        " if (!c || !c.dataset.summary) return false;"
        " const s = JSON.parse(c.dataset.summary); return eval(check); }",
        arg=check, timeout=TIMEOUT)
    return summary(page)


def test_page_loads_without_console_errors(serve: Any, page: Any) -> None:
    server = serve()
    open_page(page, server.url + "/")
    page.page.wait_for_selector('#models tr[data-model="demo-other"]', timeout=TIMEOUT)
    options = page.page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert options == ["demo-llama", "demo-other"]
    assert page.page.locator(".tile").count() >= 9
    page.page.wait_for_timeout(500)
    page.screenshot("empty")
    assert page.errors == []


def test_chat_streams_a_reply(serve: Any, page: Any) -> None:
    server = serve()
    open_page(page, server.url + "/")
    p = page.page
    p.click("#settings summary")
    p.fill("#max_tokens", "48")
    p.fill("#temperature", "0")
    p.fill("#prompt", "Tell me about memory pools.")
    with p.expect_response("**/v1/chat/completions") as answer:
        p.press("#prompt", "Enter")
    assert json.loads(answer.value.request.post_data or "{}")["stream"] is True
    assert answer.value.headers["content-type"].startswith("text/event-stream")
    meta = p.wait_for_selector(".msg.assistant .meta:has-text('TTFT')", timeout=TIMEOUT)
    # Chromium hands the body over decoded by its own guess of the charset: count the
    # chunks that carry content (their JSON is ASCII up to the text), compare the text
    # with the same request made again, without streaming (greedy: the same tokens).
    lines = answer.value.body().split(b"\n")
    pieces = [line for line in lines if line.startswith(b"data: {") and b'"content":"' in line
              and b'"content":""' not in line]
    assert len(pieces) >= 2                                  # it came token by token
    text = p.text_content(".msg.assistant .text") or ""
    again = server.call(lambda: server.es.chat(
        "demo-llama", [{"role": "user", "content": "Tell me about memory pools."}],
        max_tokens=48, temperature=0))
    assert text and text == again.text
    figures = meta.text_content() or ""
    assert "load" in figures and "48 tokens" in figures and "tok/s" in figures, figures
    # The conversation is kept in the browser: a reload shows it again.
    p.reload()
    p.wait_for_selector(".msg.assistant .text", timeout=TIMEOUT)
    assert p.text_content(".msg.assistant .text") == text
    page.screenshot("chat")
    assert page.errors == []


def test_map_shows_blocks_after_load_and_retained_after_unload(serve: Any, page: Any) -> None:
    server = serve()
    open_page(page, server.url + "/")
    p = page.page
    p.click('#models tr[data-model="demo-llama"] button[data-act="load"]')
    s = wait_summary(page, "s.models['demo-llama'] && s.models['demo-llama'].pinned > 0")
    loaded = s["models"]["demo-llama"]
    assert loaded["retained"] == 0 and loaded["kinds"]["weight"] == loaded["pinned"]
    # Units are pinned (and shown) while the load still fills them; the model is listed
    # once the load is done, which the loads counter shows.
    p.wait_for_selector(".tile:has(.label:text-is('loads')) .value:text-is('1')",
                        timeout=TIMEOUT)
    blocks = server.call(_model_blocks(server, "demo-llama"))
    assert loaded["pinned"] == blocks
    swatches = p.eval_on_selector_all("#models i", "is => is.map(i => i.style.background)")
    assert len(set(swatches)) == 2           # each model its own shade
    page.screenshot("loaded")
    p.click('#models tr[data-model="demo-llama"] button[data-act="unload"]')
    s = wait_summary(page, "s.models['demo-llama'] && s.models['demo-llama'].pinned === 0")
    assert s["models"]["demo-llama"]["retained"] == blocks       # still there, unpinned
    p.wait_for_selector("#events li.ev-unload", timeout=TIMEOUT)
    page.screenshot("retained")
    assert page.errors == []


def _model_blocks(server: Any, model: str) -> Any:
    async def count() -> int:
        units = server.es.models[model].distinct_units
        return sum(u.nblocks for u in units)
    return count


def test_eviction_appears_in_the_feed(serve: Any, page: Any) -> None:
    server = serve(pool_size="28MiB")       # room for one demo model, not two
    open_page(page, server.url + "/")
    p = page.page
    for model, act in (("demo-llama", "load"), ("demo-llama", "unload"),
                       ("demo-other", "load")):
        p.click(f'#models tr[data-model="{model}"] button[data-act="{act}"]')
        p.wait_for_selector(f'#models tr[data-model="{model}"] '
                            f'button[data-act="{"unload" if act == "load" else "load"}"]',
                            timeout=TIMEOUT)
    item = p.wait_for_selector("#events li.ev-evict", timeout=TIMEOUT)
    assert "demo-llama" in (item.text_content() or "")
    wait_summary(page, "s.models['demo-other'] && s.models['demo-other'].pinned > 0")
    p.wait_for_function("() => [...document.querySelectorAll('.tile')].some(t =>"
                        " t.textContent.includes('evictions') && parseInt(t.textContent) > 0)",
                        timeout=TIMEOUT)        # the numbers panel counts it too
    page.screenshot("evicted")
    assert page.errors == []


def test_key_prompt_with_api_key(serve: Any, page: Any) -> None:
    server = serve(api_key="sekrit")
    p = page.page
    p.goto(server.url + "/")
    p.wait_for_selector("#key-dialog[open]", timeout=TIMEOUT)
    assert p.is_hidden("#app")                           # nothing of the store shown
    assert "demo-llama" not in p.content()
    p.fill("#key-input", "wrong")
    p.press("#key-input", "Enter")
    p.wait_for_selector("#key-error:not([hidden])", timeout=TIMEOUT)
    p.fill("#key-input", "sekrit")
    p.press("#key-input", "Enter")
    p.wait_for_selector('#models tr[data-model="demo-llama"]', timeout=TIMEOUT)
    p.wait_for_selector("#conn.ok", timeout=TIMEOUT)     # the feed was sent the key too
    page.screenshot("key")


def test_stop_ends_the_reply_and_its_request(serve: Any, page: Any,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve()
    engine = server.es.engine
    step = engine.step

    def paced_step() -> None:       # the reply must still be running when Stop is clicked:
        time.sleep(0.01)            # the demo model alone can finish 1500 tokens first
        step()

    monkeypatch.setattr(engine, "step", paced_step)
    open_page(page, server.url + "/")
    p = page.page
    p.click("#settings summary")
    p.fill("#max_tokens", "1500")      # within the context: more is a 400
    p.fill("#prompt", "Go on for a long time.")
    p.press("#prompt", "Enter")
    p.wait_for_function("() => (document.querySelector('.msg.assistant .text') || {})"
                        ".textContent?.length > 0", timeout=TIMEOUT)
    p.click("#stop")
    p.wait_for_selector(".msg.assistant .meta:has-text('stopped')", timeout=TIMEOUT)
    assert p.is_visible("#send") and p.is_hidden("#stop")
    deadline = time.monotonic() + 30
    while engine.num_running + engine.num_waiting and time.monotonic() < deadline:
        time.sleep(0.05)        # the server cancels the sequence at its next step
    assert engine.num_running + engine.num_waiting == 0
    assert page.errors == []


def test_model_picker_groups_tasks_and_tags_under_their_base(serve: Any, page: Any) -> None:
    server = serve()
    ids = [("base", None), ("base:int8", None), ("summarise", "base"), ("solo", None)]
    body = {"object": "list", "data": [{"id": i, "object": "model", "created": 0,
                                        "owned_by": "edgeserve", "parent": parent}
                                       for i, parent in ids]}
    page.page.route("**/v1/models", lambda route: route.fulfill(json=body))
    open_page(page, server.url + "/")
    groups = page.page.eval_on_selector_all(
        "#model optgroup", "gs => gs.map(g => [g.label, [...g.children].map(o => o.value)])")
    assert groups == [["base", ["base", "base:int8", "summarise"]]]
    assert page.page.eval_on_selector_all("#model > option", "os => os.map(o => o.value)") \
        == ["solo"]
