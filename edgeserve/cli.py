"""The command line: edgeserve serve | demo | chat.

Every flag defaults to its EDGESERVE_* environment variable (edgeserve.config.from_env),
then to the built-in default.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from edgeserve import __version__
from edgeserve.api import EdgeServer
from edgeserve.blocks.command import add_parser as add_tasks_parser
from edgeserve.config import Config, from_env, parse_size, parse_sizes, parse_threads
from edgeserve.eviction import POLICIES
from edgeserve.experts.cache import POLICIES as EXPERT_POLICIES
from edgeserve.loader import parse_dtype

log = logging.getLogger("edgeserve.cli")
T = TypeVar("T")
# One assistant reply: the conversation so far -> the reply's text, piece by piece.

_DEVICE_RE = re.compile(r"^\s*(auto|cpu|cuda|(cuda|cpu):\d+(\s*,\s*(cuda|cpu):\d+)*)\s*$",
                        re.IGNORECASE)
_LOG_LEVELS = ("debug", "info", "warning", "error")


# ---- argument types --------------------------------------------------------------------
def _parsed_by(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that keeps the text but rejects what `parse` rejects."""
    def check(value: str) -> str:
        try:
            parse(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return check


_size = _parsed_by(parse_size)
_sizes = _parsed_by(parse_sizes)
_dtype = _parsed_by(parse_dtype)
_threads = _parsed_by(parse_threads)


def _device(value: str) -> str:
    if not _DEVICE_RE.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not auto, cpu, cuda, cuda:N or a list like cuda:0,cuda:1 "
            "or cpu:0,cpu:1")
    return value.strip().lower()


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0-65535)")
    return int(value)


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive integer")
    return int(value)


def _temperature(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value!r} is not a temperature (a number >= 0)")
    return number


# ---- the parser ------------------------------------------------------------------------
def _engine_args(p: argparse.ArgumentParser, cfg: Config) -> None:
    p.add_argument("--models", default=str(cfg.models), metavar="DIR",
                   help="the model store (default: %(default)s)")
    p.add_argument("--device", type=_device, default=cfg.device,
                   help="auto | cpu | cuda | cuda:0,cuda:1 | cpu:0,cpu:1 (separate pools on "
                        "the CPU) (default: %(default)s)")
    p.add_argument("--pool-size", type=_sizes, default=cfg.pool.pool_size,
                   metavar="SIZE[,SIZE...]",
                   help="block pool size: one for every device, or one per device in the "
                        "order of --device, e.g. 2GiB or 8GiB,4GiB (default: from the device)")
    p.add_argument("--block-size", type=_size, default=cfg.pool.block_size, metavar="SIZE",
                   help="pool block size, e.g. 2MiB (default: 2MiB on CUDA, 256KiB on CPU)")
    p.add_argument("--dtype", type=_dtype, default=cfg.dtype,
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--host-size", type=_size, default=cfg.tiers.host_size, metavar="SIZE",
                   help="host-memory tier below the pools (default: an eighth of RAM, "
                        "at most 8GiB)")
    p.add_argument("--policy", choices=sorted(POLICIES), default=cfg.tiers.policy,
                   help="eviction policy (default: %(default)s)")
    p.add_argument("--expert-budget", type=float, default=cfg.experts.budget, metavar="FRACTION",
                   help="MoE models: share of experts kept on the device (default: 1.0, all)")
    p.add_argument("--expert-policy", choices=EXPERT_POLICIES, default=cfg.experts.policy,
                   help="MoE expert cache policy (default: %(default)s)")
    p.add_argument("--prefix-cache", choices=("on", "off"),
                   default="on" if cfg.engine.prefix_cache else "off",
                   help="keep full KV pages and reuse them for prompts with the same prefix "
                        "(default: %(default)s)")
    p.add_argument("--prewarm", choices=("on", "off"),
                   default="on" if cfg.scheduler.prewarm else "off",
                   help="load models predicted to be asked for next, in idle time "
                        "(default: %(default)s)")
    p.add_argument("--idle-hashing", choices=("on", "off"),
                   default="on" if cfg.scheduler.idle_hashing else "off",
                   help="hash the store's never-hashed checkpoint files in idle time, so "
                        "that their first load need not (default: %(default)s)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=cfg.quantize,
                   help="quantize models named without a tag (default: their own dtype)")
    p.add_argument("--cpu-threads", type=_threads, metavar="auto|N",
                   default=str(cfg.engine.cpu_threads or "auto"),
                   help="compute threads of CPU forwards: N, or auto (torch's count, fewer "
                        "while other processes hold cores) (default: %(default)s)")


def _log_arg(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--log-level", choices=_LOG_LEVELS, default=default,
                   help="(default: %(default)s)")


def build_parser(cfg: Config) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeserve", description="Serve many LLMs from one block-granular memory pool.")
    parser.add_argument("--version", action="version", version=f"edgeserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the HTTP server (OpenAI-compatible API)")
    _engine_args(serve, cfg)
    serve.add_argument("--host", default=cfg.host, help="(default: %(default)s)")
    serve.add_argument("--port", type=_port, default=cfg.port, help="(default: %(default)s)")
    serve.add_argument("--api-key", default=cfg.api_key, metavar="KEY",
                       help="require 'Authorization: Bearer KEY' (default: no key)")
    _log_arg(serve, "info")
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="build the demo model into the store")
    demo.add_argument("--models", default=str(cfg.models), metavar="DIR",
                      help="the model store (default: %(default)s)")
    demo.add_argument("--force", action="store_true", help="rebuild it if it exists")
    _log_arg(demo, "info")
    demo.set_defaults(func=_demo)

    chat = sub.add_parser("chat", help="chat with a model in the terminal")
    chat.add_argument("model", help="a model id of the store")
    _engine_args(chat, cfg)
    chat.add_argument("--max-tokens", type=_positive, default=512, metavar="N",
                      help="per reply (default: %(default)s)")
    chat.add_argument("--temperature", type=_temperature, default=None, metavar="T",
                      help="0 is greedy (default: the model's)")
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system message")
    chat.add_argument("--url", default=None,
                      help="talk to a running server, e.g. http://127.0.0.1:8000")
    chat.add_argument("--api-key", default=cfg.api_key, metavar="KEY",
                      help="the server's key, with --url")
    _log_arg(chat, "warning")
    chat.set_defaults(func=_chat)
    add_tasks_parser(sub, cfg)
    return parser


# ---- commands ----------------------------------------------------------------------------
def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run on a uvloop event loop, or asyncio's where uvloop is missing."""
    try:
        import uvloop
        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


def edge_server(args: argparse.Namespace) -> EdgeServer:
    return EdgeServer(args.models, args.device, args.pool_size, block_size=args.block_size,
                      dtype=args.dtype, host_size=args.host_size, policy=args.policy,
                      expert_budget=args.expert_budget, expert_policy=args.expert_policy,
                      prefix_cache=args.prefix_cache == "on",
                      prewarm=args.prewarm == "on", quantize=args.quantize,
                      idle_hashing=args.idle_hashing == "on",
                      cpu_threads=args.cpu_threads)


def _serve(args: argparse.Namespace) -> int:
    from edgeserve.server import create_app, serve

    app = create_app(edge_server(args), api_key=args.api_key)
    run_async(lambda: serve(app, args.host, args.port))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from edgeserve.demo import build_demo

    print(build_demo(args.models, force=args.force))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from edgeserve.chat_session import chat_session

    return run_async(lambda: chat_session(args))


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = from_env()
    except ValueError as e:
        print(f"edgeserve: error: environment: {e}", file=sys.stderr)
        return 2
    args = build_parser(cfg).parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, RuntimeError, OSError, LookupError, MemoryError) as e:
        log.debug("failed", exc_info=e)
        print(f"edgeserve: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
