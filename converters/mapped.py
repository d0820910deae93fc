"""A read-only memory map that hands out zero-copy views and can drop consumed pages again.

Converting reads every byte of the input exactly once. Through a plain mmap, each page read stays in
the process's resident set until the end, so RSS would grow to the whole checkpoint (gigabytes) even
though nothing needs it twice. ``release(view)`` tells the kernel (``MADV_DONTNEED``) that the pages
under a consumed view are not needed: the mapping is file-backed and clean, so nothing is lost, a
later access simply re-reads from the page cache, and peak RSS stays near one chunk.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from pathlib import Path

import numpy as np


class MappedFile:
    """A whole file mapped read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self._mmap: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else None
        self._base = 0
        if self._mmap is not None:
            whole = np.frombuffer(self._mmap, dtype=np.uint8)
            self._base = whole.__array_interface__["data"][0]  # address of byte 0, for release()
            del whole

    def view(self, dtype: str, count: int, offset: int) -> np.ndarray:
        """``count`` items of ``dtype`` at byte ``offset`` (the caller has bounds-checked them)."""
        if self._mmap is None:
            raise ValueError(f"{self.path} is closed or empty")
        return np.frombuffer(self._mmap, dtype=dtype, count=count, offset=offset)

    def release(self, view: np.ndarray) -> bool:
        """Drop the pages under ``view`` from the resident set; False if it is not in this mapping."""
        if self._mmap is None or view.size == 0 or not view.flags.c_contiguous or not hasattr(mmap, "MADV_DONTNEED"):
            return False
        start = view.__array_interface__["data"][0] - self._base
        end = start + view.nbytes
        if not 0 <= start < end <= self.size:
            return False
        start -= start % mmap.PAGESIZE
        self._mmap.madvise(mmap.MADV_DONTNEED, start, end - start)
        return True

    def close(self) -> None:
        mm, self._mmap = self._mmap, None
        if mm is not None:
            with contextlib.suppress(BufferError):  # views still alive: it closes when they are collected
                mm.close()
