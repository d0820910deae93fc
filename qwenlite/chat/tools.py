"""Tool (function) calling in Qwen2.5's format: the definitions, the constraint, the parser.

Qwen2.5 is trained to answer a tool-using turn with blocks of ``<tool_call>\\n{"name": ..., "arguments":
{...}}\\n</tool_call>`` (``<tool_call>`` and ``</tool_call>`` are tokens of its vocabulary). Other
runtimes parse such text after the fact and fail when a small model drops a tag or writes broken JSON.
We constrain the generation instead (``tool_grammar``): under ``tool_choice`` "auto" the reply is free
text, or text followed by calls whose JSON is held to a schema built from the tools (the name is one of
theirs, the arguments validate against that function's parameters); under "required" or a named
function it must be calls. "none" bans ``<tool_call>``. The ``ToolCallParser`` then turns the blocks into
OpenAI ``tool_calls`` as text streams in, and never lets their markup into ``content``; a block that
does not parse (possible only when generation was cut off) is given back as content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qwenlite.chat.constrain import JSON_OPTIONS, Grammar
from qwenlite.errors import QwenliteError, shown

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
FENCE = "```json"
_PARTIAL = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"]+)"\s*,\s*"arguments"\s*:\s*(.*)\Z', re.S)


@dataclass(frozen=True)
class ToolChoice:
    """``mode``: "auto", "none", "required", or "function" (then ``name`` is the one to call)."""

    mode: str = "auto"
    name: str | None = None


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """OpenAI function definitions, checked: ``[{"type": "function", "function": {"name", "parameters"}}]``."""
    if tools is None:
        return []
    if not isinstance(tools, Sequence) or isinstance(tools, str | bytes):
        raise QwenliteError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function":
            raise QwenliteError(f"tools[{i}]: only tools of type 'function' are supported")
        fn = tool.get("function")
        if not isinstance(fn, Mapping):
            raise QwenliteError(f"tools[{i}]: needs a 'function' object")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not all(c.isalnum() or c in "_-." for c in name):
            raise QwenliteError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-' or '.', "
                                f"got {shown(name)}")
        if name in seen:
            raise QwenliteError(f"tools[{i}]: a second function named {shown(name)}")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise QwenliteError(f"tools[{i}].function.parameters must be a JSON schema object")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise QwenliteError(f"tools[{i}].function.description must be a string")
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    return out


def check_choice(choice: Any, tools: Sequence[Mapping[str, Any]]) -> ToolChoice:
    """``tool_choice`` as OpenAI spells it: "auto", "none", "required" or ``{"type": "function",
    "function": {"name": ...}}``. Without tools only "none" (or nothing) makes sense."""
    names = [t["function"]["name"] for t in tools]
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if choice in ("auto", "none", "required"):
        if choice != "none" and not tools:
            raise QwenliteError(f"tool_choice is {shown(choice)} but no tools were given")
        return ToolChoice(choice)
    if isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        if name not in names:
            raise QwenliteError(f"tool_choice names the function {shown(name)}, which is not in tools "
                                f"({', '.join(map(repr, names)) or 'none given'})")
        return ToolChoice("function", name)
    raise QwenliteError("tool_choice must be 'auto', 'none', 'required' or "
                        "{'type': 'function', 'function': {'name': ...}}")


def _call_schema(tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    variants = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                  "arguments": t["function"].get("parameters") or {"type": "object"}},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**schema, "x-guidance": JSON_OPTIONS}


def tool_grammar(tokenizer: Any, tools: Sequence[Mapping[str, Any]], choice: ToolChoice,
                 parallel: bool = True) -> Grammar | None:
    """The constraint for a tool-using reply (None for "none": that is a ban, not a grammar)."""
    if choice.mode == "none" or not tools:
        return None
    chosen = [t for t in tools if choice.mode != "function" or t["function"]["name"] == choice.name]
    for t in chosen:  # one clear error per bad schema, naming the tool
        Grammar.json_schema(tokenizer, t["function"].get("parameters") or {"type": "object"},
                            what=f"the parameters of tool {t['function']['name']!r}")
    ids = tokenizer.vocab.user_defined if hasattr(tokenizer, "vocab") else {}
    open_, close = (OPEN if OPEN in ids else json.dumps(OPEN)), (CLOSE if CLOSE in ids else json.dumps(CLOSE))
    many = parallel and choice.mode != "function"
    lines = [f"call: {open_} \"\\n\" %json {json.dumps(_call_schema(chosen))} \"\\n\" {close}",
             "calls: call (\"\\n\" call)* \"\\n\"?" if many else "calls: call \"\\n\"?"]
    if choice.mode == "auto":
        lines += ["start: TEXT | TEXT? calls", "TEXT: /(.|\\n)+/"]
    else:
        lines += ["start: calls"]
    return Grammar.grammar(tokenizer, "\n".join(lines), what="the tool-call grammar")


def banned_ids(tokenizer: Any) -> list[int]:
    """The ids that open a tool call (banned under tool_choice "none")."""
    tid = tokenizer.id_of(OPEN)
    return [tid] if tid is not None else []


def _held(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


@dataclass
class ToolCallParser:
    """Text pieces in; content to release and finished calls out. ``feed`` as text arrives, ``finish``
    at the end. Content is released as soon as it cannot be the start of a call; whitespace around
    calls is dropped."""

    tools: frozenset[str]
    calls: list[dict[str, Any]] = field(default_factory=list)
    _buf: str = ""
    _in_call: bool = False
    _released: bool = False  # some content has gone out

    def _bare(self) -> bool:
        """Whether the reply so far could be a call written without the tags, as bare JSON or in a
        ```json fence (small models do that under "auto"): then it is held back until the end."""
        head = self._buf.lstrip()
        return not self._released and not self.calls and (
            head.startswith("{") or FENCE.startswith(head) or head.startswith(FENCE))

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buf += text
        content, new = [], []
        while True:
            if not self._in_call:
                i = self._buf.find(OPEN)
                if i < 0:
                    if self._bare():
                        break
                    keep = _held(self._buf, OPEN)
                    head = self._buf[: len(self._buf) - keep]
                    keep += len(head) - len(head.rstrip())  # whitespace before a call is not content
                    content.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._buf[:i].rstrip() if not self.calls else self._buf[:i].strip())
                self._buf, self._in_call = self._buf[i + len(OPEN):], True
            else:
                j = self._buf.find(CLOSE)
                if j < 0:
                    break
                body, self._buf, self._in_call = self._buf[:j], self._buf[j + len(CLOSE):], False
                call = self._parse(body)
                if call is None:
                    content.append(OPEN + body + CLOSE)
                else:
                    new.append(call)
        out = "".join(content)
        self._released = self._released or bool(out.strip())
        return out, new

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """What is left. An unterminated call (the reply was cut off) that names a tool is a call with
        the arguments written so far, as OpenAI returns one at ``finish_reason`` "length"; a whole
        reply that is one call in bare JSON or a ```json fence is a call; anything else is content."""
        rest, self._buf = self._buf, ""
        if self._in_call:
            self._in_call = False
            call = self._parse(rest) or self._partial(rest)
            return ("", [call]) if call is not None else (OPEN + rest, [])
        if self._bare():
            body = rest.strip()
            if body.startswith(FENCE):
                body = body[len(FENCE):].removesuffix("```")
            call = self._parse(body)
            if call is not None:
                return "", [call]
        return ("" if self.calls else rest), []

    def _partial(self, body: str) -> dict[str, Any] | None:
        m = _PARTIAL.match(body)
        if m is None or m.group(1) not in self.tools:
            return None
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": m.group(1), "arguments": m.group(2)}}
        self.calls.append(call)
        return call

    def _parse(self, body: str) -> dict[str, Any] | None:
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.tools:
            return None
        args = obj.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError):
                return None
        call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}
        self.calls.append(call)
        return call
