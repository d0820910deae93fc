"""A validating, memory-mapped safetensors reader (single file or sharded checkpoint).

safetensors layout: u64 little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data
section; offsets are relative to the data section. Checkpoints come from strangers, so everything the
header claims is checked against the file before anything is allocated or believed: the header length
is bounded by the file size (and a hard cap, so a hostile 2**63 never turns into an allocation), every
tensor lies inside the data section, its byte count equals shape x dtype size, and no two tensors
overlap. Tensors come out as zero-copy read-only numpy views into the mapping: converting a model
never needs it whole in memory. Only the float dtypes a Qwen2 checkpoint uses are readable
(F32, F16, BF16); other dtypes are parsed and validated but give a clear error when asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwenlite.converters.files import open_regular, read_json
from qwenlite.converters.mapped import MappedFile
from qwenlite.errors import QwenliteError, shown

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

# dtype name -> bytes per element, for every dtype the format defines (for validating byte counts)
_DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# dtypes we can turn into float32; BF16 is read as its raw uint16 bit pattern
_READABLE: dict[str, str] = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


class SafetensorsError(QwenliteError):
    """A safetensors file or index that is malformed, truncated or hostile."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its dtype name, numpy shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: bf16 is the top half of an f32, so this is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """A view from ``SafetensorsFile.raw`` as float32 (a copy unless it already is float32)."""
    if dtype == "BF16":
        return bf16_to_float32(array)
    if dtype in ("F32", "F16"):
        return array.astype(np.float32, copy=False)
    raise SafetensorsError(f"tensor dtype {dtype} is not supported (only F32, F16, BF16)")


def _parse_entry(path: Path, name: Any, meta: Any, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path.name}: tensor {name!r}"
    if not isinstance(name, str) or not name:
        raise SafetensorsError(f"{path.name}: bad tensor name {name!r}")
    if not isinstance(meta, dict):
        raise SafetensorsError(f"{where}: header entry is not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_SIZES:
        raise SafetensorsError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 8:
        raise SafetensorsError(f"{where}: bad shape {shape!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape):
        raise SafetensorsError(f"{where}: bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise SafetensorsError(f"{where}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] lie outside the {data_size}-byte data section")
    count = 1
    for d in shape:
        count *= d
    if count * _DTYPE_SIZES[dtype] != end - begin:
        raise SafetensorsError(
            f"{where}: {end - begin} bytes stored but shape {shape} x {dtype} needs {count * _DTYPE_SIZES[dtype]}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` file. ``raw(name)`` is a zero-copy numpy view."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            with open_regular(self.path) as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise SafetensorsError(f"{self.path.name}: too small to be a safetensors file ({size} B)")
                header_len = int.from_bytes(f.read(8), "little")
                if header_len < 2 or header_len > min(size - 8, MAX_HEADER_BYTES):
                    raise SafetensorsError(
                        f"{self.path.name}: header length {header_len} is impossible for a {size}-byte file"
                    )
                header_raw = f.read(header_len)
            self._map: MappedFile | None = MappedFile(self.path)
        except OSError as e:
            raise SafetensorsError(f"cannot read {self.path}: {e.strerror or e}") from e
        try:
            header = json.loads(header_raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            self.close()
            raise SafetensorsError(f"{self.path.name}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            self.close()
            raise SafetensorsError(f"{self.path.name}: header is not a JSON object")
        try:
            self.metadata, self.tensors = self._validate(header, 8 + header_len, size - 8 - header_len)
        except SafetensorsError:
            self.close()
            raise

    def _validate(
        self, header: dict[str, Any], data_start: int, data_size: int
    ) -> tuple[dict[str, str], dict[str, TensorEntry]]:
        metadata = header.pop("__metadata__", {}) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise SafetensorsError(f"{self.path.name}: __metadata__ must map strings to strings")
        tensors = {name: _parse_entry(self.path, name, meta, data_start, data_size) for name, meta in header.items()}
        spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise SafetensorsError(f"{self.path.name}: tensors {name_a!r} and {name_b!r} overlap")
        return metadata, tensors

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of a tensor in its stored dtype (BF16 as uint16 bits)."""
        entry = self.tensors.get(name)
        if entry is None:
            raise SafetensorsError(f"{self.path.name}: no tensor {name!r}")
        np_dtype = _READABLE.get(entry.dtype)
        if np_dtype is None:
            raise SafetensorsError(
                f"{self.path.name}: tensor {name!r} has dtype {entry.dtype}; only F32, F16 and BF16 can be converted"
            )
        count = entry.nbytes // _DTYPE_SIZES[entry.dtype]
        if self._map is None:
            raise SafetensorsError(f"{self.path.name} is closed")
        return self._map.view(np_dtype, count, entry.start).reshape(entry.shape)

    def release(self, view: np.ndarray) -> bool:
        """Drop the pages under a consumed view from ``raw`` (see ``qwenlite.converters.mapped``)."""
        return self._map is not None and self._map.release(view)

    def close(self) -> None:
        mapped = getattr(self, "_map", None)
        if mapped is not None:
            self._map = None
            mapped.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Checkpoint:
    """All safetensors of an HF model directory: ``model.safetensors`` or a sharded set listed in
    ``model.safetensors.index.json``. Tensor names are unique across shards.

    ``names()`` lists tensors in llama.cpp's converter order (shard files sorted by name, tensor names
    sorted within each shard): the GGUF tensor order, and through it llama-quantize's per-layer
    counters, follow from it."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(model_dir)
        self._files: list[SafetensorsFile] = []
        self._where: dict[str, SafetensorsFile] = {}
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        index = self.dir / INDEX_NAME
        if index.exists() or index.is_symlink():
            shards = self._read_index(index)
        elif (self.dir / SINGLE_NAME).exists():
            shards = {SINGLE_NAME: None}
        else:
            found = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if len(found) != 1:
                raise SafetensorsError(
                    f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME}"
                    + (f" (found {len(found)} .safetensors files)" if found else "")
                )
            shards = {found[0]: None}
        for shard, expected in sorted(shards.items()):
            f = SafetensorsFile(self.dir / shard)
            self._files.append(f)
            for name in sorted(f.tensors):
                if name in self._where:
                    raise SafetensorsError(f"tensor {name!r} appears in both {self._where[name].path.name} and {shard}")
                self._where[name] = f
            if expected is not None:
                missing = sorted(expected - f.tensors.keys())
                if missing:
                    raise SafetensorsError(f"{shard}: index lists {missing[0]!r} but the shard lacks it")
                extra = sorted(f.tensors.keys() - expected)
                if extra:
                    raise SafetensorsError(f"{shard}: holds {extra[0]!r} which the index maps elsewhere or omits")

    def _read_index(self, index: Path) -> dict[str, set[str]]:
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SafetensorsError(f"{index.name}: no weight_map")
        shards: dict[str, set[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise SafetensorsError(f"{index.name}: bad shard file name {shown(shard)} for {shown(name)}")
            if not (self.dir / shard).exists():
                raise SafetensorsError(f"{index.name}: shard {shard} is missing")
            shards.setdefault(shard, set()).add(name)
        return shards

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def entry(self, name: str) -> TensorEntry:
        f = self._where.get(name)
        if f is None:
            raise SafetensorsError(f"{self.dir.name}: checkpoint has no tensor {name!r}")
        return f.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy view in the stored dtype (see ``to_float32``)."""
        f = self._where.get(name)
        if f is None:
            raise SafetensorsError(f"{self.dir.name}: checkpoint has no tensor {name!r}")
        return f.raw(name)

    def release(self, view: np.ndarray) -> None:
        """See ``SafetensorsFile.release``."""
        for f in self._files:
            if f.release(view):
                return

    def float32(self, name: str) -> np.ndarray:
        """The whole tensor as float32 (zero-copy for F32 files)."""
        return to_float32(self.raw(name), self.entry(name).dtype)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
