"""The Python API: ``m = qwenlite.load(path)``, then tokenize / logits / generate / chat, and their batched
forms ``logits_batch`` / ``generate_batch``.

A ``Model`` owns the mapped GGUF file, the tokenizer, the network and one ``Engine`` whose KV cache has
``n_seq`` sequence slots. Calls are serialized: a second thread waits for the first call (or stream)
to finish; a call from the thread that still holds an open stream is refused with a clear error
(waiting there would never end). ``generate`` and ``chat`` keep what they evaluated in slot 0 and reuse
the longest common prefix on the next call, so a multi-turn chat through this stateless API costs
only its new tokens (``last_reused`` says how many were reused). ``cancel()``, from any thread, stops
a running evaluation between two forward passes.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numba
import numpy as np

from qwenlite import hub
from qwenlite.backends import get_backend
from qwenlite.chat import openai
from qwenlite.chat.constrain import Grammar
from qwenlite.chat.generate import Generation
from qwenlite.chat.sampler import Sampler, SamplerConfig
from qwenlite.chat.session import common_prefix
from qwenlite.chat.template import ChatTemplate
from qwenlite.errors import GGUFError, QwenliteError, QwenliteWarning, shown
from qwenlite.gguf import names as gn
from qwenlite.gguf.reader import GGUFFile
from qwenlite.model.config import TASK_HEADS, ModelConfig
from qwenlite.model.qwen2 import Qwen2, no_lm_head
from qwenlite.model.weights import Linear
from qwenlite.quality import perplexity as quality
from qwenlite.quality.perplexity import PerplexityResult
from qwenlite.runtime import heads
from qwenlite.runtime.embed import POOLING_TYPES, POOLINGS, embed_lists
from qwenlite.runtime.engine import DEFAULT_N_BATCH, Engine
from qwenlite.runtime.kvcache import kv_type
from qwenlite.runtime.loader import Loader, LoadPolicy
from qwenlite.runtime.scheduler import Request, Scheduler, Update
from qwenlite.tokenizer import Tokenizer

DEFAULT_N_CTX = 4096
# The sampling defaults of the API, the CLI and the server: llama.cpp's (temperature 0.8, top-k 40,
# top-p 0.95, min-p 0.05, no repetition penalty). Pass temperature=0 for greedy output.
DEFAULTS = SamplerConfig()
# Sequence slots: generate_batch and logits_batch run this many sequences at a time. Slots cost
# address space, not memory, until positions fill (the cache is in lazily mapped pages).
DEFAULT_N_SEQ = 4


def _fits_in_memory(path: Path) -> bool:
    """Whether a copy of the whole file fits comfortably (half of the available memory): only then
    are the routed experts of a MoE model copied into the interleaved layout. Larger files (Qwen2
    57B-A14B is 35 GB) keep their experts in the mapped file, paged in on demand."""
    try:
        with open("/proc/meminfo") as fh:
            info = {k: v for k, _, v in (line.partition(":") for line in fh)}
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return path.stat().st_size <= available // 2


class _StreamInfo:
    generation: Generation | None = None


class Stream:
    """The text pieces of a streamed completion. ``close()`` (or breaking out of the loop and dropping
    the stream) stops it at once; ``tokens``, ``finish_reason`` and ``reused`` describe the generation."""

    def __init__(self, it: Iterator[str], info: _StreamInfo) -> None:
        self._it = it
        self._info = info  # filled by the generator; it holds no reference back to this object, so
        # dropping the stream frees (and closes) the generator at once, without waiting for the GC

    @property
    def generation(self) -> Generation | None:
        return self._info.generation

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    @property
    def tokens(self) -> list[int]:
        return self.generation.tokens if self.generation else []

    @property
    def finish_reason(self) -> str | None:
        return self.generation.finish_reason if self.generation else None

    @property
    def reused(self) -> int:
        return self.generation.reused if self.generation else 0


class Model:
    """A loaded Qwen2 / Qwen2-MoE model."""

    def __init__(self, path: str | os.PathLike[str], n_threads: int | None = None, n_ctx: int | None = None, *,
                 n_seq: int = DEFAULT_N_SEQ, kv_type: str | None = None, n_batch: int = DEFAULT_N_BATCH,
                 backend: str = "cpu") -> None:
        if not isinstance(path, str | os.PathLike):
            raise QwenliteError(f"load() takes a model file path or a known model's name, not {type(path).__name__}")
        if n_threads is not None:
            if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
                raise QwenliteError(f"threads must be an integer >= 1, got {n_threads!r}")
            numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
        # Numba's thread count is per calling thread: every call (and the server's scheduler thread)
        # sets it again on entry, or a model loaded with 1 thread would run on all cores elsewhere.
        self.n_threads = numba.get_num_threads()
        if n_seq < 1:
            raise QwenliteError(f"n_seq (sequence slots) must be >= 1, got {n_seq}")
        self.kv_type = _kv_name(kv_type)
        self.path = hub.resolve_model(os.fspath(path), progress=False)  # a file, or a known model's name
        self.file = GGUFFile(self.path)
        self.metadata = self.file.metadata
        self.config = ModelConfig.from_gguf(self.file)
        self.tokenizer = Tokenizer.from_metadata(self.metadata)
        if self.tokenizer.n_vocab != self.config.n_vocab:
            # llama.cpp refuses this too: tolerated, sampling could pick an id that has no token text.
            raise GGUFError(f"{self.path}: the token list has {self.tokenizer.n_vocab} tokens but the embedding "
                            f"table has {self.config.n_vocab} rows; the file is inconsistent")
        n_ctx = self.n_ctx = check_n_ctx(n_ctx, self.config.n_ctx_train)
        self.backend = get_backend(backend)
        loader = Loader(self.file, LoadPolicy(interleave_experts=_fits_in_memory(self.path)))
        self.network = Qwen2(loader, self.config, n_ctx, self.backend)
        self.runtime = Engine(self.network, n_ctx, n_seq=n_seq, kv_type=self.kv_type, n_batch=n_batch)
        self.engine = self.runtime.sequence(0)  # slot 0: generate / chat / logits
        self.template = ChatTemplate.from_metadata(self.metadata)
        self.last_reused = 0
        self._closed = False
        self._lock = threading.Lock()
        self._owner: int | None = None

    # ---- bookkeeping -------------------------------------------------------------------------

    @property
    def n_seq(self) -> int:
        return self.runtime.n_seq

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one position of one sequence takes (all layers, K and V)."""
        return self.runtime.cache.bytes_per_token

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:
            raise QwenliteError("this model is still streaming a previous generation in this thread; "
                                "exhaust or close() that stream first")
        if self._closed:
            raise QwenliteError("this model has been closed; load it again")
        with self._lock:
            self._owner = me
            numba.set_num_threads(self.n_threads)
            try:
                yield
            finally:
                self._owner = None

    def _need_lm_head(self) -> None:
        if not self.config.has_lm_head:
            raise QwenliteError(no_lm_head(self.config))

    def cancel(self) -> None:
        """Stop the evaluation running in another thread before its next forward pass (a stream then
        ends with finish_reason "cancelled"; other calls raise ``qwenlite.errors.CancelledError``)."""
        self.runtime.cancel()

    def _ids(self, prompt: str | Sequence[int], special: bool, what: str = "the prompt") -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, special=special)
        else:
            if isinstance(prompt, bytes) or not isinstance(prompt, Sequence | np.ndarray):
                raise QwenliteError(f"{what} must be text or a list of token ids, got {type(prompt).__name__}")
            bad_type = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int | np.integer)]
            if bad_type:
                raise QwenliteError(f"{what}: token ids must be integers, got {type(bad_type[0]).__name__} "
                                    f"{str(bad_type[0])[:20]}")
            ids = [int(t) for t in prompt]
        if not ids:
            raise QwenliteError(f"{what} is empty; give at least one token")
        n_vocab = self.config.n_vocab
        bad = [t for t in ids if not 0 <= t < n_vocab]
        if bad:
            raise QwenliteError(f"{what}: token id {bad[0]} out of range 0..{n_vocab - 1}")
        if len(ids) > self.n_ctx:
            raise QwenliteError(f"{what} is {len(ids)} tokens but a sequence's context is {self.n_ctx}; "
                                "shorten it or raise the context size")
        return ids

    # ---- single sequence ---------------------------------------------------------------------

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text``; control-token text stays plain unless ``special`` is True."""
        return self.tokenizer.encode(text, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``float32 [len(ids), n_vocab]`` at every position, in a fresh context."""
        self._need_lm_head()
        ids = self._ids(ids, False, "the token list")
        with self._exclusive():
            self.engine.reset()
            return self.engine.eval_all(ids)

    def generate(
        self,
        prompt_or_ids: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float = DEFAULTS.temperature,
        top_k: int = DEFAULTS.top_k,
        top_p: float = DEFAULTS.top_p,
        seed: int | None = None,
        stream: bool = False,
        *,
        min_p: float = DEFAULTS.min_p,
        repeat_penalty: float = DEFAULTS.repeat_penalty,
        stop: Sequence[str] = (),
        special: bool = False,
        sampling: SamplerConfig | None = None,
        grammar: str | Grammar | None = None,
        json_schema: Mapping[str, Any] | None = None,
    ) -> str | Stream:
        """Raw completion of a prompt (text, or token ids).

        Stops at an end-of-turn token, at a stop string, or after ``max_tokens``. With ``stream=True``
        returns a ``Stream`` of text pieces that never contains part of a stop marker. The result is
        the same as in a fresh context; the KV of the longest prefix shared with the previous call is
        reused (``last_reused`` / ``Stream.reused``). ``sampling`` replaces the individual options.

        ``grammar`` (a Lark or GBNF grammar text, or a ``Grammar`` from ``m.grammar(...)``) or
        ``json_schema`` constrains the output: every token is drawn from those the grammar allows.
        """
        cfg = sampling or SamplerConfig(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)
        ids = self._ids(prompt_or_ids, special)
        if max_tokens < 0:
            raise QwenliteError(f"max tokens must be >= 0, got {max_tokens}")
        if grammar is not None and json_schema is not None:
            raise QwenliteError("give either grammar or json_schema, not both")
        if isinstance(grammar, str):
            grammar = Grammar.grammar(self.tokenizer, grammar)
        elif json_schema is not None:
            grammar = Grammar.json_schema(self.tokenizer, json_schema)
        constraint = grammar.start() if grammar is not None else None
        info = _StreamInfo()
        out = Stream(self._stream(ids, max_tokens, Sampler(cfg), _stop_strings(stop), info, constraint), info)
        return out if stream else "".join(out)

    def grammar(self, *, grammar: str | None = None, json_schema: Mapping[str, Any] | None = None,
                regex: str | None = None) -> Grammar:
        """A compiled constraint for this model's vocabulary, reusable across calls: a Lark or GBNF
        ``grammar``, a ``json_schema`` (None: any JSON object) or a ``regex``."""
        if sum(x is not None for x in (grammar, json_schema, regex)) > 1:
            raise QwenliteError("give one of grammar, json_schema or regex")
        if grammar is not None:
            return Grammar.grammar(self.tokenizer, grammar)
        if regex is not None:
            return Grammar.regex(self.tokenizer, regex)
        return Grammar.json_schema(self.tokenizer, json_schema)

    def _stream(self, ids: list[int], max_tokens: int, sampler: Sampler, stop: tuple[str, ...],
                info: _StreamInfo, constraint: Any = None) -> Iterator[str]:
        self._need_lm_head()
        with self._exclusive():
            eng = self.engine
            keep = min(common_prefix(eng.tokens, ids), len(ids) - 1)
            eng.truncate(keep)
            gen = Generation(eng, self.tokenizer, ids[keep:], max_tokens, sampler, stop_strings=stop,
                             constraint=constraint)
            gen.reused = self.last_reused = keep
            info.generation = gen
            try:
                yield from gen
            finally:
                gen.close()

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        max_tokens: int | None = None,
        temperature: float = DEFAULTS.temperature,
        stream: bool = False,
        *,
        top_k: int = DEFAULTS.top_k,
        top_p: float = DEFAULTS.top_p,
        min_p: float = DEFAULTS.min_p,
        repeat_penalty: float = DEFAULTS.repeat_penalty,
        seed: int | None = None,
        stop: Sequence[str] = (),
        sampling: SamplerConfig | None = None,
    ) -> str | Stream:
        """The assistant's reply to a ChatML conversation (``[{"role": ..., "content": ...}, ...]``).

        Message text is tokenized with special parsing off, so ``<|im_end|>`` typed by a user stays
        text. The model's default system prompt applies when no system message is given. The earlier
        turns' keys and values are reused from the previous call (``last_reused``). ``max_tokens``
        None: until the end of the turn or of the context.
        """
        ids = self.template.encode(self.tokenizer, messages)
        if max_tokens is None:
            max_tokens = self.n_ctx
        return self.generate(ids, max_tokens, temperature, top_k, top_p, seed, stream,
                             min_p=min_p, repeat_penalty=repeat_penalty, stop=stop, sampling=sampling)

    # ---- OpenAI's shapes -----------------------------------------------------------------------

    def chat_completion(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        response_format: Mapping[str, Any] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        **options: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI's ``chat.completion`` object for ``messages`` (an iterator of ``chat.completion.chunk``
        dicts with ``stream=True``), through exactly the code ``/v1/chat/completions`` runs.

        ``tools`` / ``tool_choice`` ("auto", "none", "required" or ``{"type": "function", "function":
        {"name": ...}}``) render through the model's chat template; calls come back as
        ``message.tool_calls`` with their JSON held to each function's parameter schema.
        ``response_format`` ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
        {"name", "schema"}}`` constrains the reply. ``logprobs`` / ``top_logprobs`` (up to 20) report the
        model's own log-probabilities. Defaults are the server's (llama-server's: temperature 0.8,
        top-k 40, top-p 0.95, min-p 0.05); ``options`` takes the other request fields (``min_p``,
        ``presence_penalty``, ``logit_bias``, ``parallel_tool_calls``, ``stream_options``, ...).
        Bad input raises ``qwenlite.chat.openai.RequestError`` (a ``QwenliteError``) naming the field.
        """
        body = {"messages": [dict(m) for m in messages], "tools": tools, "tool_choice": tool_choice,
                "response_format": response_format, "logprobs": logprobs or None,
                "top_logprobs": top_logprobs or None, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p, "top_k": top_k, "seed": seed, "stop": stop, "stream": stream, **options}
        c = openai.prepare_chat(self, {k: v for k, v in body.items() if v is not None})
        return self._openai(c, "chat")

    def completion(self, prompt: str | Sequence[int], *, logprobs: int | None = None, max_tokens: int | None = None,
                   temperature: float | None = None, stream: bool = False,
                   **options: Any) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """OpenAI's ``text_completion`` object (chunks with ``stream=True``), as ``/v1/completions``
        answers it; ``logprobs=N`` (0..20) gives the legacy logprobs shape."""
        body = {"prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt], "logprobs": logprobs,
                "max_tokens": max_tokens, "temperature": temperature, "stream": stream, **options}
        c = openai.prepare_text(self, {k: v for k, v in body.items() if v is not None})
        return self._openai(c, "text")

    def _openai(self, c: openai.Completion, kind: str) -> dict[str, Any] | Iterator[dict[str, Any]]:
        asm = c.assembler(kind, self.path.stem, self.tokenizer)
        if c.stream:
            return self._openai_chunks(c, asm)
        result = None
        for u in self._schedule(c):
            result = u.result or result
        assert result is not None
        if result.finish_reason == "error":
            raise QwenliteError(result.error or "generation failed")
        return asm.response(result)

    def _openai_chunks(self, c: openai.Completion, asm: openai.Assembler) -> Iterator[dict[str, Any]]:
        yield asm.first()
        for u in self._schedule(c):
            yield from asm.chunks(u)

    def _schedule(self, c: openai.Completion) -> Iterator[Update]:
        """Run one request through a scheduler in this thread, yielding its updates as they come."""
        updates: list[Update] = []
        self._need_lm_head()
        with self._exclusive():
            sched = Scheduler(self.runtime, self.tokenizer)
            req = sched.submit(c.request(updates.append))
            try:
                while sched.step() or updates:
                    done = any(u.result is not None for u in updates)
                    for u in updates:
                        if u.result is not None:
                            self.last_reused = u.result.cached_tokens
                    yield from updates
                    updates.clear()
                    if done:
                        return
            finally:
                req.cancel()  # a stream closed early: its slot keeps what was evaluated

    # ---- many sequences ----------------------------------------------------------------------

    def logits_batch(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Logits ``float32 [len, n_vocab]`` of every position of each id list, each in a fresh
        context, evaluated ``n_seq`` sequences at a time in shared forward passes. Bit-identical to
        ``logits`` of each list alone."""
        self._need_lm_head()
        lists = [self._ids(s, False, f"sequence {i}") for i, s in enumerate(sequences)]
        out: list[np.ndarray] = []
        with self._exclusive():
            eng = self.runtime
            for w in range(0, len(lists), self.n_seq):
                wave = lists[w : w + self.n_seq]
                eng.clear()
                ids = [t for ids in wave for t in ids]
                seq = [s for s, ids in enumerate(wave) for _ in ids]
                rows = eng.decode(ids, seq, logits=np.ones(len(ids), bool))
                ends = np.cumsum([len(ids) for ids in wave])
                out.extend(np.split(rows, ends[:-1]))
            eng.clear()
        return out

    def embed(self, texts: str | Sequence[str] | Sequence[Sequence[int]], pooling: str | None = None,
              normalize: bool = True) -> np.ndarray | list[np.ndarray]:
        """Embeddings of ``texts`` (strings or token-id lists) from the final normed hidden states:
        ``float32 [len(texts), n_embd]`` pooled by "mean", "last" or "cls" (the first token), L2-
        normalized when ``normalize``; pooling "none" gives a list of ``[n_tokens, n_embd]`` arrays.
        The default pooling is the file's ``<arch>.pooling_type`` (llama.cpp's key), else "mean".
        Texts are evaluated ``n_seq`` at a time in shared forward passes, each in a fresh context, so a
        text's embedding is the same bit for bit alone or in a batch."""
        pooling = self.default_pooling if pooling is None else pooling
        if pooling not in POOLINGS:
            raise QwenliteError(f"pooling must be one of {', '.join(POOLINGS)}, got {shown(pooling)}")
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, bytes) or not isinstance(texts, Sequence) or not texts:
            raise QwenliteError("embed() takes a text, or a non-empty list of texts or token-id lists")
        lists = [self._ids(t, False, f"text {i}") for i, t in enumerate(texts)]
        with self._exclusive():
            return embed_lists(self.runtime, lists, pooling, normalize)

    @property
    def default_pooling(self) -> str:
        """The file's ``<arch>.pooling_type`` (llama.cpp's enum: 0 none, 1 mean, 2 cls, 3 last, 4 rank:
        last), else "mean"."""
        return POOLING_TYPES[self.file.meta_int(gn.arch_key(gn.POOLING_TYPE, self.config.arch), 1, lo=0, hi=4)]

    # ---- task heads (docs/task-heads.md) -----------------------------------------------------

    @property
    def task(self) -> str:
        """"causal-lm", or the head of a task model: "sequence-classification",
        "token-classification" or "question-answering"."""
        return self.config.task

    @property
    def labels(self) -> tuple[str, ...]:
        """The task head's output names, in score-column order (``id2label``); () for a causal LM."""
        return self.config.labels

    def _head(self, task: str, call: str) -> Linear:
        head = self.network.head
        if self.config.task != task or head is None:
            what = "a causal LM" if self.config.has_lm_head else f"a {self.config.task} model"
            raise QwenliteError(f"{call} needs a {task} model; {self.path.name} is {what} ({self.config.hf_arch})")
        return head

    def _states(self, lists: list[list[int]], pooling: str) -> np.ndarray | list[np.ndarray]:
        with self._exclusive():
            return embed_lists(self.runtime, lists, pooling, False)

    def classify(self, texts: str | Sequence[str] | Sequence[Sequence[int]]) -> np.ndarray:
        """Sequence-classification logits ``float32 [len(texts), len(labels)]`` (column ``j`` is
        ``labels[j]``; apply a softmax for single-label probabilities): the head on each text's last
        token, as ``Qwen2ForSequenceClassification`` scores the last non-padding token. Texts share
        forward passes and each result is the same bit for bit alone or in a batch."""
        head = self._head(TASK_HEADS[0], "classify()")
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, bytes) or not isinstance(texts, Sequence) or not texts:
            raise QwenliteError("classify() takes a text, or a non-empty list of texts or token-id lists")
        lists = [self._ids(t, False, f"text {i}") for i, t in enumerate(texts)]
        return heads.scores(self.backend, head, self._states(lists, "last"))

    def classify_tokens(self, text: str | Sequence[int]) -> np.ndarray:
        """Token-classification logits ``float32 [n_tokens, len(labels)]``, one row per token of
        ``tokenize(text)`` (``Qwen2ForTokenClassification``)."""
        head = self._head("token-classification", "classify_tokens()")
        return heads.scores(self.backend, head, self._states([self._ids(text, False, "the text")], "none")[0])

    def answer(self, question: str, context: str, max_answer_tokens: int = heads.MAX_ANSWER_TOKENS) -> dict[str, Any]:
        """The answer to ``question`` found in ``context`` (``Qwen2ForQuestionAnswering``): the tokens are
        ``tokenize(question) + tokenize(context)``, as a Qwen2 tokenizer encodes the pair, and the span
        is the one of at most ``max_answer_tokens`` context tokens maximizing p(start) * p(end), each a
        softmax over the context tokens (transformers' QA pipeline). Returns ``{"answer", "score",
        "start", "end"}`` (the pipeline's keys: character offsets into ``context``, whitespace at the
        span's edges left out) and ``"start_token"``, ``"end_token"`` (indices into the context's tokens)."""
        head = self._head("question-answering", "answer()")
        if not isinstance(question, str) or not isinstance(context, str) or not context.strip():
            raise QwenliteError("answer() takes a question and a non-empty context, both text")
        if isinstance(max_answer_tokens, bool) or not isinstance(max_answer_tokens, int) or max_answer_tokens < 1:
            raise QwenliteError(f"max_answer_tokens must be an integer >= 1, got {shown(max_answer_tokens)}")
        q, c = self.tokenize(question), self.tokenize(context)
        ids = self._ids(q + c, False, "the question and context")
        logits = heads.scores(self.backend, head, self._states([ids], "none")[0])[len(q):]
        s, e, score = heads.best_span(logits[:, 0], logits[:, 1], max_answer_tokens)
        pieces = [self.tokenizer.token_bytes(t) for t in c]
        spelled = b"".join(pieces).decode("utf-8", errors="replace")
        a, b = heads.char_span(pieces, s, e)
        text = spelled[a:b]
        a += len(text) - len(text.lstrip())
        b -= len(text) - len(text.rstrip())
        return {"answer": spelled[a:b], "score": score, "start": a, "end": max(a, b),
                "start_token": s, "end_token": e}

    # ---- quality (qwenlite.quality.perplexity) --------------------------------------------------

    def perplexity(self, text: str | Sequence[int] | None = None, n_ctx: int = 512, n_chunks: int | None = None, *,
                   kl_divergence_base: str | os.PathLike[str] | None = None, kl_divergence: bool = False,
                   progress: Callable[[int, float, float | None], None] | None = None) -> PerplexityResult:
        """Perplexity of ``text`` (or token ids) the way ``llama-perplexity -c n_ctx --chunks n_chunks``
        computes it (``qwenlite.quality.perplexity``: chunks of ``n_ctx`` tokens, the second half of each
        scored); chunks share forward passes, ``n_seq`` at a time. With ``kl_divergence_base`` the
        log-probabilities are also saved there in llama.cpp's format; with ``kl_divergence=True`` that
        file is read instead (its tokens and context are used, ``text`` must be None) and the result's
        ``kld`` holds llama-perplexity's KL-divergence statistics against it."""
        self._need_lm_head()
        n_vocab = self.config.n_vocab
        if kl_divergence:
            if kl_divergence_base is None:
                raise QwenliteError("kl_divergence needs kl_divergence_base, the base model's saved log-probabilities")
            if text is not None:
                raise QwenliteError("a KL-divergence run scores the base file's own tokens; give no text")
            n_ctx, file_vocab, chunk_list, _ = quality.read_base_header(kl_divergence_base)
            if file_vocab != n_vocab:
                raise QwenliteError(f"{kl_divergence_base}: saved with a vocabulary of {file_vocab} tokens, this model "
                                    f"has {n_vocab}")
        if n_ctx > self.n_ctx:
            raise QwenliteError(f"a perplexity context of {n_ctx} exceeds this model's context of {self.n_ctx} per "
                                "sequence; load it with a larger n_ctx")
        if not kl_divergence:
            if text is None:
                raise QwenliteError("perplexity() needs a text or token ids")
            chunk_list = quality.chunks(self._corpus(text), n_ctx, n_chunks)
        first = n_ctx // 2
        want = np.zeros(n_ctx, bool)
        want[first : n_ctx - 1] = True

        def evaluate(wave: list[list[int]]) -> list[np.ndarray]:
            self.runtime.clear()
            ids = [t for c in wave for t in c]
            seq = [s for s, c in enumerate(wave) for _ in c]
            rows = self.runtime.decode(ids, seq, logits=np.tile(want, len(wave)))
            return np.split(rows, len(wave))

        bos = self.tokenizer.bos_id if self.tokenizer.add_bos else None
        with self._exclusive():
            try:
                return quality.run(evaluate, chunk_list, n_vocab, self.n_seq, bos=bos,
                                   save_base=None if kl_divergence else kl_divergence_base,
                                   kld_base=kl_divergence_base if kl_divergence else None, progress=progress)
            finally:
                self.runtime.clear()

    def _corpus(self, text: str | Sequence[int]) -> list[int]:
        """A long text's token ids, as llama-perplexity tokenizes it (a BOS first when the vocabulary adds one)."""
        if isinstance(text, str):
            ids = self.tokenize(text)
            bos = self.tokenizer.bos_id
            return [bos, *ids] if self.tokenizer.add_bos and bos is not None else ids
        bad = [t for t in text if isinstance(t, bool) or not isinstance(t, int | np.integer)
               or not 0 <= t < self.config.n_vocab]
        if bad:
            raise QwenliteError(f"token id {shown(bad[0])} is not in the vocabulary of {self.config.n_vocab}")
        return [int(t) for t in text]

    def generate_batch(
        self,
        prompts: Sequence[str | Sequence[int]],
        max_tokens: int = 256,
        temperature: float = DEFAULTS.temperature,
        top_k: int = DEFAULTS.top_k,
        top_p: float = DEFAULTS.top_p,
        seed: int | Sequence[int] | None = None,
        stop: Sequence[str] = (),
        *,
        min_p: float = DEFAULTS.min_p,
        repeat_penalty: float = DEFAULTS.repeat_penalty,
        special: bool = False,
    ) -> list[str]:
        """Completions of many prompts decoded together (continuous batching over ``n_seq`` slots: a
        finished sequence's slot takes the next prompt at once). Each step reads the weights once for
        all running sequences.

        Each prompt gets its own sampler: with an int ``seed`` every prompt is sampled as
        ``generate(prompt, seed=seed)`` would (so its text never depends on the other prompts), a list
        gives one seed per prompt. At temperature 0 each result equals ``generate(prompt)``.
        """
        self._need_lm_head()
        lists = [self._ids(p, special, f"prompt {i}") for i, p in enumerate(prompts)]
        if max_tokens < 0:
            raise QwenliteError(f"max tokens must be >= 0, got {max_tokens}")
        if seed is None or isinstance(seed, int | np.integer):
            seeds = [seed] * len(lists)
        else:
            seeds = list(seed)
            if len(seeds) != len(lists):
                raise QwenliteError(f"{len(seeds)} seeds for {len(lists)} prompts")
        results = [""] * len(lists)

        def collect(i: int) -> Callable[[Update], None]:
            def emit(u: Update) -> None:
                if u.result is not None:
                    results[i] = u.result.text
            return emit

        reqs = [Request(ids, max_tokens, SamplerConfig(temperature, top_k, top_p, min_p, repeat_penalty, seed=s),
                        _stop_strings(stop), emit=collect(i)) for i, (ids, s) in enumerate(zip(lists, seeds))]
        with self._exclusive():
            self.runtime.clear()
            try:
                Scheduler(self.runtime, self.tokenizer).run_until_idle(reqs)
            finally:
                self.runtime.clear()
        return results

    def scheduler(self, max_queue: int = 64, n_batch: int | None = None) -> Scheduler:
        """A continuous-batching scheduler over this model's ``n_seq`` slots (what ``qwenlite serve``
        runs). Once ``start()``-ed it owns the model until ``close()``: other calls on the model wait.
        ``submit(Request(...))`` from any thread; text pieces and the ``Result`` arrive through the
        request's ``emit`` callback. Slots keep their cache between requests (prefix reuse)."""
        self._need_lm_head()
        return Scheduler(self.runtime, self.tokenizer, max_queue=max_queue, n_batch=n_batch, hold=self._exclusive)

    def warmup(self) -> None:
        """Compile (or load from Numba's disk cache) every kernel a generation runs: prefill (4-token
        tiles and a remainder), single-sequence decode and batched decode. Leaves the cache empty."""
        ids = [t % self.config.n_vocab for t in range(1000, 1006)]
        if not self.config.has_lm_head:
            self.embed([ids, ids[:3]])
            return
        self.generate(ids, max_tokens=3)
        self.generate_batch([ids[:2], ids[2:3]], max_tokens=2)
        with self._exclusive():
            self.runtime.clear()

    def close(self) -> None:
        """Release the file; any later call on this model raises ``QwenliteError``."""
        self._closed = True
        self.file.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Above the trained context RoPE extrapolates (badly, without a scaling method); far above it the request
# is a mistake, refused before any address space is reserved for the cache.
MAX_CTX_FACTOR = 8


def _stop_strings(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """Stop strings as a tuple: one string, or a list of them."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence) or not all(isinstance(x, str) for x in stop):
        raise QwenliteError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    return tuple(x for x in stop if x)


def check_n_ctx(n_ctx: int | None, n_ctx_train: int) -> int:
    """The context per sequence: ``n_ctx`` checked against the trained context (None: the default)."""
    if n_ctx is None:
        return min(n_ctx_train, DEFAULT_N_CTX)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int | np.integer):
        raise QwenliteError(f"context size must be an integer, got {type(n_ctx).__name__}")
    if n_ctx < 1:
        raise QwenliteError(f"context size must be >= 1, got {n_ctx}")
    if n_ctx > MAX_CTX_FACTOR * n_ctx_train:
        raise QwenliteError(f"context size {n_ctx} is more than {MAX_CTX_FACTOR}x the {n_ctx_train} tokens this "
                            "model was trained on; no RoPE scaling makes that useful")
    if n_ctx > n_ctx_train:
        warnings.warn(f"context size {n_ctx} is above the {n_ctx_train} tokens this model was trained on; without "
                      "RoPE scaling (YaRN, linear) in the file, positions beyond that degrade the output",
                      QwenliteWarning, stacklevel=3)
    return int(n_ctx)


def _kv_name(name: str | None) -> str:
    return kv_type(name).name


def load(path: str | os.PathLike[str], n_threads: int | None = None, n_ctx: int | None = None, *,
         n_seq: int = DEFAULT_N_SEQ, kv_type: str | None = None, n_batch: int = DEFAULT_N_BATCH) -> Model:
    """Load a GGUF model (a path, or a known model's name as ``qwenlite pull --list`` shows, pulled on
    first use). Weights stay quantized (repacked 8 rows at a time); ``n_ctx`` positions per
    sequence, ``n_seq`` sequence slots, KV cache of type ``kv_type`` ("f16" default, "f32", "q8_0"),
    prompts evaluated ``n_batch`` tokens per forward pass."""
    return Model(path, n_threads=n_threads, n_ctx=n_ctx, n_seq=n_seq, kv_type=kv_type, n_batch=n_batch)
