"""A one-line progress report on stderr for long conversions: tensor, bytes written, MB/s.

On a terminal the line is redrawn in place (at most ~10 times a second); when stderr is a file or a
pipe, one line per finished tensor is printed instead, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Tracks bytes written out of a known total and reports them on ``stream``."""

    def __init__(self, total_bytes: int, n_tensors: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = max(int(total_bytes), 1)
        self.n_tensors = n_tensors
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.index = 0
        self.start = time.monotonic()
        self._last_draw = 0.0
        self._width = 0

    def _line(self, name: str, qtype: str) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        mb = self.done / 1e6
        return (
            f"[{self.index:>{len(str(self.n_tensors))}}/{self.n_tensors}] {100 * self.done / self.total:5.1f}% "
            f"{mb:9.1f}/{self.total / 1e6:.1f} MB {mb / elapsed:7.1f} MB/s  {name} {qtype}"
        )

    def _draw(self, line: str, final: bool) -> None:
        if self.tty:
            pad = max(self._width - len(line), 0)
            self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def begin_tensor(self, name: str, qtype: str) -> None:
        self.index += 1
        self._name, self._qtype = name, qtype

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more written; redraw the line on a terminal if enough time passed."""
        self.done += nbytes
        if self.enabled and self.tty:
            now = time.monotonic()
            if now - self._last_draw >= 0.1:
                self._last_draw = now
                self._draw(self._line(self._name, self._qtype), final=False)

    def end_tensor(self) -> None:
        if self.enabled and not self.tty:
            self._draw(self._line(self._name, self._qtype), final=False)

    def finish(self, path: str) -> None:
        if self.enabled:
            elapsed = time.monotonic() - self.start
            if self.tty:
                self._draw(self._line(self._name, self._qtype) if self.index else "", final=True)
            self.stream.write(f"wrote {path}: {self.done / 1e6:.1f} MB in {elapsed:.1f} s\n")
            self.stream.flush()
