"""A multi-turn chat that keeps its KV cache between turns.

Each turn re-renders the whole conversation, but only the tokens after the longest common prefix
with what the cache already holds are evaluated: the engine is truncated to that prefix. In a normal
conversation that prefix is everything up to the new user message, so a turn costs only its own
tokens. When the conversation outgrows the context, the oldest exchanges are dropped (the system
prompt is kept) and the cache is rebuilt from the new common prefix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from qwenlite.chat.constrain import Grammar
from qwenlite.chat.generate import Engine, Generation
from qwenlite.chat.sampler import Sampler
from qwenlite.chat.template import ChatTemplate
from qwenlite.errors import QwenliteError


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ChatSession:
    """History plus cache bookkeeping; ``send`` streams the assistant's reply."""

    def __init__(self, engine: Engine, tokenizer: object, template: ChatTemplate,
                 system: str | None = None, sampler: Sampler | None = None,
                 max_tokens: int = 512, stop_strings: Sequence[str] = (), grammar: Grammar | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.system = system
        self.sampler = sampler or Sampler()
        self.max_tokens = max_tokens
        self.stop_strings = tuple(stop_strings)
        self.grammar = grammar  # every reply follows it (a fresh matcher per turn)
        self.history: list[dict[str, Any]] = []
        self.cached: list[int] = []  # the token ids the engine's KV cache holds, in order
        self.last: Generation | None = None
        self.dropped = 0  # how many times old turns were dropped to fit the context
        engine.reset()

    @classmethod
    def from_model(cls, model: object, **kwargs: object) -> ChatSession:
        """A session on a loaded ``qwenlite.Model`` using the chat template in its metadata."""
        return cls(model.engine, model.tokenizer, ChatTemplate.from_metadata(model.metadata), **kwargs)

    def _head(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}] if self.system is not None else []

    def messages(self) -> list[dict[str, str]]:
        """The whole conversation as the template sees it."""
        return self._head() + self.history

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.history = []
        self.cached = []
        self.engine.reset()

    def _fit(self, max_tokens: int) -> tuple[list[dict[str, str]], list[int]]:
        """The history to keep and its prompt ids, dropping the oldest exchanges until prompt + reply fit.

        Works on a copy, so a message that cannot fit at all leaves the conversation untouched.
        """
        history = list(self.history)
        head = self._head()
        # Room kept for the reply: all of max_tokens, but never more than a quarter of the context, or
        # a reply allowed to run to the end of the context (-n -1) would push out every earlier turn.
        room = max(1, min(max_tokens, self.engine.n_ctx // 4))
        while True:
            ids = self.template.encode(self.tokenizer, head + history)
            if len(ids) + room <= self.engine.n_ctx:
                return history, ids
            users = [i for i, m in enumerate(history) if m["role"] == "user"]
            if len(users) < 2:
                return history, ids  # only the newest message is left: reply in whatever room remains
            del history[:users[1]]

    def send(self, text: str, max_tokens: int | None = None) -> Iterator[str]:
        """Add a user message and stream the reply; the reply joins the history when it is done."""
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        self.history.append({"role": "user", "content": text})
        try:
            history, ids = self._fit(max_tokens)
            if len(ids) >= self.engine.n_ctx:
                raise QwenliteError(
                    f"the message does not fit: it needs {len(ids)} tokens of a "
                    f"{self.engine.n_ctx}-token context")
        except QwenliteError:
            self.history.pop()
            raise
        if len(history) < len(self.history):
            self.dropped += 1
        self.history = history
        keep = common_prefix(self.cached, ids)
        keep = min(keep, len(ids) - 1)  # at least one token must be evaluated to get logits
        if keep < self.engine.n_past:
            self.engine.truncate(keep)
        self.cached = self.cached[:keep]
        gen = Generation(self.engine, self.tokenizer, ids[keep:], max_tokens, self.sampler,
                         stop_strings=self.stop_strings,
                         constraint=self.grammar.start() if self.grammar is not None else None)
        self.last = gen
        pieces: list[str] = []
        try:
            for piece in gen:
                pieces.append(piece)
                yield piece
        finally:
            # Closed early (the consumer stopped, Ctrl-C): the partial reply stays, marked.
            interrupted = gen.finish_reason in (None, "cancelled")
            gen.close()
            # The engine's n_past is the truth even after an interrupted evaluation.
            self.cached = (ids + gen.tokens[:gen.evaluated])[:self.engine.n_past]
            reply: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
            if interrupted:
                reply["interrupted"] = True
            self.history.append(reply)
