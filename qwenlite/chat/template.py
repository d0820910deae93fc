"""Chat prompts rendered by the model's own Jinja chat template, tokenized so that text stays text.

The GGUF's ``tokenizer.chat_template`` is rendered with Jinja's immutable sandbox, configured the way
``transformers``' ``apply_chat_template`` configures it (``trim_blocks``, ``lstrip_blocks``, the loop
controls, a ``tojson`` that writes ``json.dumps(..., ensure_ascii=False)``, ``raise_exception`` and
``strftime_now``), so a conversation with tools renders to exactly the string transformers renders
(the tests compare them). A file without a template gets ``BUILTIN_CHATML``, our own ChatML template.

Safety: the rendered string mixes template text with user text (message content, tool names and
schemas, tool results). Tokenizing it with special parsing would let a user who types
``<|im_end|>`` forge a turn boundary. So the conversation is rendered twice: once as given, and once
with every control-token spelling inside user strings "defanged" (its first character replaced by a
private-use character of the same length). The control tokens found in the second rendering are
exactly the ones the template itself wrote; the first rendering is cut at those positions, the
markers become control ids and every run of text between them is tokenized with ``special=False``.
Without markers in user text the ids equal tokenizing the rendering with special parsing.

OpenAI's shapes are accepted: ``content`` may be None (an assistant turn that only calls tools), and
a tool call's ``function.arguments`` JSON string is parsed into an object before rendering, since
templates (Qwen2.5's among them) write it with ``tojson``; a string that is not JSON stays a string.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import FrameType
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from qwenlite.errors import QwenliteError, shown
from qwenlite.gguf import names as gn

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
GENERATION_PROMPT = f"{IM_START}assistant\n"

_ROLES = ("system", "user", "assistant", "tool")
_DEFANG = "\ue000"  # a private-use character: never in a vocabulary's control-token text

# For files that carry no template: ChatML with the tool conventions of Qwen2.5 (tools listed in the
# system turn, calls as <tool_call> JSON, results as <tool_response> in a user turn). Written for
# qwenlite; ``default_system`` is the system prompt used when the conversation has none.
BUILTIN_CHATML = """\
{%- set sys = messages[0].content if messages and messages[0].role == 'system' else default_system %}
{%- if sys is not none or tools %}
{{- '<|im_start|>system\\n' + (sys or '') }}
{%- if tools %}
{{- '\\n\\n# Tools\\n\\nCall a function by writing' }}
{{- ' <tool_call>{"name": ..., "arguments": {...}}</tool_call>. Functions:' }}
{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- for m in messages %}
{%- if m.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{ '<|im_start|>user' }}{% endif %}
{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{ '<|im_end|>\\n' }}{% endif %}
{%- elif not (loop.first and m.role == 'system') %}
{{- '<|im_start|>' + m.role + '\\n' + m.content }}
{%- for call in m.tool_calls or [] %}
{{- '\\n<tool_call>\\n{"name": "' + call.function.name + '", "arguments": ' }}
{{- (call.function.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}
"""


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' ``tojson``: plain ``json.dumps`` (Jinja's own escapes ``<``, ``>``, ``&``, ``'``)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


# A chat template is code from the model file. The sandbox keeps it from Python's internals; these
# bound what it may cost: the wall time of one render (checked on every line the template's compiled
# code runs, so nested loops that print nothing are stopped too) and the size of any string or list
# it builds with ``*`` (``'x' * 10**10``) or number with ``**``.
RENDER_SECONDS = 5.0
MAX_BUILT_ITEMS = 1 << 24
MAX_EXPONENT = 256


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            seq, n = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > MAX_BUILT_ITEMS:
                raise SecurityError(f"the template builds a sequence of {len(seq) * n} items")
        if operator == "**" and isinstance(right, int | float) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"the template raises a number to the power {right}")
        return super().call_binop(context, operator, left, right)


class _RenderTimeoutError(Exception):
    pass


def _with_deadline(render: Callable[[], str]) -> str:
    """``render()``, stopped with ``_RenderTimeoutError`` once it has run ``RENDER_SECONDS``: a trace function on
    the template's own frames (Jinja names their code ``<template>``) checks the clock on every line;
    other frames run untraced. Costs ~2x on a render of ~1 ms."""
    deadline = time.monotonic() + RENDER_SECONDS

    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _RenderTimeoutError
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return render()
    finally:
        sys.settrace(previous)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _arguments(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def normalize(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checked copies of OpenAI-style messages, in the shape chat templates expect."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise QwenliteError("messages must be a list of {'role': ..., 'content': ...} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise QwenliteError(f"message {i}: must be an object with a role and a content")
        role = message.get("role")
        if role not in _ROLES:
            raise QwenliteError(f"message {i}: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        content = message.get("content")
        if content is None and role in ("user", "system"):
            raise QwenliteError(f"message {i}: content must be a string")
        if content is not None and not isinstance(content, str):
            raise QwenliteError(f"message {i}: content must be a string")
        m: dict[str, Any] = {"role": role, "content": content or ""}
        calls = message.get("tool_calls")
        if calls:
            if role != "assistant" or not isinstance(calls, Sequence):
                raise QwenliteError(f"message {i}: only assistant messages carry a list of tool_calls")
            m["tool_calls"] = [_call(c, i, j) for j, c in enumerate(calls)]
        for key in ("tool_call_id", "name"):
            if isinstance(message.get(key), str):
                m[key] = message[key]
        out.append(m)
    return out


def _call(call: Any, i: int, j: int) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise QwenliteError(f"message {i}: tool_calls[{j}] needs a function with a name")
    out = {"type": "function", "function": {"name": fn["name"], "arguments": _arguments(fn.get("arguments", {}))}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _defang(value: Any, pattern: re.Pattern[str]) -> Any:
    """``value`` with the first character of every control-token spelling in its strings replaced."""
    if isinstance(value, str):
        return pattern.sub(lambda m: _DEFANG + m.group()[1:], value)
    if isinstance(value, Mapping):
        return {_defang(k, pattern): _defang(v, pattern) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_defang(v, pattern) for v in value]
    return value


def _pattern(texts: Sequence[str]) -> re.Pattern[str] | None:
    ordered = sorted((t for t in texts if t), key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in ordered)) if ordered else None


class ChatTemplate:
    """A compiled chat template; ``render`` gives the prompt text, ``encode`` its safe token ids."""

    def __init__(self, source: str | None = None, *, default_system: str | None = None,
                 bos_token: str = "", eos_token: str = "") -> None:
        self.source = source if source is not None else BUILTIN_CHATML
        self.builtin = source is None
        self.extra = {"bos_token": bos_token, "eos_token": eos_token, "default_system": default_system}
        try:
            self._template = _environment().from_string(self.source)
        except Exception as exc:  # noqa: BLE001 - TemplateSyntaxError, or RecursionError when nested deeply
            self._template = None
            self._broken = f"the model's chat template does not compile: {type(exc).__name__}: {shown(str(exc), 200)}"

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, object]) -> ChatTemplate:
        source = metadata.get(gn.CHAT_TEMPLATE)
        return cls(source if isinstance(source, str) and source.strip() else None)

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The conversation as one string (what ``apply_chat_template(tokenize=False)`` returns)."""
        return self._render(normalize(messages), add_generation_prompt, list(tools) if tools else None)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[Any] | None) -> str:
        if self._template is None:
            raise QwenliteError(self._broken)
        template = self._template
        try:
            return _with_deadline(lambda: template.render(messages=messages, tools=tools,
                                                          add_generation_prompt=add_generation_prompt, **self.extra))
        except _RenderTimeoutError:
            raise QwenliteError(f"the chat template ran for more than {RENDER_SECONDS:g} s on this conversation; "
                                "it is broken or hostile") from None
        except jinja2.TemplateError as exc:
            raise QwenliteError(f"the chat template refused this conversation: {shown(str(exc), 200)}") from None
        except Exception as exc:  # noqa: BLE001 - template code from the file can raise anything
            raise QwenliteError(f"the chat template failed on this conversation: {type(exc).__name__}: "
                                f"{shown(str(exc), 200)}") from None

    def encode(self, tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Token ids of the conversation: the template's markers as control ids, all text with
        ``special=False`` (see the module docstring)."""
        msgs = normalize(messages)
        tools = list(tools) if tools else None
        real = self._render(msgs, add_generation_prompt, tools)
        controls: Mapping[str, int] = tokenizer.control_tokens
        pattern = _pattern(list(controls))
        if pattern is None:
            return tokenizer.encode(real, special=False)
        shadow = self._render(_defang(msgs, pattern), add_generation_prompt, _defang(tools, pattern))
        if len(shadow) != len(real):
            raise QwenliteError("the chat template transforms message text in a way that cannot be kept apart "
                                "from its control tokens; qwenlite refuses to tokenize it unsafely")
        ids: list[int] = []
        pos = 0
        for match in pattern.finditer(shadow):
            if match.start() > pos:
                ids.extend(tokenizer.encode(real[pos:match.start()], special=False))
            ids.append(controls[match.group()])
            pos = match.end()
        if pos < len(real):
            ids.extend(tokenizer.encode(real[pos:], special=False))
        return ids
