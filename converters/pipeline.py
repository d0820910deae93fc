"""The one write path shared by ``convert`` (HF -> GGUF) and ``requantize`` (GGUF -> GGUF).

Input tensors arrive as zero-copy views (safetensors or GGUF memory maps) in F32, F16 or BF16.
Each output tensor is produced in row chunks of a few MB: convert the chunk to float32, quantize it
with ``qwenlite.quant.quantize`` (the single definition of every format, F32/F16/BF16 included),
append it to the file. Peak memory therefore stays around one chunk plus the page cache, however large
the model, and both entry points pick types with the same ``qwenlite.converters.mixes`` rules.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qwenlite import quant
from qwenlite.converters.mixes import FileType, choose_types
from qwenlite.converters.progress import Progress
from qwenlite.converters.safetensors_io import to_float32
from qwenlite.errors import QwenliteError, QwenliteWarning
from qwenlite.gguf.constants import GGMLType
from qwenlite.gguf.writer import GGUFWriter
from qwenlite.kernels.ops import all_finite

CHUNK_BYTES = 8 << 20  # float32 bytes converted and quantized at a time


@dataclass(frozen=True)
class SourceTensor:
    """An output tensor and where its values come from.

    ``parts`` are the row blocks that make it up, in order (one for a plain weight, one per expert for
    a stacked expert tensor): ``(view, dtype)`` with ``view`` of shape ``(rows, n)`` or ``(n,)`` and
    dtype ``"F32"``, ``"F16"`` or ``"BF16"`` (raw uint16 bits). ``keep`` is the type used when the
    tensor is not quantizable (norms, biases, routers); ``release(view)`` is called with each raw
    chunk once it is quantized, so a memory-mapped source can drop those pages.
    """

    name: str
    shape: tuple[int, ...]
    parts: Sequence[tuple[np.ndarray, str]]
    keep: GGMLType = GGMLType.F32
    release: Callable[[np.ndarray], None] | None = None

    @property
    def n_cols(self) -> int:
        return int(self.shape[-1])

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64))


def _float_chunks(src: SourceTensor, allow_nonfinite: bool = False) -> Iterator[np.ndarray]:
    """float32 ``(rows, n)`` chunks of the tensor, in row order, checked for NaN / inf: a checkpoint
    whose weights hold them gives a model that can only produce garbage, so that is an error unless
    ``allow_nonfinite`` (then one warning per tensor). The check is ``all_finite``: 2.6 ms per 64 MiB
    chunk, against 16 ms to encode that chunk as q8_0 and 1.1 s as q4_k."""
    n = src.n_cols
    step = max(1, CHUNK_BYTES // (4 * n))
    row, warned = 0, False
    for view, dtype in src.parts:
        rows = view.reshape(-1, n)
        for r0 in range(0, rows.shape[0], step):
            raw = rows[r0 : r0 + step]
            x = np.ascontiguousarray(to_float32(raw, dtype), dtype=np.float32)
            if not all_finite(x):
                bad = int(np.count_nonzero(~np.isfinite(x)))
                first = row + int(np.argmax(~np.isfinite(x).all(axis=1)))
                where = f"tensor {src.name!r} holds {bad}+ NaN or infinite values (the first in row {first})"
                if not allow_nonfinite:
                    raise QwenliteError(f"{where}: the checkpoint is broken; --allow-nonfinite writes it anyway")
                if not warned:
                    warnings.warn(f"{where}; written as they are (--allow-nonfinite)", QwenliteWarning,
                                  stacklevel=2)
                    warned = True
            row += x.shape[0]
            yield x
            if src.release is not None:
                src.release(raw)


def _encoded_chunks(src: SourceTensor, qtype: GGMLType, progress: Progress,
                    allow_nonfinite: bool = False) -> Iterator[np.ndarray]:
    row_bytes = quant.row_nbytes(qtype, src.n_cols)
    for x in _float_chunks(src, allow_nonfinite):
        q = quant.quantize(x, qtype)
        if q.shape != (x.shape[0], row_bytes):  # a broken format module must not corrupt the file
            raise RuntimeError(f"quantize({qtype.name}) returned shape {q.shape}, expected {(x.shape[0], row_bytes)}")
        progress.advance(q.nbytes)
        yield q


def resolve_types(tensors: Sequence[SourceTensor], ftype: FileType, n_layer: int, n_expert: int) -> list[GGMLType]:
    """The stored type of every tensor: the mix's choice, or the tensor's own ``keep`` type."""
    chosen = choose_types([(t.name, t.shape) for t in tensors], ftype, n_layer, n_expert)
    return [src.keep if qt is None else qt for src, qt in zip(tensors, chosen)]


def write_model(
    out_path: str | os.PathLike[str],
    add_metadata: Callable[[GGUFWriter], None],
    tensors: Sequence[SourceTensor],
    ftype: FileType,
    n_layer: int,
    n_expert: int,
    progress: bool = True,
    *,
    parents: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Choose every tensor's type, write metadata + tensor infos, then stream the data.

    The file appears at ``out_path`` only when complete (see ``GGUFWriter``; ``parents`` creates its
    folder); weights holding NaN / inf are an error unless ``allow_nonfinite``.
    """
    for src in tensors:
        if sum(int(np.prod(v.shape[:-1], dtype=np.int64)) if v.ndim > 1 else 1 for v, _ in src.parts) != src.n_rows:
            raise ValueError(f"{src.name}: parts do not add up to shape {src.shape}")
    types = resolve_types(tensors, ftype, n_layer, n_expert)
    sizes = [src.n_rows * quant.row_nbytes(qt, src.n_cols) for src, qt in zip(tensors, types)]
    bar = Progress(sum(sizes), len(tensors), enabled=progress)
    with GGUFWriter(out_path, parents=parents) as writer:
        add_metadata(writer)
        for src, qt, size in zip(tensors, types, sizes):
            writer.add_tensor_info(src.name, src.shape, qt, size)
        writer.begin_data()
        for src, qt in zip(tensors, types):
            bar.begin_tensor(src.name, qt.name)
            writer.write_tensor(src.name, _encoded_chunks(src, qt, bar, allow_nonfinite))
            bar.end_tensor()
        path = writer.finish()
    bar.finish(str(path))
    return path
