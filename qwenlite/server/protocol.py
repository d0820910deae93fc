"""OpenAI request parsing and response shapes, with no HTTP in sight.

Every field is checked by hand against what OpenAI accepts, so that a wrong type or value becomes a 400
that names the field (``ApiError``), never a traceback or a silent default. Unknown fields are ignored,
as OpenAI and llama-server do. Sampling options land in the one ``SamplerConfig`` the Python API and the
CLI use; the defaults are llama-server's (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05), the
runtime our users compare us with, rather than OpenAI's temperature 1 / top-p 1.

Choices (where OpenAI and llama.cpp are silent or differ):
- ``max_tokens`` (or ``max_completion_tokens``) is capped to what a slot can hold; omitted, the reply
  may run to the end of the slot's context.
- Message content may be a string or a list of ``{"type": "text"}`` parts; other part types get a 400
  (these models read text only). The ``developer`` role of newer OpenAI models means ``system``.
- Text never becomes control tokens: ``<|im_end|>`` typed by a user stays text. ``/v1/completions``
  accepts a token-id list for callers who need control tokens (or ``"parse_special": true``).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwenlite.chat.sampler import SamplerConfig
from qwenlite.errors import QwenliteError
from qwenlite.runtime.scheduler import Result

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(param: str, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def _number(body: Mapping[str, Any], name: str, lo: float, hi: float, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(name, f"must be a number, got {value!r}", "invalid_type")
    if not lo <= value <= hi:
        raise _bad(name, f"must be between {lo} and {hi}, got {value}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, lo: int, hi: int | None, default: int | None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"must be an integer, got {value!r}", "invalid_type")
    if value < lo or (hi is not None and value > hi):
        raise _bad(name, f"must be between {lo} and {hi if hi is not None else 'inf'}, got {value}")
    return value


def boolean(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, f"must be true or false, got {value!r}", "invalid_type")
    return value


@dataclass
class Completion:
    """A parsed request: what to evaluate and how to sample it."""

    ids: list[int]
    max_tokens: int
    sampling: SamplerConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool


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
            raise _bad("logit_bias", f"key {key!r} is not a token id") from None
        if not 0 <= tok < n_vocab:
            raise _bad("logit_bias", f"token id {tok} out of range 0..{n_vocab - 1}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise _bad("logit_bias", f"bias of token {tok} must be a number in [-100, 100], got {value!r}")
        out.append((tok, float(value)))
    return tuple(out)


def parse_options(body: Mapping[str, Any], n_vocab: int) -> tuple[SamplerConfig, tuple[str, ...], bool, bool, bool]:
    """Sampling config, stop strings, stream, include_usage and ignore_eos of a request body."""
    n = _integer(body, "n", 1, None, 1)
    if n != 1:
        raise _bad("n", f"only n=1 is supported (one choice per request), got {n}", "unsupported_value")
    defaults = SamplerConfig()
    seed = _integer(body, "seed", -(2**63), 2**64 - 1, None)
    try:
        sampling = SamplerConfig(
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
    except QwenliteError as exc:
        raise ApiError(400, str(exc), code="invalid_value") from None
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


def _text_content(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"messages[{i}].content[{j}]",
                           f"only text parts are supported (this model reads text), got {kind!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", "must be a string or a list of text parts", "invalid_type")


def parse_messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """``messages`` as ``[{"role", "content"}]`` with string content."""
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
            raise _bad(f"messages[{i}].role", f"unknown role {role!r} (expected system, user, assistant or tool)")
        out.append({"role": role, "content": _text_content(m.get("content"), i)})
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


def completion(body: Mapping[str, Any], ids: list[int], n_ctx: int, n_vocab: int) -> Completion:
    """A checked request for ``ids``; a prompt longer than a slot's context is a 400."""
    if len(ids) > n_ctx:
        raise ApiError(400, f"the prompt is {len(ids)} tokens but a slot's context is {n_ctx} tokens; "
                       "shorten it", param="messages" if "messages" in body else "prompt",
                       code="context_length_exceeded")
    sampling, stop, stream, include_usage, ignore_eos = parse_options(body, n_vocab)
    room = n_ctx - len(ids) + 1  # the last sampled token needs no slot position
    return Completion(ids, _max_tokens(body, room), sampling, stop, stream, include_usage, ignore_eos)


# ---- responses -------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(res: Result) -> dict[str, Any]:
    return {"prompt_tokens": res.prompt_tokens, "completion_tokens": len(res.tokens),
            "total_tokens": res.prompt_tokens + len(res.tokens),
            "prompt_tokens_details": {"cached_tokens": res.cached_tokens}}


def finish_reason(res: Result) -> str:
    return "stop" if res.finish_reason == "stop" else "length"


def timings(res: Result) -> dict[str, float]:
    """llama-server's ``timings`` extra: milliseconds to the first token and generation speed."""
    first = (res.t_first - res.t_submit) * 1e3 if res.t_first is not None else 0.0
    gen = res.t_done - res.t_first if res.t_first is not None else 0.0
    n = len(res.tokens)
    return {"prompt_n": res.prompt_tokens - res.cached_tokens, "prompt_ms": round(first, 3), "predicted_n": n,
            "predicted_ms": round(gen * 1e3, 3),
            "predicted_per_second": round((n - 1) / gen, 3) if n > 1 and gen > 0 else 0.0}


class Shapes:
    """Response objects of one request (one id and creation time for all its chunks)."""

    def __init__(self, kind: str, model: str) -> None:
        self.chat = kind == "chat"
        self.id = new_id("chatcmpl" if self.chat else "cmpl")
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": "qwenlite"}

    def full(self, res: Result) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish_reason(res)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": res.text}
        else:
            choice["text"] = res.text
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage(res), "timings": timings(res)}

    def chunk(self, text: str | None = None, res: Result | None = None, role: bool = False) -> dict[str, Any]:
        reason = finish_reason(res) if res is not None else None
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if res is not None:
            out["timings"] = timings(res)
        return out

    def usage_chunk(self, res: Result) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage(res)}


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
