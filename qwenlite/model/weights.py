"""Weights as the backends see them: a matrix kept in its quantized form, built by the loader."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwenlite.gguf.constants import GGMLType


@dataclass(frozen=True)
class Linear:
    """y = x @ W^T (+ b) over a weight kept in its quantized form (``Backend.linear`` computes it).

    ``w`` is ``uint8 [..., n_out, row_bytes]`` in the file's layout, or, when ``interleaved``,
    ``uint8 [..., n_out/8, 8*row_bytes]`` in the x8 layout of ``quant.interleave`` (same bytes,
    SIMD-friendly order), which is what the loader builds for every format that has x8 kernels.
    """

    w: np.ndarray
    qtype: int
    n_in: int
    n_out: int
    bias: np.ndarray | None = None
    interleaved: bool = False

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> Linear:
        """A float32 matrix ``[n_out, n_in]`` held in memory (a gate vector is one row)."""
        rows = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, rows.shape[-1])
        return cls(rows.view(np.uint8), int(GGMLType.F32), rows.shape[1], rows.shape[0])
