"""The step loop: continuous batching over every resident model, on one worker thread.

Each step takes, per model, the sequences with KV to compute: decode sequences (one new
token each) run together in one forward; sequences being prefilled run in chunks. New
requests join at the next step; cancelled ones leave at the next step, pages returned.
When the pool cannot hold the KV of every running sequence, the newest is preempted:
its pages go back and it is recomputed later from its tokens (nothing is lost).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from edgeserve.batch import build_batch
from edgeserve.config import EngineConfig
from edgeserve.constrain import advance, mask_logits
from edgeserve.engine.families import forward_delta, step_groups
from edgeserve.engine.rows import counts_by_model, prefill_groups, queued_steps, row_logprobs
from edgeserve.engine.threads import ComputeThreads
from edgeserve.mailbox import resolve
from edgeserve.model import ResidentModel
from edgeserve.pool import PoolFull
from edgeserve.sampling import sample
from edgeserve.sequence import Event, Sequence, Status

log = logging.getLogger("edgeserve.engine")
T = TypeVar("T")


class QueueFull(RuntimeError):
    """More sequences are waiting than the engine accepts."""


class Engine:
    def __init__(self, config: EngineConfig, cuda: bool = False) -> None:
        self.config = config
        # CPU forwards' threads: fixed, or fewer while other work holds cores (not on CUDA).
        self.threads = ComputeThreads(config.cpu_threads, adaptive=not cuda)
        # One thread runs every forward and every pool change, so views never move under
        # a running forward and no lock is held across compute. It steps continuously while
        # there is work; the event loop only hands it requests and calls.
        self._thread = threading.Thread(target=self._loop, name="edgeserve-step", daemon=True)
        self._cond = threading.Condition()
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future[Any]]] = deque()
        self._inbox: deque[Sequence] = deque()
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._stopping = False
        self.steps = 0
        self.tokens_computed = 0       # tokens whose KV forwards computed (prefill + decode)

    # ---- called on the event loop ------------------------------------------------------
    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    async def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) on the step thread, between two steps."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            self._calls.append((lambda: fn(*args), future))
            self._cond.notify()
        return await future

    def submit(self, seq: Sequence) -> None:
        with self._cond:
            if len(self._inbox) + len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"{self.config.max_queue} requests are already waiting")
            self._inbox.append(seq)
            self._cond.notify()

    def cancel(self, seq: Sequence) -> None:
        with self._cond:
            seq.cancelled = True
            self._cond.notify()

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def counts_by_model(self) -> dict[str, tuple[int, int]]:
        """model id -> (running, waiting)."""
        return counts_by_model(list(self._running), [*self._waiting, *self._inbox])

    def queued_steps(self) -> dict[str, int]:
        """Device -> forwards its queued sequences still need (per model, the longest)."""
        with self._cond:
            seqs = [*self._running, *self._waiting, *self._inbox]
        return queued_steps(seqs, self.config.prefill_chunk)

    def has_sequences(self, model: ResidentModel) -> bool:
        return any(s.model is model for s in [*self._running, *self._waiting, *self._inbox])

    # ---- the step thread -----------------------------------------------------------------
    def _loop(self) -> None:
        self.threads.begin()
        while True:
            with self._cond:
                while not (self._calls or self._inbox or self._waiting or self._running
                           or self._stopping):
                    self._cond.wait()
                stopping = self._stopping
            self._serve_calls()
            if stopping:
                self._abort_all()
                self.threads.end()
                return
            if self._inbox or self._waiting or self._running:
                began = time.monotonic()
                try:
                    self.step()
                except Exception:       # a step must never take the engine down
                    log.exception("engine step failed")
                    self._abort_all()
                self.threads.stepped(began)

    def step(self) -> None:
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        self._drop_cancelled()
        # A base and its tasks share forwards (each row adds its own task's blocks), and so
        # do models sharing most weights, unless configured to take turns. First tokens
        # first: every group's prefills, then the decodes (their pages reserved). Calls (a
        # load's placement, its allocation) are served between forwards, not only steps.
        decodes = []
        for members in step_groups([s.model for s in [*self._running, *self._waiting]],
                                   self.config.batch_tasks, self.config.batch_families):
            decodes.append(self._step_group(members))
            self._serve_calls()
        for decode in decodes:
            if decode := [s for s in decode if s.status is Status.RUNNING]:
                self._forward(decode, 1)
                self._serve_calls()
        self.steps += 1

    def _serve_calls(self) -> None:
        with self._cond:
            calls = list(self._calls)
            self._calls.clear()
        for call, future in calls:
            resolve(future, call)

    def _step_group(self, members: set[int]) -> list[Sequence]:
        """Reserve, admit and prefill; returns the sequences to decode this step."""
        def mine(seqs: list[Sequence]) -> list[Sequence]:
            return [s for s in seqs if id(s.model) in members]

        self._reserve(mine(self._running))
        running = mine(self._running)
        admitted = self._admit(mine(list(self._waiting)), len(running))
        decode = [s for s in running if s.length - s.cached == 1]
        prefill = [s for s in running if s.length - s.cached > 1] + admitted
        for group in prefill_groups(prefill, self.config.prefill_chunk):
            self._forward(group, self.config.prefill_chunk)
        return decode

    def _reserve(self, running: list[Sequence]) -> None:
        """Pages for every running sequence's next tokens, preempting the newest if needed."""
        chunk = self.config.prefill_chunk
        for seq in sorted(running, key=lambda s: s.arrival):
            if seq.status is not Status.RUNNING:
                continue
            while True:
                try:
                    seq.model.kv.grow(seq.pages, seq.cached + len(seq.pending(chunk)))
                    break
                except PoolFull as e:
                    victim = max((s for s in running if s in self._running
                                  and s.status is Status.RUNNING), key=lambda s: s.arrival)
                    if victim is seq and len(self._running) == 1:
                        self._fail(seq, e)
                        break
                    self._preempt(victim)
                    if victim is seq:
                        break

    def _admit(self, waiting: list[Sequence], num_running: int) -> list[Sequence]:
        admitted: list[Sequence] = []
        chunk, reuse = self.config.prefill_chunk, self.config.prefix_cache
        for seq in waiting:
            kv = seq.model.kv
            if num_running + len(admitted) >= self.config.max_batch:
                break
            if reuse:
                if kv.blocked(seq):
                    continue    # its prefix is being computed now: admit it when it is done
                seq.cached = kv.reuse(seq)
            first = seq.cached + len(seq.pending(chunk))
            if not kv.can_grow(seq.pages, first):
                kv.finish(seq)
                seq.cached = 0
                if not self._running and not admitted:
                    self._fail(seq, PoolFull(seq.model.pool.device, kv.layout.page_bytes
                                             * kv.layout.pages_for(first),
                                             seq.model.pool.free_bytes))
                    continue
                break   # first come, first served: later ones wait too
            kv.grow(seq.pages, first)
            if reuse:
                kv.announce(seq)
            if not seq.prefix.queried:
                seq.prefix.queried = True
                seq.prefix.cached_prompt = min(seq.cached, len(seq.prompt))
            if seq.started_at is None:
                seq.started_at = time.monotonic()
            self._waiting.remove(seq)
            seq.status = Status.RUNNING
            self._running.append(seq)
            admitted.append(seq)
        return admitted

    def _forward(self, seqs: list[Sequence], limit: int) -> None:
        model = seqs[0].model
        chunks = [(seq.pending(limit), seq.cached, seq.pages) for seq in seqs]
        began, substitutions = time.perf_counter(), model.substitutions
        try:
            batch = build_batch(chunks, model.kv.layout.page_tokens,
                                torch.device(model.pool.device))
            batch.delta = forward_delta(seqs)
            logits = model.forward(batch)
        except Exception as e:
            log.exception("forward of %s failed", model.id)
            for seq in seqs:
                self._fail(seq, e)
            return
        self.tokens_computed += sum(len(ids) for ids, _, _ in chunks)
        done = [i for i, seq in enumerate(seqs)
                if seq.cached + len(chunks[i][0]) == seq.length]
        for seq, (ids, _, _) in zip(seqs, chunks, strict=True):
            if model.substitutions != substitutions:
                seq.model.kv.inexact(seq, seq.cached)
            seq.cached += len(ids)
            if self.config.prefix_cache:
                seq.model.kv.publish(seq)
        if limit > 1:       # the prefill speed prices retained prefix pages
            if logits.is_cuda:
                torch.cuda.synchronize(logits.device)
            model.kv.observe_prefill(sum(len(ids) for ids, _, _ in chunks),
                                     time.perf_counter() - began)
        if not done:
            return
        logits = logits if len(done) == len(seqs) else logits[done]   # (decode: no copy)
        grammars = [seqs[i].grammar for i in done]
        try:
            logits = mask_logits(logits, grammars)
            picked = sample(logits, [seqs[i].params for i in done],
                            [seqs[i].generator for i in done])
            logprobs = row_logprobs(logits, picked, [seqs[i].params.logprobs for i in done])
            advance(grammars, tokens := picked.tolist())
        except Exception as e:          # fail these sequences, not the whole engine
            log.exception("sampling for %s failed", model.id)
            for i in done:
                self._fail(seqs[i], e)
            return
        for j, (i, token) in enumerate(zip(done, tokens, strict=True)):
            seq = seqs[i]
            event = seq.accept(token, seq.model.eos_token_ids, logprobs.get(j))
            if seq.status is Status.FINISHED:
                self._retire(seq)
            seq.sink(event)

    # ---- endings ----------------------------------------------------------------------
    def _retire(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        seq.model.kv.finish(seq)
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._waiting:
            self._waiting.remove(seq)

    def _preempt(self, seq: Sequence) -> None:
        log.info("preempting sequence %d of %s (KV memory is short)", seq.id, seq.model.id)
        seq.model.kv.finish(seq)
        seq.cached = 0
        seq.status = Status.WAITING
        self._running.remove(seq)
        self._waiting.appendleft(seq)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        self._retire(seq)
        seq.finish_reason = "error"
        seq.sink(Event([], "", "error", error=error, prompt_tokens=len(seq.prompt),
                       completion_tokens=seq.sampled))

    def _drop_cancelled(self) -> None:
        for seq in [s for s in [*self._running, *self._waiting] if s.cancelled]:
            self._retire(seq)
            seq.finish_reason = "cancelled"

    def _abort_all(self) -> None:
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        for seq in [*self._running, *self._waiting]:
            self._fail(seq, RuntimeError("the engine stopped"))

