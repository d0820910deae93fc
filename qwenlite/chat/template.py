"""ChatML rendering with the semantics of the Qwen2/Qwen2.5 GGUF chat template.

We do not run Jinja at inference time: the template only ever produces ChatML, and rendering it
ourselves lets us tokenize piecewise. The ChatML markers become control tokens, while every run of
text between two markers (role names, user content, ...) is tokenized with ``special=False``, so a
user who types ``<|im_end|>`` gets plain text, not a forged turn boundary. The rendered *string* is
byte-for-byte what ``transformers``' ``apply_chat_template`` produces from the same template (the
tests check this against a real Jinja rendering).

The one piece of the template we do read is its default system prompt (Qwen2.5 injects "You are
Qwen, created by Alibaba Cloud. ..." when the conversation has no system message): it is extracted
from the template text, so a file carrying a different default keeps its own behaviour.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qwenlite.errors import QwenliteError

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
GENERATION_PROMPT = f"{IM_START}assistant\n"

# A literal default system turn in the template source: '<|im_start|>system\n<text><|im_end|>'.
# The ``\n`` is the two characters backslash-n inside a Jinja string literal, and the text must not
# contain a quote, which rules out the branch that splices ``messages[0]['content']`` in.
_DEFAULT_SYSTEM_RE = re.compile(r"<\|im_start\|>system\\n([^'\"]+?)<\|im_end\|>")

_ROLES = ("system", "user", "assistant", "tool")

Message = Mapping[str, str]


def default_system_prompt(template: str | None) -> str | None:
    """The system prompt the template injects when none is given, or None if it has none."""
    if not template:
        return None
    match = _DEFAULT_SYSTEM_RE.search(template)
    if match is None:
        return None
    # Undo the Jinja string-literal escapes that can appear in a plain sentence.
    return match.group(1).replace("\\n", "\n").replace("\\'", "'").replace('\\"', '"')


@dataclass(frozen=True)
class Segment:
    """One piece of a rendered conversation: a ChatML marker (``special``) or plain text."""

    text: str
    special: bool


def _check(messages: Sequence[Message]) -> None:
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in _ROLES:
            raise QwenliteError(f"message {i}: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
        if not isinstance(message.get("content"), str):
            raise QwenliteError(f"message {i}: content must be a string")


class ChatTemplate:
    """Renders message lists as ChatML and tokenizes them safely."""

    def __init__(self, default_system: str | None) -> None:
        self.default_system = default_system

    @classmethod
    def from_template(cls, template: str | None) -> ChatTemplate:
        """Build from the Jinja source in ``tokenizer.chat_template`` (None: no default system)."""
        return cls(default_system_prompt(template))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, object]) -> ChatTemplate:
        template = metadata.get("tokenizer.chat_template")
        return cls.from_template(template if isinstance(template, str) else None)

    def segments(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Segment]:
        """The conversation as alternating markers and text, in template order."""
        _check(messages)
        out: list[Segment] = []

        def turn(role: str, content: str) -> None:
            out.extend([Segment(IM_START, True), Segment(f"{role}\n{content}", False),
                        Segment(IM_END, True), Segment("\n", False)])

        if messages and messages[0]["role"] == "system":
            turn("system", messages[0]["content"])
        elif self.default_system is not None:
            turn("system", self.default_system)
        for i, message in enumerate(messages):
            role = message["role"]
            if role == "system" and i == 0:
                continue
            if role != "tool":
                turn(role, message["content"])
                continue
            # Consecutive tool results share one user turn, as in the Qwen2.5 template.
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.extend([Segment(IM_START, True), Segment("user", False)])
            out.append(Segment(f"\n<tool_response>\n{message['content']}\n</tool_response>", False))
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                out.extend([Segment(IM_END, True), Segment("\n", False)])
        if add_generation_prompt:
            out.extend([Segment(IM_START, True), Segment("assistant\n", False)])
        return out

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The conversation as one string (what ``apply_chat_template(tokenize=False)`` returns)."""
        return "".join(s.text for s in self.segments(messages, add_generation_prompt))

    def encode(self, tokenizer: object, messages: Sequence[Message],
               add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the conversation: markers as control tokens, all other text with special=False.

        Adjacent text segments are joined before encoding, so BPE sees the same text runs as when
        the whole rendered string is tokenized with special parsing (the ids then agree exactly).
        """
        marker_ids = {}
        for marker in (IM_START, IM_END):
            tid = tokenizer.id_of(marker)
            if tid is None:
                raise QwenliteError(f"the model's vocabulary has no {marker} token; it cannot chat in ChatML")
            marker_ids[marker] = tid
        ids: list[int] = []
        text = ""
        for seg in self.segments(messages, add_generation_prompt):
            if seg.special:
                if text:
                    ids.extend(tokenizer.encode(text, special=False))
                    text = ""
                ids.append(marker_ids[seg.text])
            else:
                text += seg.text
        if text:
            ids.extend(tokenizer.encode(text, special=False))
        return ids
