"""Weights as the kernels see them: raw quantized rows straight from the mapped file, validated once."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwenlite import quant
from qwenlite.errors import GGUFError
from qwenlite.gguf.reader import GGUFFile, TensorInfo
from qwenlite.kernels.matmul import X8_TYPES, matmul, matmul_experts


def _check(f: GGUFFile, t: TensorInfo, shape: tuple[int, ...]) -> None:
    if t.shape != shape:
        raise GGUFError(f"{f.path}: tensor {t.name!r} has shape {t.shape}, expected {shape}")
    if t.qtype not in quant.FORMATS:
        raise GGUFError(f"{f.path}: tensor {t.name!r} has type {t.qtype.name}, which qwenlite cannot run")


def vector(f: GGUFFile, name: str, n: int) -> np.ndarray:
    """A 1-D float tensor (norm weight, bias) as float32.

    ggml ignores trailing 1s of ``ne``, and converters write e.g. the shared-expert gate as ne ``[n, 1]``
    (numpy ``(1, n)``), so leading 1s of the numpy shape are accepted.
    """
    t = f.tensor(name)
    ones = (1,) * (len(t.shape) - 1)
    _check(f, t, (*ones, n) if t.shape[:-1] == ones else (n,))
    return quant.dequantize(t.rows().reshape(1, -1), t.qtype, n)[0]


# Bytes read per step when interleaving a tensor at load time: bounds the extra peak memory.
_READ_CHUNK = 8 << 20


def _read_interleaved(f: GGUFFile, t: TensorInfo, out: np.ndarray | None = None) -> np.ndarray:
    """``t`` in the x8 layout (written into ``out``, 2-D, when given), built from ``GGUFFile.read_rows``
    copies of a few MiB at a time, so its file pages are never mapped into this process and the peak
    is the result plus one chunk."""
    rows = t.rows()
    row_bytes = rows.shape[-1]
    n = t.nbytes // row_bytes
    if out is None:
        out = np.empty((n // 8, 8 * row_bytes), np.uint8)
    step = max(8, _READ_CHUNK // row_bytes // 8 * 8)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        quant.interleave_rows(f.read_rows(t, r0, r1), t.qtype, out=out[r0 // 8 : r1 // 8])
    return out.reshape(*rows.shape[:-2], rows.shape[-2] // 8, 8 * row_bytes)


@dataclass(frozen=True)
class Linear:
    """y = x @ W^T (+ b) over a weight kept in its quantized form.

    ``w`` is ``uint8 [..., n_out, row_bytes]`` in the file's layout, or, when ``interleaved``,
    ``uint8 [..., n_out/8, 8*row_bytes]`` in the x8 layout of ``quant.interleave`` (same bytes,
    SIMD-friendly order), which is what ``load`` builds for every format that has x8 kernels.
    """

    w: np.ndarray
    qtype: int
    n_in: int
    n_out: int
    bias: np.ndarray | None = None
    interleaved: bool = False

    @classmethod
    def load(
        cls, f: GGUFFile, name: str, n_in: int, n_out: int, *lead: int, bias: bool = False, interleave: bool = True
    ) -> Linear:
        """The weight ``name.weight`` (and ``name.bias``), interleaved at load time when ``interleave``
        and the format and row count allow it (``_read_interleaved``)."""
        t = f.tensor(f"{name}.weight")
        _check(f, t, (*lead, n_out, n_in))
        b = vector(f, f"{name}.bias", n_out) if bias else None
        if interleave and t.qtype in X8_TYPES and n_out % 8 == 0:
            return cls(_read_interleaved(f, t), int(t.qtype), n_in, n_out, b, True)
        return cls(t.rows(), int(t.qtype), n_in, n_out, b)

    @classmethod
    def load_stacked(cls, f: GGUFFile, names: list[str], n_in: int, n_out: int) -> Linear | None:
        """The weights ``names`` (same input, ``n_out`` rows each, no bias) as one interleaved matrix
        whose outputs are theirs side by side, or None when they cannot share one (types differ or
        have no x8 kernel): one parallel call and one activation quantization instead of several."""
        ts = [f.tensor(f"{name}.weight") for name in names]
        for t in ts:
            _check(f, t, (n_out, n_in))
        qtype = ts[0].qtype
        if qtype not in X8_TYPES or n_out % 8 or any(t.qtype != qtype for t in ts):
            return None
        row_bytes = quant.row_nbytes(qtype, n_in)
        w = np.empty((len(ts) * n_out // 8, 8 * row_bytes), np.uint8)
        for i, t in enumerate(ts):
            _read_interleaved(f, t, out=w[i * n_out // 8 : (i + 1) * n_out // 8])
        return cls(w, int(qtype), n_in, len(ts) * n_out, None, True)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = matmul(self.w, self.qtype, x, interleaved=self.interleaved)
        if self.bias is not None:
            y += self.bias
        return y

    def experts(self, x: np.ndarray, starts: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """Rows ``starts[j]:starts[j+1]`` of ``x`` through expert ``experts[j]`` of a stacked weight."""
        return matmul_experts(self.w, self.qtype, x, starts, experts, interleaved=self.interleaved)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows ``ids`` of the weight: an embedding lookup."""
        raw = quant.deinterleave_rows(self.w, self.qtype, ids) if self.interleaved else self.w[ids]
        return quant.dequantize(raw, self.qtype, self.n_in)
