"""A streaming GGUF v3 writer.

A GGUF file is header, metadata, tensor infos (with data offsets), then the tensor data. The offsets
only depend on each tensor's byte size, so once every tensor is *declared* (name, shape, type, size)
the whole header can be written and the data can follow one tensor at a time, as the converter
produces it: the model never has to sit in memory.

The file is written to ``<out>.incomplete-<pid>`` next to the target, fsynced and atomically renamed
at the end, so a reader never sees a half-written model and an interrupted run (exception, Ctrl-C,
SIGTERM through the CLI) leaves nothing behind: the temp file is removed on every failure path. A
process killed outright (SIGKILL, power loss) cannot clean up; the next writer into the same folder
removes the ``*.incomplete-<pid>`` files of processes that no longer run.

The target must be a regular file or not exist (``-o /dev/null`` must not replace a device node with
a file), and its folder must exist unless ``parents=True``.

Layout details that readers rely on (gguf.h): all integers little-endian; strings are u64 length +
UTF-8 bytes; tensor shapes are stored as ``ne`` (fastest-varying dimension first, i.e. the numpy shape
reversed); data offsets are relative to the start of the data section, which begins at the first
``general.alignment`` boundary after the tensor infos; every tensor starts aligned and is padded with
zeros to the next boundary.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from qwenlite.errors import GGUFError
from qwenlite.gguf import names as gn
from qwenlite.gguf.constants import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    NUMPY_DTYPE,
    SCALAR_STRUCT,
    GGMLType,
    GGUFValueType,
)

GGUF_VERSION = 3

_INT_RANGES: dict[GGUFValueType, tuple[int, int]] = {
    GGUFValueType.UINT8: (0, 2**8 - 1),
    GGUFValueType.INT8: (-(2**7), 2**7 - 1),
    GGUFValueType.UINT16: (0, 2**16 - 1),
    GGUFValueType.INT16: (-(2**15), 2**15 - 1),
    GGUFValueType.UINT32: (0, 2**32 - 1),
    GGUFValueType.INT32: (-(2**31), 2**31 - 1),
    GGUFValueType.UINT64: (0, 2**64 - 1),
    GGUFValueType.INT64: (-(2**63), 2**63 - 1),
}


def _encode_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_scalar(vtype: GGUFValueType, value: Any, key: str) -> bytes:
    if vtype == GGUFValueType.STRING:
        if not isinstance(value, str):
            raise GGUFError(f"metadata {key!r}: expected a string, got {type(value).__name__}")
        return _encode_string(value)
    if vtype == GGUFValueType.BOOL:
        if not isinstance(value, (bool, np.bool_)):
            raise GGUFError(f"metadata {key!r}: expected a bool, got {type(value).__name__}")
        return struct.pack("<?", bool(value))
    if vtype in _INT_RANGES:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise GGUFError(f"metadata {key!r}: expected an integer, got {type(value).__name__}")
        lo, hi = _INT_RANGES[vtype]
        if not lo <= int(value) <= hi:
            raise GGUFError(f"metadata {key!r}: {value} does not fit in {vtype.name}")
        return struct.pack(SCALAR_STRUCT[vtype], int(value))
    if vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
            raise GGUFError(f"metadata {key!r}: expected a number, got {type(value).__name__}")
        return struct.pack(SCALAR_STRUCT[vtype], float(value))
    raise GGUFError(f"metadata {key!r}: {vtype!r} is not a scalar value type")


def _encode_array(elem_type: GGUFValueType, values: Sequence[Any] | np.ndarray, key: str) -> bytes:
    """Array payload: element type, u64 count, elements. Numeric arrays go through numpy in one pass
    because the tokenizer arrays have ~150k entries."""
    if elem_type == GGUFValueType.ARRAY:
        raise GGUFError(f"metadata {key!r}: nested arrays are not supported")
    head = struct.pack("<IQ", int(elem_type), len(values))
    if elem_type == GGUFValueType.STRING:
        parts = [head]
        for v in values:
            if not isinstance(v, str):
                raise GGUFError(f"metadata {key!r}: array of strings holds a {type(v).__name__}")
            parts.append(_encode_string(v))
        return b"".join(parts)
    if elem_type in _INT_RANGES or elem_type == GGUFValueType.BOOL:
        arr = np.asarray(values)
        if arr.size and arr.dtype.kind not in "iub":
            raise GGUFError(f"metadata {key!r}: array of {elem_type.name} holds non-integers")
        if arr.size and elem_type in _INT_RANGES:
            lo, hi = _INT_RANGES[elem_type]
            if int(arr.min()) < lo or int(arr.max()) > hi:
                raise GGUFError(f"metadata {key!r}: array values do not fit in {elem_type.name}")
        if arr.size and elem_type == GGUFValueType.BOOL and arr.dtype.kind != "b":
            raise GGUFError(f"metadata {key!r}: array of BOOL holds non-bools")
    else:
        arr = np.asarray(values)
        if arr.size and arr.dtype.kind not in "iuf":
            raise GGUFError(f"metadata {key!r}: array of {elem_type.name} holds non-numbers")
    return head + np.ascontiguousarray(arr, dtype=NUMPY_DTYPE[elem_type]).tobytes()


@dataclass(frozen=True)
class _TensorDecl:
    name: str
    shape: tuple[int, ...]
    qtype: GGMLType
    nbytes: int
    offset: int


INCOMPLETE = ".incomplete-"  # temp files are named <target>.incomplete-<pid>


def check_output(path: Path, parents: bool = False) -> None:
    """Refuse an output that exists and is not a regular file, or whose folder is missing."""
    if path.exists() or path.is_symlink():
        try:
            mode = path.stat().st_mode
        except OSError as e:
            raise GGUFError(f"output {path}: {e.strerror or e}") from None
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a device, FIFO or socket)"
            raise GGUFError(f"output {path} is {kind}; give the path of a file to write")
    elif not parents and not path.parent.is_dir():
        raise GGUFError(f"output folder {path.parent} does not exist (create it, or pass --mkdir)")


def remove_stale(folder: Path) -> list[Path]:
    """Delete ``*.incomplete-<pid>`` files in ``folder`` whose writing process no longer exists."""
    removed = []
    try:
        candidates = [p for p in folder.iterdir() if INCOMPLETE in p.name]
    except OSError:
        return removed
    for p in candidates:
        pid = p.name.rsplit(INCOMPLETE, 1)[1]
        if not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)) or not p.is_file():
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _pad(n: int, alignment: int) -> int:
    return (alignment - n % alignment) % alignment


class GGUFWriter:
    """Write one GGUF file: declare metadata and tensors, then stream the tensor data in order.

    Usage::

        with GGUFWriter(path) as w:
            w.add_string("general.architecture", "qwen2")
            w.add_tensor_info("token_embd.weight", (vocab, d), GGMLType.Q8_0, nbytes)
            w.begin_data()                        # writes header, metadata, tensor infos
            w.write_tensor("token_embd.weight", [chunk0, chunk1])
        # leaving the block normally renames the temp file onto ``path``; an exception removes it

    ``shape`` is numpy order (slowest dimension first), the same convention as the reader.
    """

    def __init__(self, path: str | os.PathLike[str], alignment: int = GGUF_DEFAULT_ALIGNMENT, *,
                 parents: bool = False) -> None:
        if alignment <= 0 or alignment % 8 != 0:
            raise GGUFError(f"alignment must be a positive multiple of 8, got {alignment}")
        self.path = Path(path)
        check_output(self.path, parents)
        self.parents = parents
        self.tmp_path = self.path.with_name(f"{self.path.name}{INCOMPLETE}{os.getpid()}")
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}
        self._tensors: dict[str, _TensorDecl] = {}
        self._data_size = 0
        self._file: BinaryIO | None = None
        self._next = 0  # index of the next tensor whose data is expected
        self._order: list[str] = []
        self._done = False
        if alignment != GGUF_DEFAULT_ALIGNMENT:
            self.add_uint32(gn.ALIGNMENT, alignment)

    # --- metadata -------------------------------------------------------------------------------

    def add(self, key: str, value: Any, vtype: GGUFValueType, elem_type: GGUFValueType | None = None) -> None:
        """Add one key of an explicit GGUF type (``elem_type`` for arrays)."""
        if self._file is not None:
            raise GGUFError(f"metadata {key!r} added after the header was written")
        if key in self._kv:
            raise GGUFError(f"duplicate metadata key {key!r}")
        if not key:
            raise GGUFError("empty metadata key")
        if vtype == GGUFValueType.ARRAY:
            if elem_type is None:
                raise GGUFError(f"metadata {key!r}: array without an element type")
            payload = _encode_array(GGUFValueType(elem_type), value, key)
        else:
            payload = _encode_scalar(GGUFValueType(vtype), value, key)
        self._kv[key] = _encode_string(key) + struct.pack("<I", int(vtype)) + payload

    def add_string(self, key: str, value: str) -> None:
        self.add(key, value, GGUFValueType.STRING)

    def add_uint32(self, key: str, value: int) -> None:
        self.add(key, value, GGUFValueType.UINT32)

    def add_int32(self, key: str, value: int) -> None:
        self.add(key, value, GGUFValueType.INT32)

    def add_uint64(self, key: str, value: int) -> None:
        self.add(key, value, GGUFValueType.UINT64)

    def add_float32(self, key: str, value: float) -> None:
        self.add(key, value, GGUFValueType.FLOAT32)

    def add_bool(self, key: str, value: bool) -> None:
        self.add(key, value, GGUFValueType.BOOL)

    def add_array(self, key: str, values: Sequence[Any] | np.ndarray, elem_type: GGUFValueType) -> None:
        self.add(key, values, GGUFValueType.ARRAY, elem_type)

    # --- tensors --------------------------------------------------------------------------------

    def add_tensor_info(self, name: str, shape: Sequence[int], qtype: GGMLType, nbytes: int) -> None:
        """Declare a tensor. ``nbytes`` is its exact data size (the caller knows the format's row size);
        ``write_tensor`` later checks that exactly this many bytes arrive."""
        if self._file is not None:
            raise GGUFError(f"tensor {name!r} declared after the header was written")
        if name in self._tensors:
            raise GGUFError(f"duplicate tensor name {name!r}")
        if not name or len(name.encode("utf-8")) > 65535:
            raise GGUFError(f"bad tensor name {name!r}")
        dims = tuple(int(d) for d in shape)
        if not 1 <= len(dims) <= 4 or any(d < 0 for d in dims):
            raise GGUFError(f"tensor {name!r}: bad shape {dims}")
        if nbytes < 0:
            raise GGUFError(f"tensor {name!r}: negative size")
        self._tensors[name] = _TensorDecl(name, dims, GGMLType(qtype), int(nbytes), self._data_size)
        self._order.append(name)
        self._data_size += int(nbytes) + _pad(int(nbytes), self.alignment)

    def _header_bytes(self) -> bytes:
        parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv))]
        parts.extend(self._kv.values())
        for name in self._order:
            t = self._tensors[name]
            ne = t.shape[::-1]
            parts.append(_encode_string(name))
            parts.append(struct.pack(f"<I{len(ne)}Q", len(ne), *ne))
            parts.append(struct.pack("<IQ", int(t.qtype), t.offset))
        header = b"".join(parts)
        return header + bytes(_pad(len(header), self.alignment))

    def begin_data(self) -> None:
        """Open the temp file and write everything up to the start of the tensor data."""
        if self._file is not None:
            raise GGUFError("header already written")
        if self.parents:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(self.path.parent)
        header = self._header_bytes()
        self._file = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._file.write(header)

    def write_tensor(self, name: str, chunks: Iterable[np.ndarray | bytes]) -> None:
        """Write the data of the next declared tensor, given as consecutive byte chunks."""
        if self._file is None:
            raise GGUFError("begin_data() must be called before writing tensor data")
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise GGUFError(f"tensor data out of order: got {name!r}, expected {expected!r}")
        t = self._tensors[name]
        written = 0
        for chunk in chunks:
            buf = memoryview(np.ascontiguousarray(chunk)).cast("B") if isinstance(chunk, np.ndarray) else chunk
            written += len(buf)
            if written > t.nbytes:
                raise GGUFError(f"tensor {name!r}: more than the declared {t.nbytes} bytes")
            self._file.write(buf)
        if written != t.nbytes:
            raise GGUFError(f"tensor {name!r}: wrote {written} bytes, declared {t.nbytes}")
        self._file.write(bytes(_pad(t.nbytes, self.alignment)))
        self._next += 1

    # --- completion -----------------------------------------------------------------------------

    def finish(self) -> Path:
        """Check every tensor was written, fsync, and atomically move the file into place."""
        if self._file is None:
            self.begin_data()
        assert self._file is not None
        if self._next != len(self._order):
            raise GGUFError(f"tensor {self._order[self._next]!r} was declared but never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.tmp_path, self.path)
        self._done = True
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return self.path

    def abort(self) -> None:
        """Close and delete the temp file (safe to call more than once)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self._done:
            self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> GGUFWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            if not self._done:
                try:
                    self.finish()
                except BaseException:
                    self.abort()
                    raise
        else:
            self.abort()
