"""OpenAI's chat and text completions: request checking, tools, constraints, logprobs, response shapes.

This is the one code path behind both ``Model.chat_completion`` / ``Model.completion`` (Python API) and
``/v1/chat/completions`` / ``/v1/completions`` (``qwenlite serve``): ``prepare_chat`` / ``prepare_text``
check a request body and return a ``Completion`` (what to evaluate, how to sample and constrain it, and
an ``Assembler`` that turns the scheduler's updates into OpenAI's objects). There is no HTTP here; the
server maps ``RequestError`` to its status code.

Every field is checked by hand against what OpenAI accepts, so that a wrong type or value becomes an
error that names the field, never a traceback or a silent default. Unknown fields are ignored, as
OpenAI and llama-server do. Sampling options land in the one ``SamplerConfig`` the Python API and the
CLI use; the defaults are llama-server's (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), the
runtime our users compare us with, rather than OpenAI's temperature 1 / top-p 1.

Choices (where OpenAI and llama.cpp are silent or differ):
- ``max_tokens`` (or ``max_completion_tokens``) is capped to what a slot can hold; omitted, the reply
  may run to the end of the slot's context.
- Message content may be a string or a list of ``{"type": "text"}`` parts; other part types are refused
  (these models read text only). The ``developer`` role of newer OpenAI models means ``system``.
- Text never becomes control tokens: ``<|im_end|>`` typed by a user stays text. ``/v1/completions``
  accepts a token-id list for callers who need control tokens (or ``"parse_special": true``).
- ``response_format`` (``json_object``, ``json_schema``) and llama-server's ``json_schema`` and
  ``grammar`` fields constrain the output; with tools in play (``tool_choice`` other than "none") the
  tool-call grammar is the constraint and a ``response_format`` besides it is refused.
- ``logprobs`` are the model's own (before penalties and masks); ``top_logprobs`` up to 20 (OpenAI's
  limit). ``/v1/completions`` takes ``logprobs`` as an integer 0..20 and answers in its legacy shape.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwenlite.chat import logprobs as lp
from qwenlite.chat import tools as tl
from qwenlite.chat.constrain import Grammar
from qwenlite.chat.sampler import SamplerConfig
from qwenlite.errors import QwenliteError, shown
from qwenlite.runtime.scheduler import Request, Result, Update

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class RequestError(QwenliteError):
    """A request that cannot be served as given; the server answers it as ``{"error": {"message", "type",
    "param", "code"}}`` with ``status``, the Python API raises it (a ``QwenliteError``)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str | None = "invalid_value") -> RequestError:
    return RequestError(400, f"{param}: {message}", param=param, code=code)


def _number(body: Mapping[str, Any], name: str, lo: float, hi: float, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, f"must be a number, got {shown(value)}", "invalid_type")
    if not lo <= value <= hi:
        raise _bad(name, f"must be between {lo} and {hi}, got {value}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int | None, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {shown(value)}", "invalid_type")
    if value < lo or (hi is not None and value > hi):
        raise _bad(name, f"must be between {lo} and {hi if hi is not None else 'inf'}, got {value}")
    return value


def boolean(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {shown(value)}", "invalid_type")
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("stop", "must be a string or a list of strings", "invalid_type")
    if len(items) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in items):
        raise _bad("stop", f"at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} characters")
    return tuple(s for s in items if s)


def _logit_bias(body: Mapping[str, Any], n_vocab: int) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise _bad("logit_bias", "must be an object mapping token ids to biases", "invalid_type")
    out = []
    for key, value in bias.items():
        try:
            tok = int(key)
        except (TypeError, ValueError):
            raise _bad("logit_bias", f"key {shown(key)} is not a token id") from None
        if not 0 <= tok < n_vocab:
            raise _bad("logit_bias", f"token id {tok} out of range 0..{n_vocab - 1}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise _bad("logit_bias", f"bias of token {tok} must be a number in [-100, 100], got {shown(value)}")
        out.append((tok, float(value)))
    return tuple(out)


def parse_options(body: Mapping[str, Any], n_vocab: int) -> tuple[SamplerConfig, tuple[str, ...], bool, bool, bool]:
    """Sampling config, stop strings, stream, include_usage and ignore_eos of a request body."""
    n = _integer(body, "n", 1, None, 1)
    if n != 1:
        raise _bad("n", f"only n=1 is supported (one choice per request), got {n}", "unsupported_value")
    defaults = SamplerConfig()
    seed = _integer(body, "seed", -(2**63), 2**64 - 1, None)
    fields = dict(
        temperature=_number(body, "temperature", 0.0, 2.0, defaults.temperature),
        top_p=max(_number(body, "top_p", 0.0, 1.0, defaults.top_p), 1e-9),  # 0 keeps the top token
        top_k=_integer(body, "top_k", 0, None, defaults.top_k),
        min_p=_number(body, "min_p", 0.0, 1.0, defaults.min_p),
        repeat_penalty=_number(body, "repeat_penalty", 0.0, 10.0, defaults.repeat_penalty) or 1.0,
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, 0.0),
        seed=None if seed is None or seed < 0 else seed,  # llama.cpp: -1 means random
        logit_bias=_logit_bias(body, n_vocab),
    )
    try:
        sampling = SamplerConfig(**fields)
    except QwenliteError as exc:
        raise RequestError(400, str(exc), code="invalid_value") from None
    stream = boolean(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("stream_options", "must be an object", "invalid_type")
    include_usage = boolean(opts or {}, "include_usage", False)
    return sampling, _stop(body), stream, include_usage, boolean(body, "ignore_eos", False)


def _max_tokens(body: Mapping[str, Any], room: int) -> int:
    given = [_integer(body, name, 0, None, None) for name in ("max_completion_tokens", "max_tokens")]
    value = next((v for v in given if v is not None), None)
    if value is None:
        value = _integer(body, "n_predict", -1, None, None)  # llama.cpp's name; -1 = no limit
        value = None if value is not None and value < 0 else value
    return room if value is None else min(value, room)


def _text_content(content: Any, i: int, nullable: bool = False) -> str | None:
    if content is None:
        return None if nullable else ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"messages[{i}].content[{j}]",
                           f"only text parts are supported (this model reads text), got {shown(kind)}")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", "must be a string or a list of text parts", "invalid_type")


def _tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise _bad(f"messages[{i}].tool_calls", "must be a list", "invalid_type")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"messages[{i}].tool_calls[{j}]", "needs a function with a name", "invalid_type")
        args = fn.get("arguments", "{}")
        if not isinstance(args, str | dict):
            raise _bad(f"messages[{i}].tool_calls[{j}].function.arguments", "must be a JSON string", "invalid_type")
        out.append({"id": str(call.get("id", "")), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def parse_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``messages`` with text content, the ``tool_calls`` of assistant turns and ``tool_call_id`` of tool
    results kept (the template renders them back)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages", "invalid_type" if messages else "missing")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object with a role and a content", "invalid_type")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant", "tool"):
            raise _bad(f"messages[{i}].role", f"unknown role {shown(role)} (expected system, user, assistant or tool)")
        msg: dict[str, Any] = {"role": role, "content": _text_content(m.get("content"), i)}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], i)
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def parse_prompt(body: Mapping[str, Any], tokenize: Any, n_vocab: int) -> list[int]:
    """The ``prompt`` of ``/v1/completions``: a string, a token-id list, or a list of one of them."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenize(prompt, special=boolean(body, "parse_special", False))
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < n_vocab]
        if bad:
            raise _bad("prompt", f"token id {bad[0]} out of range 0..{n_vocab - 1}")
        ids = list(prompt)
    elif isinstance(prompt, list):
        raise _bad("prompt", "give one prompt per request (a string or a list of token ids)", "unsupported_value")
    else:
        raise _bad("prompt", "must be a string or a list of token ids", "invalid_type" if prompt else "missing")
    if not ids:
        raise _bad("prompt", "is empty; give at least one token")
    return ids


def _compile(param: str, build: Any) -> Grammar:
    try:
        return build()
    except QwenliteError as exc:
        raise _bad(param, str(exc), "invalid_schema") from None


def _constraint(body: Mapping[str, Any], tokenizer: Any) -> Grammar | None:
    """``response_format``, or llama-server's ``json_schema`` / ``grammar`` fields."""
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise _bad("response_format", "must be {'type': 'text' | 'json_object' | 'json_schema', ...}")
        if fmt["type"] == "json_object":
            schema = fmt.get("schema")  # llama-server accepts a schema here too
            return _compile("response_format", lambda: Grammar.json_schema(tokenizer, schema))
        if fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict):
                raise _bad("response_format.json_schema", "must be an object with 'name' and 'schema'", "invalid_type")
            schema = spec.get("schema")
            return _compile("response_format.json_schema",
                            lambda: Grammar.json_schema(tokenizer, schema, what="the response_format schema"))
    if body.get("json_schema") is not None:
        return _compile("json_schema", lambda: Grammar.json_schema(tokenizer, body["json_schema"]))
    if body.get("grammar") is not None:
        return _compile("grammar", lambda: Grammar.grammar(tokenizer, body["grammar"]))
    return None


def _logprobs(body: Mapping[str, Any], chat: bool) -> int | None:
    """How many alternatives to report per token, or None when logprobs are off."""
    if chat:
        on = boolean(body, "logprobs", False)
        top = _integer(body, "top_logprobs", 0, lp.MAX_TOP_LOGPROBS, None)
        if top is not None and not on:
            raise _bad("top_logprobs", "needs logprobs: true")
        return (top or 0) if on else None
    if body.get("logprobs") is None or body.get("logprobs") is False:
        return None
    if body.get("logprobs") is True:
        return 0
    return _integer(body, "logprobs", 0, lp.MAX_TOP_LOGPROBS, None)


@dataclass
class Completion:
    """A checked request: what to evaluate, how to sample and constrain it, how to answer."""

    ids: list[int]
    max_tokens: int
    sampling: SamplerConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    grammar: Grammar | None = None
    logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None

    def request(self, emit: Any) -> Request:
        """The scheduler's request (a fresh constraint state each time)."""
        return Request(self.ids, self.max_tokens, self.sampling, self.stop, self.ignore_eos, emit=emit,
                       constraint=self.grammar.start() if self.grammar is not None else None,
                       logprobs=self.logprobs)

    def assembler(self, kind: str, model: str, tokenizer: Any) -> Assembler:
        return Assembler(kind, model, tokenizer, self)


def _completion(body: Mapping[str, Any], ids: list[int], n_ctx: int, n_vocab: int) -> Completion:
    """A checked request for ``ids``; a prompt longer than a slot's context is refused."""
    if len(ids) > n_ctx:
        raise RequestError(400, f"the prompt is {len(ids)} tokens but a slot's context is {n_ctx} tokens; "
                           "shorten it", param="messages" if "messages" in body else "prompt",
                           code="context_length_exceeded")
    sampling, stop, stream, include_usage, ignore_eos = parse_options(body, n_vocab)
    room = n_ctx - len(ids) + 1  # the last sampled token needs no slot position
    return Completion(ids, _max_tokens(body, room), sampling, stop, stream, include_usage, ignore_eos)


def prepare_chat(model: Any, body: Mapping[str, Any]) -> Completion:
    """Check a chat-completion body (OpenAI's fields) against ``model`` and render its prompt."""
    messages = parse_messages(body)
    try:
        tools = tl.check_tools(body.get("tools"))
    except QwenliteError as exc:
        raise _bad("tools", str(exc)) from None
    try:
        choice = tl.check_choice(body.get("tool_choice"), tools)
    except QwenliteError as exc:
        raise _bad("tool_choice", str(exc)) from None
    parallel = boolean(body, "parallel_tool_calls", True)
    try:
        ids = model.template.encode(model.tokenizer, messages, tools=tools or None)
    except QwenliteError as exc:
        raise RequestError(400, str(exc), param="messages") from None
    c = _completion(body, ids, model.n_ctx, model.config.n_vocab)
    c.logprobs = _logprobs(body, chat=True)
    c.grammar = _constraint(body, model.tokenizer)
    if tools and choice.mode != "none":
        if c.grammar is not None:
            raise _bad("response_format", "cannot be combined with tools unless tool_choice is 'none'")
        c.grammar = _compile("tools", lambda: tl.tool_grammar(model.tokenizer, tools, choice, parallel))
        c.tools = tools
    elif tools:
        ban = tuple((t, float("-inf")) for t in tl.banned_ids(model.tokenizer))
        c.sampling = dataclasses.replace(c.sampling, logit_bias=c.sampling.logit_bias + ban)
    return c


def prepare_text(model: Any, body: Mapping[str, Any]) -> Completion:
    """Check a text-completion body (``prompt`` and OpenAI's fields) against ``model``."""
    ids = parse_prompt(body, model.tokenize, model.config.n_vocab)
    c = _completion(body, ids, model.n_ctx, model.config.n_vocab)
    c.logprobs = _logprobs(body, chat=False)
    c.grammar = _constraint(body, model.tokenizer)
    return c


# ---- responses -------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(res: Result) -> dict[str, Any]:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.tokens),
            "total_tokens": res.prompt_tokens + len(res.tokens),
            "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}


def timings(res: Result) -> dict[str, float]:
    """llama-server's ``timings`` extra: milliseconds to the first token and generation speed."""
    first = (res.t_first - res.t_submit) * 1e3 if res.t_first is not None else 0.0
    gen = res.t_done - res.t_first if res.t_first is not None else 0.0
    n = len(res.tokens)
    return {"prompt_n": res.prompt_tokens - res.cached_tokens, "prompt_ms": round(first, 3), "predicted_n": n,
            "predicted_ms": round(gen * 1e3, 3),
            "predicted_per_second": round((n - 1) / gen, 3) if n > 1 and gen > 0 else 0.0}


class Assembler:
    """The response objects of one request: ``chunks(update)`` while streaming, ``response(result)`` at
    once. Tool-call markup is parsed out of the text here (``tools.ToolCallParser``), for both."""

    def __init__(self, kind: str, model: str, tokenizer: Any, c: Completion) -> None:
        self.chat = kind == "chat"
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())
        self.model = model
        self.include_usage = c.include_usage
        self.want_logprobs = c.logprobs is not None
        self.tool_names = frozenset(t["function"]["name"] for t in c.tools or ())
        self._parser = tl.ToolCallParser(self.tool_names) if self.tool_names else None
        self._n_calls = 0
        self._offset = 0  # text offset of the next legacy logprob entry

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "qwenlite"}

    def _finish_reason(self, res: Result, calls: bool) -> str:
        if res.finish_reason == "stop":
            return "tool_calls" if calls else "stop"
        return "length"

    def _logprobs(self, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        if not self.want_logprobs:
            return None
        entries = entries or []
        if self.chat:
            return {"content": entries, "refusal": None}
        out = lp.legacy(entries)
        out["text_offset"] = [o + self._offset for o in out["text_offset"]]
        self._offset += sum(len(e["token"]) for e in entries)
        return out

    # ---- all at once -------------------------------------------------------------------------------

    def response(self, res: Result) -> dict[str, Any]:
        """The ``chat.completion`` / ``text_completion`` object of a finished request."""
        calls: list[dict[str, Any]] = []
        text: str | None = res.text
        if self._parser is not None:
            content, calls = self._parser.feed(res.text)
            rest, more = self._parser.finish()
            calls += more
            text = content + rest
            if calls:
                text = text.strip() or None
        choice: dict[str, Any] = {"index": 0, "logprobs": self._logprobs(res.logprobs),
                                  "finish_reason": self._finish_reason(res, bool(calls))}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            if calls:
                choice["message"]["tool_calls"] = calls
        else:
            choice["text"] = res.text
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage(res), "timings": timings(res)}

    # ---- streaming ---------------------------------------------------------------------------------

    def _chunk(self, delta: dict[str, Any] | None = None, text: str | None = None,
               reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": reason}
        if self.chat:
            choice["delta"] = delta or {}
        else:
            choice["text"] = text or ""
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def first(self) -> dict[str, Any]:
        """The opening chunk (the assistant role; an empty text for completions)."""
        return self._chunk({"role": "assistant", "content": ""})

    def chunks(self, u: Update) -> list[dict[str, Any]]:
        """The chunks one scheduler update becomes (the last update also gives the finishing ones)."""
        out: list[dict[str, Any]] = []
        lps = self._logprobs(u.logprobs) if u.logprobs else None
        text, calls = u.text, []
        if self._parser is not None:
            text, calls = self._parser.feed(u.text)
            if u.result is not None:
                rest, more = self._parser.finish()
                text, calls = text + rest, calls + more
        if text or lps is not None:
            out.append(self._chunk({"content": text} if text else {}, text, logprobs=lps))
        for call in calls:
            fn = call["function"]
            out.append(self._chunk({"tool_calls": [{"index": self._n_calls, "id": call["id"], "type": "function",
                                                    "function": {"name": fn["name"], "arguments": fn["arguments"]}}]}))
            self._n_calls += 1
        res = u.result
        if res is not None:
            if res.finish_reason == "error":
                err = RequestError(500, res.error or "generation failed", code="internal_error", kind="server_error")
                return [*out, err.body()]
            reason = self._finish_reason(res, self._n_calls > 0)
            last = self._chunk(reason=reason)
            last["timings"] = timings(res)
            out.append(last)
            if self.include_usage:
                out.append({**self._head("chat.completion.chunk" if self.chat else "text_completion"),
                            "choices": [], "usage": usage(res)})
        return out


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[dict[str, Any]]:
    """llama-server's ``with_pieces`` shape: a piece is a string when it is valid UTF-8, else its bytes."""
    out = []
    for t in ids:
        raw = tokenizer.token_bytes(t)
        try:
            piece: Any = raw.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(raw)
        out.append({"id": t, "piece": piece})
    return out
