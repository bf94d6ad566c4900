"""`--cpu-threads auto|N`: parsed from the command line, the environment and EdgeServer's
keyword, and a fixed count applied on the step thread (where the forwards run)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from edgeserve import EdgeServer
from edgeserve.cli import build_parser, edge_server
from edgeserve.config import Config, from_env, parse_threads


@pytest.mark.parametrize(("text", "value"), [("auto", None), ("AUTO", None), ("1", 1),
                                             ("4", 4), (3, 3), (None, None)])
def test_the_setting_is_parsed(text, value) -> None:
    assert parse_threads(text) == value


@pytest.mark.parametrize("text", ["0", "-2", "two", "1.5", ""])
def test_a_bad_setting_is_refused(text) -> None:
    with pytest.raises(ValueError, match="cpu threads"):
        parse_threads(text)


def test_the_setting_from_the_environment_and_the_command_line(monkeypatch, capsys) -> None:
    assert from_env().engine.cpu_threads is None
    monkeypatch.setenv("EDGESERVE_CPU_THREADS", "1")
    cfg = from_env()
    assert cfg.engine.cpu_threads == 1
    args = build_parser(cfg).parse_args(["serve"])
    assert edge_server(args).config.engine.cpu_threads == 1
    args = build_parser(cfg).parse_args(["serve", "--cpu-threads", "auto"])
    assert edge_server(args).config.engine.cpu_threads is None
    with pytest.raises(SystemExit):
        build_parser(cfg).parse_args(["serve", "--cpu-threads", "none"])
    assert "cpu threads must be auto or a count" in capsys.readouterr().err


def test_the_keyword_overrides_the_configuration() -> None:
    assert EdgeServer(device="cpu", cpu_threads=2).config.engine.cpu_threads == 2
    assert EdgeServer(device="cpu", cpu_threads="auto").config.engine.cpu_threads is None


async def test_a_fixed_count_is_used_by_the_step_thread(two_models) -> None:
    before = torch.get_num_threads()
    n = 1 if before > 1 else 2              # not the count torch has anyway
    seen: list[tuple[str, int]] = []
    async with EdgeServer(config=two_models, cpu_threads=n) as es:
        await es.load("llama")
        out = await es.complete("llama", [3, 4, 5], max_tokens=4, ignore_eos=True)
        assert len(out.token_ids) == 4
        engine = es.engine
        assert engine is not None
        seen.append(await engine.run(lambda: (threading.current_thread().name,
                                              torch.get_num_threads())))
        stats = es.stats()["cpu_threads"]
        text = es.metrics.render().decode()
    assert seen == [("edgeserve-step", n)]
    assert stats == {"setting": n, "threads": n, "configured": n, "adaptive": False,
                     "changes": 0}
    assert f"edgeserve:cpu_threads {n}.0" in text
    assert "edgeserve:cpu_thread_changes 0.0" in text
    assert torch.get_num_threads() == before      # this thread's count is its own


async def test_auto_keeps_torch_s_count_on_a_quiet_start(two_models) -> None:
    async with EdgeServer(config=two_models) as es:
        engine = es.engine
        assert engine is not None
        count = await engine.run(torch.get_num_threads)
        stats = es.stats()["cpu_threads"]
    assert stats["setting"] == "auto" and stats["threads"] == count
    assert stats["configured"] == torch.get_num_threads()


def test_the_default_is_auto() -> None:
    assert Config().engine.cpu_threads is None


def test_the_c_kernels_take_the_calling_thread_s_count(monkeypatch) -> None:
    """kernels/cpu run with torch's count of the thread that calls them: the step thread's."""
    from edgeserve.kernels.cpu import matmul

    passed: list[int] = []

    class Spy:
        def f32(self, *args: int) -> None:
            passed.append(args[-1])

    monkeypatch.setattr(matmul, "_library", Spy())
    monkeypatch.setattr(matmul, "_tried", True)
    main = torch.get_num_threads()
    other = 1 if main > 1 else 2

    def on_a_thread() -> None:
        torch.set_num_threads(other)
        matmul.few_rows_f32(torch.ones(4, 8), torch.ones(16, 8))

    worker = threading.Thread(target=on_a_thread)
    worker.start()
    worker.join()
    matmul.few_rows_f32(torch.ones(4, 8), torch.ones(16, 8))
    torch.set_num_threads(main)     # torch's default for new threads, as it was
    assert passed == [other, main]


async def test_nothing_adapts_beside_a_cuda_device() -> None:
    from edgeserve.config import EngineConfig
    from edgeserve.engine import Engine, cpu_signals

    engines = [Engine(EngineConfig(), cuda=True), Engine(EngineConfig(), cuda=False)]
    for engine in engines:
        engine.start()
    try:
        adaptive = [await e.run(lambda e=e: e.threads.stats()["adaptive"]) for e in engines]
    finally:
        for engine in engines:
            await engine.close()
    assert adaptive[0] is False
    if torch.get_num_threads() > 1 and cpu_signals.read() is not None:
        assert adaptive[1] is True


async def test_auto_lowers_the_step_thread_s_count_when_fed_contention(two_models) -> None:
    """The step loop's hook: windows close between steps and the count they decide is the
    one the next forwards use (counters fed: a core held by another process throughout)."""
    from edgeserve.engine.cpu_signals import Reading

    if torch.get_num_threads() < 2:
        pytest.skip("one thread: nothing to lower")
    fed = {"wait": 0.0, "busy": 0.0}

    def held() -> Reading:
        now = time.monotonic()
        fed["wait"] += 1.0                      # every read: a second more of waiting
        fed["busy"] += 10.0
        return Reading(now, fed["wait"], 0.0, fed["busy"])

    async with EdgeServer(config=two_models) as es:
        engine = es.engine
        assert engine is not None
        await es.load("llama")
        before = await engine.run(torch.get_num_threads)
        engine.threads._read = held             # from now on the counters say: contended
        engine.threads.window = 0.001           # windows of a step or two
        await es.complete("llama", [3, 4, 5], max_tokens=24, ignore_eos=True)
        after = await engine.run(torch.get_num_threads)
        stats = es.stats()["cpu_threads"]
    assert before == stats["configured"] and after == stats["threads"] < before
    assert stats["changes"] >= 1
