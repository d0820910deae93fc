"""Reading a checkpoint's files safely: regular files only, text that names the file when it is bad.

A checkpoint directory comes from a stranger. ``open()`` on a FIFO named ``model.safetensors`` blocks
forever, and a symlink to ``/dev/zero`` reads without end; every file the converter reads goes
through ``open_regular``, which opens without blocking and refuses anything but a regular file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import IO, Any

from qwenlite.errors import QwenliteError

# config.json, tokenizer files, templates, the shard index: none is legitimately this large (Qwen2's
# tokenizer.json is 7 MB).
MAX_TEXT_BYTES = 256 << 20


def open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading, or a QwenliteError when it is missing or not a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise QwenliteError(f"cannot read {path}: {e.strerror or e}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise QwenliteError(f"{path} is not a regular file (a FIFO, device or directory); refusing to read it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def is_regular(path: Path) -> bool:
    """True when ``path`` exists as (or links to) a regular file; FIFOs and devices are not."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except (OSError, ValueError):
        return False


def read_text(path: Path) -> str:
    """The UTF-8 text of a regular file, with one clear error naming it."""
    with open_regular(path) as fh:
        raw = fh.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise QwenliteError(f"{path} is larger than {MAX_TEXT_BYTES >> 20} MiB; not a checkpoint's text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise QwenliteError(f"{path} is not UTF-8 text (byte {e.start})") from None


def read_json(path: Path) -> Any:
    """The JSON value in a regular file (NaN and Infinity literals are refused, as JSON does)."""
    text = read_text(path)

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:
        raise QwenliteError(f"{path} is not valid JSON: {str(e)[:120]}") from None
