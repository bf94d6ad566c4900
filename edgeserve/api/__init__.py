"""EdgeServer: the async Python API. Safe to call from many coroutines at once."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from edgeserve.api.stream import collect, stream
from edgeserve.config import Config, from_env
from edgeserve.device import cpu_info, discover
from edgeserve.embeddings import Embeddings, embed
from edgeserve.engine import Engine
from edgeserve.kv.stats import prefix_stats
from edgeserve.loader import LoadReport, parse_dtype
from edgeserve.mailbox import Mailbox
from edgeserve.metrics import Metrics, live_gauges
from edgeserve.model import ResidentModel
from edgeserve.pool import BlockPool, Unit
from edgeserve.results import Completion, Delta, InvalidRequest, ServerClosing
from edgeserve.sampling import SamplingParams
from edgeserve.scheduler import Scheduler
from edgeserve.settings import pool_sizes, with_arguments
from edgeserve.stats import pool_stats
from edgeserve.store import ModelStore
from edgeserve.tiers import HostTier
from edgeserve.tokenizer import Tokenizer
from edgeserve.tools import parse_stream, plan_tools

log = logging.getLogger("edgeserve")


class EdgeServer:
    """Serves the models of a store from one block pool per device.

    async with EdgeServer(models="models", device="cpu", pool_size="2GiB") as es:
        out = await es.chat("demo-llama", [{"role": "user", "content": "hi"}], max_tokens=8)
    """

    def __init__(self, models: str | Path | None = None, device: str | None = None,
                 pool_size: str | int | tuple[int, ...] | None = None, *,
                 block_size: str | int | None = None,
                 dtype: str | None = None, host_size: str | int | None = None,
                 policy: str | None = None, expert_budget: float | None = None,
                 expert_policy: str | None = None, prefix_cache: bool | None = None,
                 prewarm: bool | None = None, idle_hashing: bool | None = None,
                 cpu_threads: str | int | None = None,
                 quantize: str | None = None, config: Config | None = None) -> None:
        cfg = with_arguments(config or from_env(models=models, device=device, dtype=dtype,
                                                quantize=quantize),
                             pool_size=pool_size, block_size=block_size, host_size=host_size,
                             policy=policy, expert_budget=expert_budget,
                             expert_policy=expert_policy, prefix_cache=prefix_cache,
                             prewarm=prewarm, idle_hashing=idle_hashing,
                             cpu_threads=cpu_threads)
        self.config = cfg
        self.store = ModelStore(cfg.models)
        self.pools: dict[str, BlockPool] = {}
        self.engine: Engine | None = None
        self._scheduler: Scheduler | None = None
        self._closing = False
        self.host: HostTier | None = None
        self._ids = itertools.count(1)
        self._mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = \
            weakref.WeakKeyDictionary()
        self.metrics = Metrics()
        self.metrics.watch(lambda: live_gauges(self.stats(), self._queues()))

    # ---- life cycle --------------------------------------------------------------------
    async def start(self) -> EdgeServer:
        if self.engine is not None:
            return self
        self._closing = False              # a closed server may be started again
        devices = discover(self.config.device)
        for i, device in enumerate(devices):
            size, block = pool_sizes(device, self.config.pool, i, len(devices))
            pool = self.pools[device.name] = BlockPool(device.name, size, block)
            pool.on_evict.append(self._count_eviction)
            log.info("pool on %s (%s): %d blocks of %d bytes", device.name, device.description,
                     size // block, block)
        self.engine = Engine(self.config.engine, cuda=any(d.is_cuda for d in devices))
        self.engine.start()
        tiers = self.config.tiers
        host_size = tiers.host_size if tiers.host_size is not None else \
            min(8 << 30, cpu_info().total_bytes // 8)
        self.host = HostTier(host_size, pinned=any(d.startswith("cuda") for d in self.pools))
        self._scheduler = Scheduler(self.store, self.pools, self.engine, self.metrics,
                                    self.dtype_for, tiers, self.host, self.config.experts,
                                    self.config.scheduler, self.config.quantize)
        return self

    def _queues(self) -> dict[str, tuple[int, int]]:
        """(running, waiting) per model: every resident model, and any with requests."""
        counts = dict.fromkeys(self.models, (0, 0))
        return counts | (self.engine.counts_by_model() if self.engine else {})

    def _count_eviction(self, unit: Unit) -> None:
        self.metrics.evictions.labels(unit.owner or "", unit.kind.value).inc()

    async def close(self) -> None:
        """Stop at once: running requests end with an error; all memory goes back."""
        if self.engine is None:
            return
        self._closing = True
        engine, self.engine = self.engine, None
        await engine.close()                # aborts what still runs, on the step thread
        if self._scheduler is not None:
            self._scheduler.release_all()     # the step thread is gone: nothing reads them
        for pool in self.pools.values():
            pool.close()
        if self.host is not None:
            self.host.clear()

    async def shutdown(self, deadline: float = 10.0) -> None:
        """Refuse new requests, let running ones finish for up to `deadline` s, then close."""
        self._closing = True
        engine = self.engine
        end = time.monotonic() + deadline
        while engine is not None and engine.num_running + engine.num_waiting and \
                time.monotonic() < end:
            await asyncio.sleep(0.02)
        await self.close()

    async def __aenter__(self) -> EdgeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("EdgeServer is not started: use 'async with' or await start()")
        return self.engine

    def dtype_for(self, device: str) -> torch.dtype:
        if self.config.dtype:
            return parse_dtype(self.config.dtype)
        return torch.bfloat16 if device.startswith("cuda") else torch.float32

    # ---- models ------------------------------------------------------------------------
    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("EdgeServer is not started: use 'async with' or await start()")
        return self._scheduler

    @property
    def models(self) -> dict[str, ResidentModel]:
        """The resident models by id."""
        return self._scheduler.models if self._scheduler else {}

    async def load(self, model_id: str, device: str | None = None) -> LoadReport:
        """Make model_id resident (concurrent calls for one model share one load), on the
        device placement chooses (lowest expected time to first token) or on `device`."""
        return await self.scheduler.load(model_id, device)

    async def unload(self, model_id: str) -> None:
        """Stop serving model_id once its running requests end; its memory goes back."""
        await self.scheduler.unload(model_id)

    def pin(self, model_id: str, pinned: bool = True) -> None:
        """Keep model_id resident: never unloaded by keep-alive, never evicted."""
        self.scheduler.pin(model_id, pinned)

    def keep_alive(self, model_id: str, seconds: float | None) -> None:
        """Unload model_id this long after its last request; None or negative: keep."""
        self.scheduler.keep_alive(model_id, seconds)

    async def reset_prefix_cache(self) -> int:
        """Drop every retained KV page, on the devices and in the host tier (pages of
        running requests stay); returns the number dropped from the devices."""
        scheduler = self.scheduler
        return await self._engine.run(scheduler.kv_host.clear, list(self.pools.values()))

    def tokenizer(self, model_id: str) -> Tokenizer | None:
        return self._scheduler.tokenizers.get(model_id) if self._scheduler else None

    # ---- generation --------------------------------------------------------------------
    async def chat(self, model: str, messages: list[dict[str, Any]], **sampling: Any
                   ) -> Completion:
        return await collect(self.stream_chat(model, messages, **sampling))

    async def complete(self, model: str, prompt: str | Sequence[int], **sampling: Any
                       ) -> Completion:
        return await collect(self.stream_complete(model, prompt, **sampling))

    async def stream_chat(self, model: str, messages: list[dict[str, Any]], *,
                          tools: list[dict[str, Any]] | None = None, tool_choice: Any = None,
                          **sampling: Any) -> AsyncGenerator[Delta, None]:
        """`tools` (OpenAI's function definitions) go to the chat template; with
        `tool_choice` "required" or a named function the reply is one call (grammar
        constrained); deltas carry the calls parsed out of the reply (edgeserve.tools)."""
        params = SamplingParams.from_options(**sampling)
        await self.scheduler.ready(model, self.load)
        tokenizer = self._require_tokenizer(model)
        plan = plan_tools(tools, tool_choice, tokenizer, params.grammar)
        if plan.grammar is not None:
            params = replace(params, grammar=plan.grammar)
        extra = {"tools": tools} if tools else {}
        # Rendering and tokenizing a long chat takes a while: keep it off the event loop.
        prompt = await asyncio.to_thread(tokenizer.encode_chat, messages, True, **extra)
        deltas = self._stream(model, prompt, params)
        async for delta in parse_stream(deltas, plan.format) if plan.format else deltas:
            yield delta

    async def stream_complete(self, model: str, prompt: str | Sequence[int], **sampling: Any
                              ) -> AsyncGenerator[Delta, None]:
        params = SamplingParams.from_options(**sampling)
        await self.scheduler.ready(model, self.load)
        if isinstance(prompt, str):
            ids = await asyncio.to_thread(self._require_tokenizer(model).encode, prompt)
        else:
            ids = [int(t) for t in prompt]
        async for delta in self._stream(model, ids, params):
            yield delta

    def _require_tokenizer(self, model: str) -> Tokenizer:
        tokenizer = self.tokenizer(model)
        if tokenizer is None:
            raise InvalidRequest(f"model '{model}' has no tokenizer.json: send token ids",
                                 "prompt")
        return tokenizer

    def _stream(self, model_id: str, prompt: list[int], params: SamplingParams
                ) -> AsyncGenerator[Delta, None]:
        """One generation's deltas (api/stream.py)."""
        return stream(self, model_id, prompt, params)

    async def embed(self, model: str, inputs: Sequence[str | Sequence[int]],
                    truncate: bool = False) -> Embeddings:
        """One normalised vector per input from the model's hidden states (embeddings.py)."""
        if self._closing:
            raise ServerClosing("the server is shutting down")
        return await embed(self, model, inputs, truncate)

    # ---- introspection -----------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per device: sizes, bytes by unit kind and by model (shared bytes counted once),
        resident models; the host tier; request counts."""
        arenas = list(self._scheduler.tasks.arenas.values()) if self._scheduler else []
        devices = {name: pool_stats(pool, [m for m in self.models.values() if m.pool is pool],
                                     [a for a in arenas if a.pool is pool])
                   for name, pool in self.pools.items()}
        engine = self.engine
        return {"devices": devices,
                "host": self.host.stats() if self.host is not None else None,
                "policy": self._scheduler.policy.name if self._scheduler else None,
                "prefix_cache": prefix_stats(self.config.engine.prefix_cache,
                                             self._scheduler.kv_host if self._scheduler
                                             else None),
                "loads": dict(self._scheduler.totals) if self._scheduler else {},
                "prewarm": self._scheduler.prewarm.stats() if self._scheduler else {},
                "idle_hashing": self._scheduler.idle_hashing.stats() if self._scheduler else {},
                "cpu_threads": engine.threads.stats() if engine else None,
                "requests": {"running": engine.num_running if engine else 0,
                             "waiting": engine.num_waiting if engine else 0}}
