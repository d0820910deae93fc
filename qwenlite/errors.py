"""The one exception type users see.

Every problem with user input (a file, a prompt, a flag) is raised as ``QwenliteError`` with a
message that names the problem; the CLI prints it as a single ``error: ...`` line and exits non-zero,
so nothing user-caused ever surfaces as a traceback or a crash inside a kernel.
"""


from typing import Any

# Echoed values (a key, a tensor name, a token, an architecture string) come from the file or the
# request: at most this many characters of one appear in a message.
MAX_SHOWN = 80


def shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """``repr(value)`` cut to ``limit`` characters, saying how long it was: attacker-controlled text
    in an error message stays one short line."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[: limit - 20]}... ({size})"


class QwenliteError(Exception):
    """A user-facing error: bad file, unsupported type, prompt too long, ..."""


class GGUFError(QwenliteError):
    """A GGUF file that is truncated, hostile or not one we can run."""


class CancelledError(QwenliteError):
    """An evaluation stopped by ``Model.cancel()`` between two forward passes."""


class QwenliteWarning(UserWarning):
    """Something the caller should know but that does not stop the work (the CLI prints one line)."""
