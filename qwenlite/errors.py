"""The one exception type users see.

Every problem with user input (a file, a prompt, a flag) is raised as ``QwenliteError`` with a
message that names the problem; the CLI prints it as a single ``error: ...`` line and exits non-zero,
so nothing user-caused ever surfaces as a traceback or a crash inside a kernel.
"""


class QwenliteError(Exception):
    """A user-facing error: bad file, unsupported type, prompt too long, ..."""


class GGUFError(QwenliteError):
    """A GGUF file that is truncated, hostile or not one we can run."""


class CancelledError(QwenliteError):
    """An evaluation stopped by ``Model.cancel()`` between two forward passes."""


class QwenliteWarning(UserWarning):
    """Something the caller should know but that does not stop the work (the CLI prints one line)."""
