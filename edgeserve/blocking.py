"""A blocking facade over EdgeServer, for scripts and notebooks.

    with BlockingEdgeServer(models="models", device="cpu", pool_size="2GiB") as es:
        print(es.chat("demo-llama", [{"role": "user", "content": "hi"}], max_tokens=8).text)

The EdgeServer lives on an event loop of its own, in a daemon thread; every method
hands a coroutine to that loop and waits for its result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from edgeserve.api import EdgeServer
from edgeserve.config import Config
from edgeserve.embeddings import Embeddings
from edgeserve.loader import LoadReport
from edgeserve.results import Completion, Delta

T = TypeVar("T")
_END = object()     # marks the end of an async stream (StopAsyncIteration cannot cross)


class BlockingEdgeServer:
    """EdgeServer with blocking methods; started on construction, stopped by close()."""

    def __init__(self, models: str | Path | None = None, device: str | None = None,
                 pool_size: str | int | None = None, *, block_size: str | int | None = None,
                 dtype: str | None = None, config: Config | None = None) -> None:
        self.server = EdgeServer(models, device, pool_size, block_size=block_size,
                                 dtype=dtype, config=config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="edgeserve-loop")
        self._thread.start()
        try:
            self._call(self.server.start())
        except BaseException:
            self._stop_loop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("this BlockingEdgeServer is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()     # e.g. KeyboardInterrupt: stop the work on the loop too
            raise

    # ---- the EdgeServer API, blocking ------------------------------------------------
    def load(self, model_id: str) -> LoadReport:
        return self._call(self.server.load(model_id))

    def unload(self, model_id: str) -> None:
        self._call(self.server.unload(model_id))

    def chat(self, model: str, messages: list[dict[str, Any]], **sampling: Any) -> Completion:
        return self._call(self.server.chat(model, messages, **sampling))

    def complete(self, model: str, prompt: str | Sequence[int], **sampling: Any
                 ) -> Completion:
        return self._call(self.server.complete(model, prompt, **sampling))

    def stream_chat(self, model: str, messages: list[dict[str, Any]], **sampling: Any
                    ) -> Iterator[Delta]:
        return self._iterate(self.server.stream_chat(model, messages, **sampling))

    def stream_complete(self, model: str, prompt: str | Sequence[int], **sampling: Any
                        ) -> Iterator[Delta]:
        return self._iterate(self.server.stream_complete(model, prompt, **sampling))

    def embed(self, model: str, inputs: Sequence[str | Sequence[int]],
              truncate: bool = False) -> Embeddings:
        return self._call(self.server.embed(model, inputs, truncate))

    def stats(self) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            return self.server.stats()      # on the loop: pool state is not thread-safe
        return self._call(read())

    def _iterate(self, stream: AsyncIterator[Delta]) -> Iterator[Delta]:
        agen = cast(AsyncGenerator[Delta, None], stream)

        async def step() -> object:
            try:
                return await anext(agen)
            except StopAsyncIteration:
                return _END

        try:
            while (item := self._call(step())) is not _END:
                yield cast(Delta, item)
        finally:
            # Leaving early (break, error, garbage collection) cancels the sequence.
            if not self._loop.is_closed():
                self._call(agen.aclose())

    # ---- life cycle --------------------------------------------------------------------
    def close(self) -> None:
        """Stop the engine and the loop thread; safe to call twice."""
        if self._loop.is_closed():
            return
        try:
            self._call(self.server.close())
            self._call(self._loop.shutdown_asyncgens())
            self._call(self._loop.shutdown_default_executor())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> BlockingEdgeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
