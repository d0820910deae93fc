"""A validating, memory-mapped GGUF reader.

The file is mapped, never read whole: tensor data stays in the page cache and reaches the kernels as
zero-copy ``uint8`` views. Everything the header claims is checked against the file before it is
believed, because GGUF files come from strangers: every length and count is bounded by the bytes that
are actually left, so hostile metadata (a string of 2**60 bytes, an array of 2**60 items) fails with a
clear ``GGUFError`` instead of allocating unbounded memory, and every tensor must lie inside the file
with a byte size that matches its type and shape.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES
from numba import njit

from qwenlite.errors import GGUFError, shown
from qwenlite.gguf import names as gn
from qwenlite.gguf.constants import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_SUPPORTED_VERSIONS,
    NUMPY_DTYPE,
    SCALAR_STRUCT,
    GGMLType,
    GGUFValueType,
)

MAX_DIMS = 4
MAX_NAME_BYTES = 65535
# ggml's GGML_MAX_NAME: llama.cpp refuses longer tensor names, and so do we.
MAX_TENSOR_NAME_BYTES = 63
# Arrays of arrays: the format allows them, no model uses more than one level, and the depth would
# otherwise be bounded only by Python's recursion limit.
MAX_ARRAY_DEPTH = 4
_MISSING: Any = object()



@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. ``shape`` is numpy order: GGUF ne ``[n_in, n_out]`` is ``(n_out, n_in)``."""

    name: str
    shape: tuple[int, ...]
    qtype: GGMLType
    offset: int
    nbytes: int
    data: np.ndarray = field(repr=False, compare=False)

    @property
    def n_values(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def rows(self) -> np.ndarray:
        """The raw blocks as ``uint8 [..., row_bytes]``: one row per innermost row of values."""
        row_bytes = self.nbytes // max(1, self.n_values // self.shape[-1])
        return self.data.reshape(*self.shape[:-1], row_bytes)


@njit(cache=True)
def _scan_strings(data: np.ndarray, pos: int, spans: np.ndarray) -> int:
    """Fill ``spans[i] = (start, end)`` of each length-prefixed string from ``pos``; return the end
    position, or -1 if a length runs past the data (hostile lengths never allocate anything)."""
    n = data.size
    for i in range(spans.shape[0]):
        if pos + 8 > n:
            return -1
        length = np.uint64(0)
        for b in range(8):
            length |= np.uint64(data[pos + b]) << np.uint64(8 * b)
        pos += 8
        if length > np.uint64(n - pos):
            return -1
        spans[i, 0] = pos
        pos += np.int64(length)
        spans[i, 1] = pos
    return pos


class _Cursor:
    """Bounds-checked little-endian reads from the mapped header."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(
                f"{self.path}: truncated or corrupt GGUF: {what} needs {n} bytes at offset {self.pos}, "
                f"file has {len(self.buf)}"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar("<Q", f"length of {what}")
        if limit is not None and n > limit:
            raise GGUFError(f"{self.path}: {what} is {n} bytes long, more than the limit of {limit}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.path}: {what} is not valid UTF-8") from exc

    def strings(self, count: int, key: str) -> list[str]:
        """``count`` strings. Vocabularies hold 150k+ of them, so the length-prefixed layout is walked in
        compiled code and the strings are then cut from one bytes copy of the span."""
        spans = np.empty((count, 2), dtype=np.int64)
        stop = _scan_strings(np.frombuffer(self.buf, dtype=np.uint8), self.pos, spans)
        if stop < 0:
            raise GGUFError(f"{self.path}: truncated or corrupt GGUF: array {shown(key)} runs past the end of the file")
        raw = bytes(self.buf[self.pos : stop])
        spans -= self.pos
        self.pos = stop
        try:
            flat = spans.ravel().tolist()
            return [raw[a:b].decode("utf-8") for a, b in zip(flat[0::2], flat[1::2])]
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{self.path}: an item of {shown(key)} is not valid UTF-8") from exc

    def value(self, vtype: int, key: str) -> Any:
        try:
            vt = GGUFValueType(vtype)
        except ValueError:
            raise GGUFError(f"{self.path}: metadata key {shown(key)} has unknown value type {vtype}") from None
        if vt == GGUFValueType.STRING:
            return self.string(f"value of {shown(key)}")
        if vt == GGUFValueType.ARRAY:
            return self.array(key)
        value = self.scalar(SCALAR_STRUCT[vt], f"value of {shown(key)}")
        return bool(value) if vt == GGUFValueType.BOOL else value

    def array(self, key: str, depth: int = 1) -> Any:
        if depth > MAX_ARRAY_DEPTH:
            raise GGUFError(f"{self.path}: array {shown(key)} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        etype = self.scalar("<I", f"array type of {shown(key)}")
        count = self.scalar("<Q", f"array length of {shown(key)}")
        left = len(self.buf) - self.pos
        try:
            et = GGUFValueType(etype)
        except ValueError:
            raise GGUFError(f"{self.path}: array {shown(key)} has unknown element type {etype}") from None
        if et == GGUFValueType.STRING:
            if count > left // 8:  # every string costs at least its 8-byte length
                raise GGUFError(f"{self.path}: array {shown(key)} claims {count} strings, more than the file holds")
            return self.strings(count, key)
        if et == GGUFValueType.ARRAY:
            if count > left // 12:
                raise GGUFError(f"{self.path}: array {shown(key)} claims {count} arrays, more than the file holds")
            return [self.array(key, depth + 1) for _ in range(count)]
        dtype = np.dtype(NUMPY_DTYPE[et])
        self.need(count * dtype.itemsize, f"array {shown(key)} of {count} items")
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos += count * dtype.itemsize
        return arr.astype(bool) if et == GGUFValueType.BOOL else arr


def _tensor_nbytes(path: Path, name: str, shape_ne: list[int], qtype: GGMLType) -> int:
    if qtype.name not in {t.name for t in GGML_QUANT_SIZES}:
        raise GGUFError(f"{path}: tensor {name!r} has type {qtype.name} whose block size is unknown")
    block, type_size = next(v for k, v in GGML_QUANT_SIZES.items() if k.name == qtype.name)
    if shape_ne[0] % block:
        raise GGUFError(
            f"{path}: tensor {name!r} has rows of {shape_ne[0]} values, not a multiple of the "
            f"{qtype.name} block of {block}"
        )
    n = 1
    for d in shape_ne:
        n *= d
    return n // block * type_size


class GGUFFile:
    """A GGUF file mapped read-only. Use as a context manager or call ``close()``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such model file")
        size = self.path.stat().st_size
        if size < 24:
            raise GGUFError(f"{self.path}: truncated GGUF file ({size} bytes)")
        try:
            with open(self.path, "rb") as fh:
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot map the {size / 2**20:.0f} MiB file into memory "
                            f"({e.strerror or e}): an address-space limit (ulimit -v) is too low for it") from None
        try:
            self._parse(size)
        except BaseException:
            self.close()
            raise

    def _parse(self, size: int) -> None:
        buf = memoryview(self._mmap)
        cur = _Cursor(buf, self.path)
        magic = bytes(buf[:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        cur.pos = 4
        self.version = cur.scalar("<I", "version")
        if self.version not in GGUF_SUPPORTED_VERSIONS:
            raise GGUFError(f"{self.path}: unsupported GGUF version {self.version}")
        n_tensors = cur.scalar("<Q", "tensor count")
        n_kv = cur.scalar("<Q", "metadata count")
        if n_kv > size // 13 or n_tensors > size // 25:  # smallest possible entries
            raise GGUFError(f"{self.path}: header claims {n_kv} keys and {n_tensors} tensors: corrupt file")

        self.metadata: dict[str, Any] = {}
        # The stored type of each key (and of its array elements): a faithful copy of the metadata
        # into another file needs it, since a Python int could have been u32, i32 or u64.
        self.metadata_types: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key", MAX_NAME_BYTES)
            vtype = cur.scalar("<I", f"type of {shown(key)}")
            if key in self.metadata:
                raise GGUFError(f"{self.path}: duplicate metadata key {shown(key)}")
            array_start = cur.pos
            self.metadata[key] = cur.value(vtype, key)
            elem = struct.unpack_from("<I", buf, array_start)[0] if vtype == GGUFValueType.ARRAY else None
            self.metadata_types[key] = (GGUFValueType(vtype), None if elem is None else GGUFValueType(elem))

        alignment = self.metadata.get(gn.ALIGNMENT, GGUF_DEFAULT_ALIGNMENT)
        if (isinstance(alignment, bool) or not isinstance(alignment, int) or not 0 < alignment <= 1 << 20
                or alignment & (alignment - 1)):
            raise GGUFError(f"{self.path}: {gn.ALIGNMENT} {shown(alignment)} is not a power of two up to 2**20")

        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name", MAX_NAME_BYTES)
            if not name or len(name.encode()) > MAX_TENSOR_NAME_BYTES:
                raise GGUFError(f"{self.path}: tensor name {shown(name)} is empty or longer than "
                                f"{MAX_TENSOR_NAME_BYTES} bytes (ggml's limit)")
            n_dims = cur.scalar("<I", f"dimension count of {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
            ne = [cur.scalar("<Q", f"shape of {name!r}") for _ in range(n_dims)]
            if any(d <= 0 or d >= 2**40 for d in ne):
                raise GGUFError(f"{self.path}: tensor {name!r} has an invalid shape {ne}")
            type_id = cur.scalar("<I", f"type of {name!r}")
            try:
                qtype = GGMLType(type_id)
            except ValueError:
                raise GGUFError(f"{self.path}: tensor {name!r} has unknown ggml type {type_id}") from None
            offset = cur.scalar("<Q", f"offset of {name!r}")
            raw_infos.append((name, ne, qtype, offset))

        data_start = -(-cur.pos // alignment) * alignment
        self.data_offset = data_start
        self.alignment = alignment
        data = np.frombuffer(self._mmap, dtype=np.uint8)
        self.tensors: dict[str, TensorInfo] = {}
        spans = []
        for name, ne, qtype, rel in raw_infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: duplicate tensor {name!r}")
            if rel % alignment:
                raise GGUFError(f"{self.path}: tensor {name!r} offset {rel} is not aligned to {alignment}")
            nbytes = _tensor_nbytes(self.path, name, ne, qtype)
            start = data_start + rel
            if start + nbytes > size:
                raise GGUFError(
                    f"{self.path}: tensor {name!r} ends at byte {start + nbytes}, past the end of the "
                    f"file ({size} bytes): truncated or corrupt"
                )
            spans.append((start, start + nbytes, name))
            self.tensors[name] = TensorInfo(
                name=name,
                shape=tuple(reversed(ne)),
                qtype=qtype,
                offset=start,
                nbytes=nbytes,
                data=data[start : start + nbytes],
            )
        spans.sort()
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise GGUFError(f"{self.path}: tensors {name_a!r} and {name_b!r} overlap")
        self.file_size = size

    @property
    def architecture(self) -> str:
        arch = self.metadata.get(gn.ARCHITECTURE)
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: no {gn.ARCHITECTURE} in metadata")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    # Typed accessors: every hyperparameter is read through one of these, which check presence,
    # type, range and finiteness and name the key, so a hostile value is one clear GGUFError rather
    # than a TypeError, an OverflowError or a ZeroDivisionError somewhere later.

    def _lookup(self, key: str, default: Any) -> Any:
        if key in self.metadata:
            return self.metadata[key]
        if default is _MISSING:
            raise GGUFError(f"{self.path}: missing metadata key {key!r}")
        return default

    def _bad(self, key: str, want: str, value: Any) -> GGUFError:
        return GGUFError(f"{self.path}: metadata {key!r} must be {want}, got {shown(value, 40)}")

    def meta_int(self, key: str, default: Any = _MISSING, lo: int = 0, hi: int = 2**31 - 1) -> int:
        """An integer key (any integer type) within ``lo..hi``."""
        value = self._lookup(key, default)
        if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) or not lo <= value <= hi:
            raise self._bad(key, f"an integer in {lo}..{hi}", value)
        return int(value)

    def meta_float(self, key: str, default: Any = _MISSING, lo: float = 0.0, hi: float = 3.4e38,
                   lo_inclusive: bool = False) -> float:
        """A finite number (float or integer key) in ``(lo, hi]`` (``[lo, hi]`` with ``lo_inclusive``)."""
        value = self._lookup(key, default)
        ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool | np.bool_)
        if ok:
            x = float(value)
            ok = math.isfinite(x) and (lo <= x if lo_inclusive else lo < x) and x <= hi
        if not ok:
            raise self._bad(key, f"a finite number in {'[' if lo_inclusive else '('}{lo:g}, {hi:g}]", value)
        return float(value)

    def meta_bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self._lookup(key, default)
        if not isinstance(value, bool | np.bool_):
            raise self._bad(key, "true or false", value)
        return bool(value)

    def meta_str(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] | None = None) -> str:
        value = self._lookup(key, default)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self._bad(key, "one of " + ", ".join(choices) if choices else "a string", value)
        return value

    def meta_ints(self, key: str, default: Any = _MISSING, lo: int = 0, hi: int = 2**31 - 1) -> tuple[int, ...]:
        """An array of integers, each within ``lo..hi``."""
        value = self._lookup(key, default)
        if isinstance(value, tuple):
            value = np.asarray(value, np.int64)
        if (not isinstance(value, np.ndarray) or value.ndim != 1 or not np.issubdtype(value.dtype, np.integer)
                or (value.size and not (lo <= value.min() and value.max() <= hi))):
            raise self._bad(key, f"an array of integers in {lo}..{hi}", value)
        return tuple(int(v) for v in value)

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: missing tensor {name!r}")
        return self.tensors[name]

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def read_rows(self, t: TensorInfo, start: int, stop: int) -> np.ndarray:
        """A private copy of rows ``start:stop`` of ``t.rows()`` flattened to 2-D, read with ``preadv``.

        For a loader that transforms a tensor (e.g. into an interleaved layout), piece by piece:
        reading through the mapping would fault in every 4 KiB page (a third of a second for a 0.5B
        model in this VM) and leave the pages counted in this process's resident memory next to
        the transformed copy.
        """
        row_bytes = t.rows().shape[-1]
        n_rows = t.nbytes // row_bytes
        if not 0 <= start <= stop <= n_rows:
            raise GGUFError(f"{self.path}: rows {start}:{stop} outside tensor {t.name!r} ({n_rows} rows)")
        out = np.empty((stop - start, row_bytes), np.uint8)
        view, done, total = memoryview(out.reshape(-1)), 0, out.nbytes
        with open(self.path, "rb") as fh:
            while done < total:
                n = os.preadv(fh.fileno(), [view[done:]], t.offset + start * row_bytes + done)
                if n <= 0:
                    raise GGUFError(f"{self.path}: file shrank while reading tensor {t.name!r}")
                done += n
        return out

    def close(self) -> None:
        """Unmap the file. Views into it must not be used afterwards."""
        self.tensors = {}
        mm = getattr(self, "_mmap", None)
        if mm is not None:
            # Numpy views may still be alive: then the map closes when they are collected.
            with contextlib.suppress(BufferError):
                mm.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
