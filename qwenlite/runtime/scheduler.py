"""Continuous batching: many requests decoded together over the engine's sequence slots.

One ``Scheduler`` owns an ``Engine``. Each ``step()`` builds one batch from every busy slot (llama.cpp's
server loop does the same): a slot that is generating contributes its one new token, and slots still
reading their prompt contribute the next chunk of it, within ``n_batch`` tokens per step. A long prompt
is therefore read a chunk per step while the other streams keep producing a token per step, instead
of freezing them for the whole prompt.

Slots keep their KV cache after a request ends. A new request goes to the idle slot whose cached
tokens share the longest prefix with its prompt, and only the rest is evaluated (``cached_tokens``): a
follow-up turn of a conversation costs its new tokens only. When a busy slot holds a longer prefix
(the system prompt all clients send), its keys and values are copied into the new request's slot:
a memory copy instead of a forward pass over them. Because every kernel computes each row on
its own (``runtime/engine.py``), a request's tokens are bit-for-bit the same whatever it is batched
with and whichever slot or prefix it reuses, so greedy output equals the single-sequence API's.

``submit()`` is thread-safe; ``start()`` runs the loop in a thread of its own (the server), while
``Model.generate_batch`` calls ``step()`` itself until the work is done. Results and text pieces are
delivered through the request's ``emit`` callback, from the scheduler's thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np

from qwenlite.chat import logprobs as lp
from qwenlite.chat.constrain import Constraint
from qwenlite.chat.generate import TextStream, default_stop_ids
from qwenlite.chat.sampler import Sampler, SamplerConfig
from qwenlite.chat.session import common_prefix
from qwenlite.errors import CancelledError, QwenliteError
from qwenlite.runtime.engine import Engine

log = logging.getLogger("qwenlite.scheduler")

# The burst window of ``Scheduler._gather``: at most this long, and no longer than a quiet gap of
# GATHER_QUIET_SECONDS without a new arrival (a lone request waits at most that gap).
GATHER_SECONDS = 0.05
GATHER_QUIET_SECONDS = 0.02


class QueueFullError(QwenliteError):
    """Every slot is busy and the waiting queue is full; the caller should retry later."""


@dataclass
class Result:
    """What a finished request produced. ``finish_reason``: "stop" (end of turn or a stop string),
    "length" (``max_tokens`` or the slot's context is full), "cancelled", or "error" (``error`` says
    why). ``cached_tokens`` prompt tokens were reused from the slot's cache, not evaluated again."""

    text: str
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    error: str | None = None
    t_submit: float = 0.0
    t_first: float | None = None  # when the first token was sampled
    t_done: float = 0.0
    logprobs: list[dict] | None = None  # one entry per token of ``tokens`` when the request asked


@dataclass
class Update:
    """One delivery to a request's ``emit``: a text piece, and on the last one the ``Result``.
    ``logprobs`` holds the entries of the tokens sampled since the previous update."""

    text: str = ""
    result: Result | None = None
    logprobs: list[dict] | None = None


@dataclass(eq=False)
class Request:
    """A prompt to complete. ``max_tokens`` is capped by the scheduler to what a slot can hold;
    ``ignore_eos`` bans the end-of-turn tokens (benchmarks with a fixed length use it). ``constraint``
    masks each step's logits (a grammar, ``chat.constrain``); ``logprobs`` (None: off) asks for each
    token's log-probability and that many alternatives."""

    ids: list[int]
    max_tokens: int
    sampling: SamplerConfig = field(default_factory=SamplerConfig)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    emit: Callable[[Update], None] | None = None
    constraint: Constraint | None = None
    logprobs: int | None = None
    id: int = field(default_factory=itertools.count().__next__)
    t_submit: float = field(default_factory=time.perf_counter)
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop this request (from any thread); its slot is free again after the current step."""
        self.cancelled = True


class _Slot:
    """A sequence slot and the request it serves (None when idle)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.req: Request | None = None
        self.last_used = 0.0

    def start(self, req: Request, feed: list[int], cached: int, sampler: Sampler, stream: TextStream) -> None:
        self.req, self.feed, self.cached = req, feed, cached
        self.sampler, self.stream = sampler, stream
        self.history = list(req.ids)
        self.tokens: list[int] = []
        self.text: list[str] = []
        self.t_first: float | None = None
        self.logprobs: list[dict] | None = [] if req.logprobs is not None else None
        self.unsent = 0  # logprob entries not yet delivered


@dataclass
class Stats:
    """Counters for ``/health`` and ``/metrics`` (read without a lock: each is one int or float)."""

    requests: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prompt_evaluated: int = 0
    completion_tokens: int = 0
    steps: int = 0
    busy_seconds: float = 0.0
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds of steps."""
        now = time.perf_counter()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0


class Scheduler:
    """Requests in, text pieces and results out, over ``engine.n_seq`` slots."""

    def __init__(self, engine: Engine, tokenizer: object, max_queue: int = 64, n_batch: int | None = None,
                 hold: Callable[[], AbstractContextManager[object]] = nullcontext) -> None:
        if max_queue < 0:
            raise QwenliteError(f"queue size must be >= 0, got {max_queue}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.n_batch = n_batch or engine.n_batch
        self.stop_ids = frozenset(default_stop_ids(tokenizer))
        self.slots = [_Slot(i) for i in range(engine.n_seq)]
        self.queue: deque[Request] = deque()
        self.stats = Stats()
        self._cv = threading.Condition()
        self._hold = hold
        self._thread: threading.Thread | None = None
        self._closing = False
        self._jobs: deque[tuple[Callable[[], object], Future[object]]] = deque()

    # ---- the caller's side (any thread) -----------------------------------------------------------

    @property
    def n_busy(self) -> int:
        return sum(s.req is not None for s in self.slots)

    @property
    def n_queued(self) -> int:
        return len(self.queue)

    def submit(self, req: Request) -> Request:
        """Queue a request; raises ``QueueFullError`` when ``max_queue`` requests already wait for a
        slot, and ``QwenliteError`` when the prompt cannot fit in a slot."""
        n_ctx = self.engine.n_ctx
        if not req.ids:
            raise QwenliteError("the prompt is empty; give at least one token")
        if len(req.ids) > n_ctx:
            raise QwenliteError(f"the prompt is {len(req.ids)} tokens but a slot's context is {n_ctx} tokens")
        if req.max_tokens < 0:
            raise QwenliteError(f"max tokens must be >= 0, got {req.max_tokens}")
        with self._cv:
            if self._closing:
                raise QwenliteError("the scheduler is shutting down")
            # Cancelled requests still hold their place until the next step; they do not count.
            idle = sum(s.req is None or s.req.cancelled for s in self.slots)
            if sum(not r.cancelled for r in self.queue) >= self.max_queue + idle:
                raise QueueFullError(f"all {len(self.slots)} slots are busy and {len(self.queue)} requests "
                                     "are waiting; retry later")
            self.queue.append(req)
            self.stats.requests += 1
            self._cv.notify()
        return req

    def call(self, fn: Callable[[], object]) -> Future[object]:
        """Run ``fn()`` in the scheduler's thread before its next step (work that needs the weights but
        not the slots, such as embeddings over an engine of its own); its result or exception arrives
        in the returned future."""
        future: Future[object] = Future()
        with self._cv:
            if self._closing:
                raise QwenliteError("the scheduler is shutting down")
            self._jobs.append((fn, future))
            self._cv.notify()
        return future

    def _run_jobs(self) -> None:
        while self._jobs:
            fn, future = self._jobs.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except Exception as exc:  # delivered to the caller, who answers its request
                future.set_exception(exc)

    def start(self) -> None:
        """Run the loop in a daemon thread until ``close()``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="qwenlite-scheduler", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Cancel everything, stop the thread and wait for it."""
        with self._cv:
            self._closing = True
            for req in [*self.queue, *(s.req for s in self.slots if s.req)]:
                req.cancel()
            for _, future in self._jobs:
                future.cancel()
            self._jobs.clear()
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        with self._hold():
            while True:
                with self._cv:
                    while not self._closing and not self.queue and not self.n_busy and not self._jobs:
                        self._cv.wait()
                    if self._closing and not self.queue and not self.n_busy:
                        return
                    if not self.n_busy and self.queue:
                        self._gather()
                self._run_jobs()
                try:
                    self.step()
                except Exception:  # a bug must not kill the loop: the step's requests got an error result
                    log.exception("scheduler step failed")

    def _gather(self) -> None:
        """With no slot busy, wait up to ``GATHER_SECONDS`` for the rest of a burst of requests (clients
        often send several at once) so that their prompts share the first forward pass. Admitting the
        first one alone made the others wait for its whole pass: with 4 simultaneous 1.5B requests the
        time to first token was 0.85 s for one and 2.8 s for three; gathered, about 2 s for all. Nobody
        is streaming yet, so the wait stalls no one. Called with the lock held."""
        deadline = time.perf_counter() + GATHER_SECONDS
        while not self._closing and len(self.queue) < len(self.slots):
            n = len(self.queue)
            left = deadline - time.perf_counter()
            if left <= 0 or not self._cv.wait(min(left, GATHER_QUIET_SECONDS)) or len(self.queue) == n:
                return

    # ---- the loop -----------------------------------------------------------------------------

    def _finish(self, slot: _Slot, reason: str, error: str | None = None, tail: str = "") -> None:
        """End the slot's request; ``tail`` is text released by its last token, not yet delivered.
        At "length" the text held back as a possible stop string is released too; after a stop
        nothing more is (what follows a stop string is not part of the reply)."""
        req = slot.req
        assert req is not None
        if reason == "length":
            tail += slot.stream.flush()
        slot.text.append(tail)
        res = Result("".join(slot.text), slot.tokens, reason, len(req.ids), slot.cached, error,
                     req.t_submit, slot.t_first, time.perf_counter(), slot.logprobs)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self.stats.completion_tokens += len(slot.tokens)
        slot.req = None
        slot.last_used = time.perf_counter()
        if error is not None:
            self.engine.clear(slot.index)  # what it holds may be half a forward pass
        self._emit(req, Update(tail, res, self._unsent(slot)))

    @staticmethod
    def _unsent(slot: _Slot) -> list[dict] | None:
        if slot.logprobs is None:
            return None
        out = slot.logprobs[len(slot.logprobs) - slot.unsent:]
        slot.unsent = 0
        return out

    def _emit(self, req: Request, update: Update) -> None:
        if req.emit is not None:
            try:
                req.emit(update)
            except Exception:  # a consumer's failure is its own; the other requests go on
                log.exception("request %d: emit failed", req.id)
                req.cancel()

    def _reject(self, req: Request, reason: str, error: str | None = None) -> None:
        now = time.perf_counter()
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self._emit(req, Update("", Result("", [], reason, len(req.ids), 0, error, req.t_submit, None, now)))

    def _admit(self) -> None:
        """Give idle slots to waiting requests, each to the slot with the longest cached prefix."""
        eng = self.engine
        while True:
            with self._cv:
                idle = [s for s in self.slots if s.req is None]
                if not idle or not self.queue:
                    return
                req = self.queue.popleft()
            if req.cancelled:
                self._reject(req, "cancelled")
                continue
            shared = {s.index: common_prefix(eng.tokens(s.index), req.ids) for s in self.slots}
            best = max(idle, key=lambda s: (shared[s.index], -s.last_used))
            donor = max(self.slots, key=lambda s: shared[s.index])
            if shared[donor.index] > shared[best.index]:
                # A busy slot holds a longer prefix (the system prompt every client sends): copy its
                # keys and values into the least recently used idle slot instead of evaluating them.
                best = min(idle, key=lambda s: s.last_used)
                eng.copy_prefix(donor.index, best.index, shared[donor.index])
                shared[best.index] = shared[donor.index]
            keep = min(shared[best.index], len(req.ids) - 1)
            eng.truncate(best.index, keep)
            cfg = req.sampling
            if req.ignore_eos:
                ban = tuple((t, float("-inf")) for t in sorted(self.stop_ids) if t < eng.n_vocab)
                cfg = dataclasses.replace(cfg, logit_bias=cfg.logit_bias + ban)
            best.start(req, req.ids[keep:], keep, Sampler(cfg), TextStream(self.tokenizer, self.stop_ids, req.stop))
            self.stats.prompt_tokens += len(req.ids)
            self.stats.cached_tokens += keep
            # What one slot can still produce: the last sampled token is never evaluated.
            req.max_tokens = min(req.max_tokens, eng.n_ctx - len(req.ids) + 1)
            if req.max_tokens == 0:
                self._finish(best, "length")

    def step(self) -> bool:
        """One batched forward pass over every busy slot; False when there was nothing to do."""
        for s in self.slots:
            if s.req is not None and s.req.cancelled:
                self._finish(s, "cancelled")
        self._admit()
        busy = [s for s in self.slots if s.req is not None]
        if not busy:
            return False
        # Generating slots first (one token each), then prompt chunks in admission order.
        busy.sort(key=lambda s: (s.t_first is None, s.req.id))
        budget = max(self.n_batch, sum(len(s.feed) == 1 for s in busy))
        ids: list[int] = []
        seq: list[int] = []
        want: list[bool] = []
        taken: list[tuple[_Slot, int]] = []
        for s in busy:
            n = min(len(s.feed), budget - len(ids))
            if n <= 0:
                break
            ids.extend(s.feed[:n])
            seq.extend([s.index] * n)
            want.extend([False] * (n - 1) + [n == len(s.feed)])
            taken.append((s, n))
        t0 = time.perf_counter()
        try:
            logits = self.engine.decode(ids, seq, logits=np.array(want))
        except Exception as exc:
            msg = str(exc) if isinstance(exc, QwenliteError) else f"internal error: {type(exc).__name__}: {exc}"
            if not isinstance(exc, QwenliteError):
                log.exception("decode failed")
            reason = "cancelled" if isinstance(exc, CancelledError) else "error"
            for s, _ in taken:
                self._finish(s, reason, msg)
            return True
        now = time.perf_counter()
        self.stats.steps += 1
        self.stats.busy_seconds += now - t0
        self.stats.prompt_evaluated += sum(n for s, n in taken if s.t_first is None)
        row = 0
        produced = 0
        for s, n in taken:
            if n < len(s.feed):
                s.feed = s.feed[n:]
                continue
            try:
                self._sample(s, logits[row], now)
            except Exception as exc:  # a constraint that failed, a bad logit bias: this request only
                if not isinstance(exc, QwenliteError):
                    log.exception("sampling failed")
                self._finish(s, "error", str(exc))
            row += 1
            produced += 1
        self.stats.recent.append((now, produced))
        return True

    def _sample(self, s: _Slot, row: np.ndarray, now: float) -> None:
        req = s.req
        assert req is not None
        c = req.constraint
        tok = s.sampler.sample(c.apply(row) if c is not None else row, s.history)
        if s.t_first is None:
            s.t_first = now
        piece = s.stream.push(tok)
        if tok not in s.stream.stop_ids:
            if c is not None:
                c.accept(tok)
            if s.logprobs is not None:
                s.logprobs.append(lp.entry(self.tokenizer, row, tok, req.logprobs))
                s.unsent += 1
            s.tokens.append(tok)
            s.history.append(tok)
        if s.stream.stopped:
            self._finish(s, "stop", tail=piece)
            return
        if len(s.tokens) >= req.max_tokens or self.engine.length(s.index) >= self.engine.n_ctx:
            self._finish(s, "length", tail=piece)
            return
        s.text.append(piece)
        if piece:
            self._emit(req, Update(piece, logprobs=self._unsent(s)))
        s.feed = [tok]

    def run_until_idle(self, requests: Sequence[Request]) -> None:
        """Submit ``requests`` and step in this thread until all are done (``generate_batch``)."""
        for req in requests:
            with self._cv:
                self.queue.append(req)
                self.stats.requests += 1
        with self._hold():
            while self.step():
                pass
