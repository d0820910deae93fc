"""Quantization formats: one module per ggml type, plus the shared registry (see docs/architecture.md).

``FORMATS`` maps every ggml type qwenlite can read and write to its module. ``dequantize`` and
``quantize`` are the whole-tensor entry points (the loader and the converter call them): they
validate once in Python, then run one Numba loop parallel over rows. Type dispatch inside the
compiled loops is an if-chain on the integer type id, which costs one predictable branch per row.
"""

from types import ModuleType

import numpy as np
from numba import njit, prange

from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType
from qwenlite.quant import bf16, f16, f32, interleave, q4_0, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0

FORMATS: dict[GGMLType, ModuleType] = {
    m.TYPE: m for m in (f32, f16, bf16, q8_0, q4_0, q5_0, q5_1, q4_k, q5_k, q6_k)
}

_F32 = int(GGMLType.F32)
_F16 = int(GGMLType.F16)
_BF16 = int(GGMLType.BF16)
_Q8_0 = int(GGMLType.Q8_0)
_Q4_0 = int(GGMLType.Q4_0)
_Q5_0 = int(GGMLType.Q5_0)
_Q5_1 = int(GGMLType.Q5_1)
_Q4_K = int(GGMLType.Q4_K)
_Q5_K = int(GGMLType.Q5_K)
_Q6_K = int(GGMLType.Q6_K)


def get_format(qtype: int) -> ModuleType:
    """The format module of ``qtype``; QwenliteError naming the type if qwenlite has none."""
    fmt = FORMATS.get(qtype)  # type: ignore[call-overload]
    if fmt is None:
        try:
            name = GGMLType(qtype).name
        except ValueError:
            name = f"unknown type id {qtype}"
        supported = ", ".join(t.name for t in FORMATS)
        raise QwenliteError(f"tensor type {name} is not supported (supported: {supported})")
    return fmt


def row_nbytes(qtype: int, n_values: int) -> int:
    """Bytes of one row of ``n_values`` values of type ``qtype``.

    Raises QwenliteError for unsupported types and for lengths that are not whole blocks.
    """
    fmt = get_format(qtype)
    if n_values <= 0 or n_values % fmt.BLOCK_SIZE != 0:
        raise QwenliteError(
            f"a {fmt.TYPE.name} row needs a positive multiple of {fmt.BLOCK_SIZE} values, got {n_values}"
        )
    return n_values // fmt.BLOCK_SIZE * fmt.TYPE_SIZE


# Up to this many rows (embedding lookups of a forward pass, norm weights at load) are dequantized
# by the format's own row function called from Python: only the formats a model uses get compiled.
# The parallel loop below holds every format's code; compiling it was 15 s of the 57 s a first
# `qwenlite run` took from an empty Numba cache (0.5B Q4_K_M, 2 cores, 2026-12-02), for the 1-256
# rows a forward pass looks up. Whole tensors (the converter, the tests) still take the parallel loop.
_FEW_ROWS = 512


@njit(cache=True, error_model="numpy")
def _dequantize_one(qtype, src, dst):
    if qtype == _Q8_0:
        q8_0.dequantize_row(src, dst)
    elif qtype == _Q4_0:
        q4_0.dequantize_row(src, dst)
    elif qtype == _Q5_0:
        q5_0.dequantize_row(src, dst)
    elif qtype == _Q5_1:
        q5_1.dequantize_row(src, dst)
    elif qtype == _Q4_K:
        q4_k.dequantize_row(src, dst)
    elif qtype == _Q5_K:
        q5_k.dequantize_row(src, dst)
    elif qtype == _Q6_K:
        q6_k.dequantize_row(src, dst)
    elif qtype == _F32:
        f32.dequantize_row(src, dst)
    elif qtype == _F16:
        f16.dequantize_row(src, dst)
    elif qtype == _BF16:
        bf16.dequantize_row(src, dst)


@njit(cache=True, error_model="numpy")
def _quantize_one(qtype, src, dst):
    if qtype == _Q8_0:
        q8_0.quantize_row(src, dst)
    elif qtype == _Q4_0:
        q4_0.quantize_row(src, dst)
    elif qtype == _Q5_0:
        q5_0.quantize_row(src, dst)
    elif qtype == _Q5_1:
        q5_1.quantize_row(src, dst)
    elif qtype == _Q4_K:
        q4_k.quantize_row(src, dst)
    elif qtype == _Q5_K:
        q5_k.quantize_row(src, dst)
    elif qtype == _Q6_K:
        q6_k.quantize_row(src, dst)
    elif qtype == _F32:
        f32.quantize_row(src, dst)
    elif qtype == _F16:
        f16.quantize_row(src, dst)
    elif qtype == _BF16:
        bf16.quantize_row(src, dst)


@njit(cache=True, error_model="numpy", parallel=True)
def _dequantize_rows(qtype, raw, out):
    for r in prange(raw.shape[0]):
        _dequantize_one(qtype, raw[r], out[r])


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_rows(qtype, x, out):
    for r in prange(x.shape[0]):
        _quantize_one(qtype, x[r], out[r])


def dequantize(raw: np.ndarray, qtype: int, n_values_per_row: int) -> np.ndarray:
    """Raw rows ``uint8 [..., row_bytes]`` of type ``qtype`` -> float32 ``[..., n_values_per_row]``.

    Bit for bit what ``gguf.quants.dequantize`` returns; parallel over rows.
    """
    fmt = get_format(qtype)
    row_bytes = row_nbytes(qtype, n_values_per_row)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim < 1 or raw.shape[-1] != row_bytes:
        raise QwenliteError(
            f"{fmt.TYPE.name} rows of {n_values_per_row} values need uint8 [..., {row_bytes}] data, "
            f"got {raw.dtype} {raw.shape}"
        )
    lead = raw.shape[:-1]
    rows = np.ascontiguousarray(raw.reshape(-1, row_bytes))
    out = np.empty((rows.shape[0], n_values_per_row), np.float32)
    if rows.shape[0] > _FEW_ROWS:
        _dequantize_rows(int(fmt.TYPE), rows, out)
    else:
        for r in range(rows.shape[0]):
            fmt.dequantize_row(rows[r], out[r])
    return out.reshape(*lead, n_values_per_row)


def quantize(x: np.ndarray, qtype: int) -> np.ndarray:
    """float32 ``[..., n]`` -> raw rows ``uint8 [..., row_bytes]`` with ggml's reference quantizer.

    Byte-identical to ggml (``ggml_quantize_chunk`` without an importance matrix); parallel over rows.
    """
    fmt = get_format(qtype)
    x = np.asarray(x)
    if x.ndim < 1 or not np.issubdtype(x.dtype, np.floating):
        raise QwenliteError(f"quantize needs a float array with at least one dimension, got {x.dtype} {x.shape}")
    n = x.shape[-1]
    row_bytes = row_nbytes(qtype, n)
    lead = x.shape[:-1]
    rows = np.ascontiguousarray(x.reshape(-1, n), dtype=np.float32)
    out = np.empty((rows.shape[0], row_bytes), np.uint8)
    if rows.shape[0]:
        _quantize_rows(int(fmt.TYPE), rows, out)
    return out.reshape(*lead, row_bytes)


def has_x8(qtype: int) -> bool:
    """Whether ``qtype`` has an interleaved (x8) kernel; see ``quant.interleave``."""
    return hasattr(FORMATS.get(qtype), "dot_rows_x8")  # type: ignore[call-overload]


def interleave_rows(raw: np.ndarray, qtype: int, out: np.ndarray | None = None) -> np.ndarray:
    """Raw rows ``uint8 [..., N, row_bytes]`` (N a multiple of 8) -> the x8 layout
    ``uint8 [..., N/8, 8*row_bytes]`` of ``quant.interleave``; leading axes (experts) are kept.
    ``out`` (``uint8 [N_total/8, 8*row_bytes]``) receives the groups when given."""
    fmt = get_format(qtype)
    if not has_x8(qtype):
        raise QwenliteError(f"{fmt.TYPE.name} has no interleaved layout")
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim < 2 or raw.shape[-2] % interleave.ROWS or raw.shape[-1] % fmt.TYPE_SIZE:
        raise QwenliteError(f"cannot interleave {fmt.TYPE.name} rows of shape {raw.shape} {raw.dtype}")
    lead, (n, row_bytes) = raw.shape[:-2], raw.shape[-2:]
    fields = interleave.field_table(fmt.FIELDS, fmt.TYPE_SIZE)
    packed = interleave.pack(raw.reshape(-1, row_bytes), fields, fmt.TYPE_SIZE, out)
    return packed.reshape(*lead, n // interleave.ROWS, interleave.ROWS * row_bytes)


def deinterleave_rows(w8: np.ndarray, qtype: int, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of a 2-D x8 weight in the file's layout: ``uint8 [len(ids), row_bytes]`` (embedding lookups)."""
    fmt = get_format(qtype)
    return interleave.unpack_rows(w8, ids, interleave.field_table(fmt.FIELDS, fmt.TYPE_SIZE), fmt.TYPE_SIZE)
