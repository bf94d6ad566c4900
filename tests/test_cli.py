"""The edgeserve command: demo, serve and chat, each run as its own process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from edgeserve.cli import build_parser
from edgeserve.config import Config

CLI = [sys.executable, "-m", "edgeserve.cli"]
ENGINE = ["--device", "cpu", "--pool-size", "128MiB"]
TIMEOUT = 60


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESERVE_")}
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


def test_demo_builds_the_model(tmp_path: Path) -> None:
    out = run_cli("demo", "--models", str(tmp_path / "zoo"), "--log-level", "warning")
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert path == tmp_path / "zoo" / "demo-llama"
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


async def test_serve_answers_health_and_chat(demo_store: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([*CLI, "serve", "--models", str(demo_store), "--port", "0",
                                 *ENGINE], stderr=stderr, stdout=subprocess.DEVNULL)
    try:
        url = wait_for_url(log, proc)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{url}/health") as resp:
                assert await resp.json() == {"status": "ok"}
            body = {"model": "demo-llama", "max_tokens": 4, "temperature": 0,
                    "messages": [{"role": "user", "content": "hello"}]}
            async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
                assert resp.status == 200
                assert (await resp.json())["usage"]["completion_tokens"] == 4
        # chat --url talks to it over HTTP, with server-sent events.
        # Greedy: the demo model samples by default, and a sampled reply may hold a newline.
        chat = run_cli("chat", "demo-llama", "--url", url, "--max-tokens", "4",
                       "--temperature", "0", stdin="hello\nagain\n")
        assert chat.returncode == 0, chat.stderr
        assert len(chat.stdout.splitlines()) == 2
        missing = run_cli("chat", "nope", "--url", url, stdin="hello\n")
        assert missing.returncode == 1 and "does not exist" in missing.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT) == 0      # a clean shutdown
    assert "shutting down" in log.read_text()


def wait_for_url(log: Path, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = re.search(r"ready on (http://\S+)", log.read_text())
        if found:
            return found.group(1)
        assert proc.poll() is None, log.read_text()
        time.sleep(0.1)
    pytest.fail(f"the server did not start: {log.read_text()}")


def test_chat_in_process(demo_store: Path) -> None:
    out = run_cli("chat", "demo-llama", "--models", str(demo_store), *ENGINE,
                  "--max-tokens", "6", "--temperature", "0",
                  stdin="hello\nand again\n/exit\nnot read\n")
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    assert len(replies) == 2 and all(r.strip() for r in replies)


def test_chat_unknown_model(demo_store: Path) -> None:
    out = run_cli("chat", "nope", "--models", str(demo_store), *ENGINE, stdin="hi\n")
    assert out.returncode == 1
    assert "model 'nope' is not in the store" in out.stderr


@pytest.mark.parametrize(("args", "message"), [
    ([], "the following arguments are required: COMMAND"),
    (["serve", "--port", "http"], "is not a port number"),
    (["serve", "--device", "gpu"], "is not auto, cpu, cuda"),
    (["serve", "--pool-size", "lots"], "not a size"),
    (["serve", "--dtype", "int3"], "is not one of"),
    (["chat", "demo-llama", "--temperature", "-1"], "is not a temperature"),
    (["chat"], "the following arguments are required: model"),
])
def test_bad_flags(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser(Config()).parse_args(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_flags_message() -> None:
    out = run_cli("serve", "--device", "gpu")
    assert out.returncode == 2
    assert "argument --device: 'gpu' is not auto, cpu, cuda" in out.stderr


def test_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESERVE_MODELS", "/srv/models")
    monkeypatch.setenv("EDGESERVE_API_KEY", "k")
    from edgeserve.config import from_env

    args = build_parser(from_env()).parse_args(["serve"])
    assert (args.models, args.api_key, args.host, args.port) == ("/srv/models", "k",
                                                                 "127.0.0.1", 8000)
