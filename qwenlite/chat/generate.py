"""Stop-aware streaming generation on top of the Engine.

Qwen chat models end a turn with ``<|im_end|>``, sometimes with ``<|endoftext|>``, and a model that
runs on will open a new turn with ``<|im_start|>``; all three stop generation (never stopping is the
most reported Qwen bug across runtimes). Stop ids are checked before decoding, so their text never
reaches the stream.

Stop *strings* can arrive split across tokens ("<|im" + "_end|>", "\\n\\nUs" + "er:"), so text that
could be the beginning of a stop string is held back and released only once the following text
proves it is not one. Marker *text* the model writes with ordinary tokens (a reply that explains
ChatML and spells ``<|im_end|>``) is ordinary text: it stays in the reply unless the caller asks for
it as a stop string. Cutting there (as earlier versions did) lost the rest of such answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np

from qwenlite.chat.constrain import Constraint
from qwenlite.chat.sampler import Sampler
from qwenlite.chat.template import IM_START
from qwenlite.errors import CancelledError, QwenliteError
from qwenlite.tokenizer import StreamDecoder


class Engine(Protocol):
    """What generation needs from ``model.engine``."""

    n_past: int
    n_ctx: int

    def eval(self, ids: Sequence[int]) -> np.ndarray: ...


def default_stop_ids(tokenizer: object) -> set[int]:
    """All end-of-turn ids of the vocabulary plus ``<|im_start|>``."""
    ids = set(tokenizer.eot_ids)
    im_start = tokenizer.id_of(IM_START)
    if im_start is not None:
        ids.add(im_start)
    return ids


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class TextStream:
    """Tokens in, text out, with the stop rules of one sequence: stop ids end it before their text,
    stop strings end it where they begin, and text that could still become a stop string is held back.
    Shared by the single-sequence ``Generation`` and the batched ``generate_batch``."""

    def __init__(self, tokenizer: object, stop_ids: Iterable[int] | None = None,
                 stop_strings: Sequence[str] = ()) -> None:
        self.stop_ids = set(default_stop_ids(tokenizer) if stop_ids is None else stop_ids)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.decoder = StreamDecoder(tokenizer)
        self.pending = ""
        self.stopped = False

    def push(self, tok: int) -> str:
        """The text that ``tok`` releases; sets ``stopped`` when it ends the sequence."""
        if tok in self.stop_ids:
            self.stopped = True
            return self.flush()
        self.pending += self.decoder.feed(tok)
        return self._release(final=False)

    def flush(self) -> str:
        """The text still held back once the sequence has ended for another reason."""
        self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        pending = self.pending
        cut = min((i for i in (pending.find(s) for s in self.stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.pending = ""
            return pending[:cut]
        ready = len(pending) if final else len(pending) - _held_suffix(pending, self.stop_strings)
        self.pending = pending[ready:]
        return pending[:ready]


class Generation:
    """An iterator of text pieces; after exhaustion, ``tokens`` and ``finish_reason`` tell what happened.

    ``finish_reason`` is "stop" (stop id or stop string), "length" (max_tokens), "context" (the
    sequence's slot of the KV cache is full) or "cancelled" (``Model.cancel()`` stopped a long
    prompt). ``tokens`` are the sampled ids excluding a stop id; ``evaluated`` says how many of them
    were fed back into the engine (the last sampled token is never evaluated), which is how a caller
    knows what its KV cache holds. Closing the iterator (or breaking out of a loop over it and dropping
    it) stops generation at once: nothing more is evaluated. ``reused`` is the number of prompt tokens
    whose keys and values were already cached and not evaluated again (set by the caller).
    """

    def __init__(self, engine: Engine, tokenizer: object, prompt_ids: Sequence[int], max_tokens: int,
                 sampler: Sampler, stop_ids: Iterable[int] | None = None,
                 stop_strings: Sequence[str] = (), constraint: Constraint | None = None) -> None:
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise QwenliteError("the prompt is empty; give at least one token")
        if max_tokens < 0:
            raise QwenliteError(f"max tokens must be >= 0, got {max_tokens}")
        free = engine.n_ctx - engine.n_past
        if len(prompt_ids) > free:
            raise QwenliteError(
                f"the prompt is {len(prompt_ids)} tokens but only {free} of the context's "
                f"{engine.n_ctx} are free; shorten it or raise the context size")
        self.engine = engine
        self.tokenizer = tokenizer
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.constraint = constraint
        self.stream = TextStream(tokenizer, stop_ids, stop_strings)
        self.tokens: list[int] = []
        self.evaluated = 0
        self.reused = 0
        self.finish_reason: str | None = None
        self._it = self._run()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        """Stop now; what was evaluated stays in the cache."""
        self._it.close()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    def _run(self) -> Iterator[str]:
        engine, stream = self.engine, self.stream
        history = list(self.prompt_ids)
        try:
            logits = engine.eval(self.prompt_ids)
        except CancelledError:
            self.finish_reason = "cancelled"
            return
        reason = "length"
        while len(self.tokens) < self.max_tokens:
            c = self.constraint
            tok = self.sampler.sample(c.apply(logits) if c is not None else logits, history)
            piece = stream.push(tok)
            if tok not in stream.stop_ids:
                if c is not None:
                    c.accept(tok)
                self.tokens.append(tok)
                history.append(tok)
            if piece:
                yield piece
            if stream.stopped:
                self.finish_reason = "stop"
                return
            if len(self.tokens) >= self.max_tokens:
                break
            if engine.n_past >= engine.n_ctx:
                reason = "context"
                break
            logits = engine.eval([tok])
            self.evaluated += 1
        self.finish_reason = reason
        piece = stream.flush()
        if stream.stopped:
            self.finish_reason = "stop"
        if piece:
            yield piece


def generate(engine: Engine, tokenizer: object, prompt_ids: Sequence[int], max_tokens: int,
             sampler: Sampler, stop_ids: Iterable[int] | None = None,
             stop_strings: Sequence[str] = ()) -> Generation:
    """Evaluate ``prompt_ids`` (appended to the engine's KV cache) and stream the continuation.

    Raises QwenliteError before touching the engine when the prompt does not fit in the free part
    of the context. ``stop_ids`` defaults to the tokenizer's end-of-turn ids plus ``<|im_start|>``.
    """
    return Generation(engine, tokenizer, prompt_ids, max_tokens, sampler, stop_ids, stop_strings)
