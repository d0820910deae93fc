"""The loader: a file's tensors, checked and built into weights (``Linear``, float vectors) under a load policy.

Architectures name the tensors they need (``model.qwen2.load_weights``); model classes receive built
weights and never read the file themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwenlite import quant
from qwenlite.errors import GGUFError
from qwenlite.gguf.reader import GGUFFile, TensorInfo
from qwenlite.kernels.matmul import X8_TYPES
from qwenlite.model.weights import Linear


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
class LoadPolicy:
    """How a file's tensors become weights.

    ``interleave``: repack matrices of formats with x8 kernels (read once, in pieces, never mapped);
    ``interleave_experts``: the same for a MoE model's routed experts (False keeps them in the mapped
    file, for a file larger than memory); ``stack``: matrices that share an input (gate and up) become
    one matrix when their types allow, one parallel call instead of two.
    """

    interleave: bool = True
    interleave_experts: bool = True
    stack: bool = True


class Loader:
    """Builds weights from the tensors of one GGUF file under one ``LoadPolicy``; every shape and type
    is checked against what the architecture expects before any byte is used."""

    def __init__(self, f: GGUFFile, policy: LoadPolicy | None = None) -> None:
        self.file = f
        self.policy = policy or LoadPolicy()

    def has(self, name: str) -> bool:
        return name in self.file.tensors

    def vector(self, name: str, n: int) -> np.ndarray:
        return vector(self.file, name, n)

    def linear(self, name: str, n_in: int, n_out: int, *lead: int, bias: bool = False,
               interleave: bool = True, experts: bool = False) -> Linear:
        """The weight ``name.weight`` (and ``name.bias``), interleaved when the policy, the caller, the
        format and the row count allow it."""
        f = self.file
        t = f.tensor(f"{name}.weight")
        _check(f, t, (*lead, n_out, n_in))
        b = vector(f, f"{name}.bias", n_out) if bias else None
        allowed = self.policy.interleave_experts if experts else self.policy.interleave
        if interleave and allowed and t.qtype in X8_TYPES and n_out % 8 == 0:
            try:
                return Linear(_read_interleaved(f, t), int(t.qtype), n_in, n_out, b, True)
            except MemoryError:
                raise GGUFError(f"{f.path}: not enough memory for tensor {t.name!r} ({t.nbytes / 2**20:.0f} MiB) "
                                "while loading the model") from None
        return Linear(t.rows(), int(t.qtype), n_in, n_out, b)

    def stacked(self, names: list[str], n_in: int, n_out: int) -> Linear | None:
        """The weights ``names`` (same input, ``n_out`` rows each, no bias) as one interleaved matrix
        whose outputs are theirs side by side, or None when they cannot share one (policy off, types
        differ or have no x8 kernel)."""
        f = self.file
        ts = [f.tensor(f"{name}.weight") for name in names]
        for t in ts:
            _check(f, t, (n_out, n_in))
        qtype = ts[0].qtype
        if not (self.policy.stack and self.policy.interleave):
            return None
        if qtype not in X8_TYPES or n_out % 8 or any(t.qtype != qtype for t in ts):
            return None
        row_bytes = quant.row_nbytes(qtype, n_in)
        w = np.empty((len(ts) * n_out // 8, 8 * row_bytes), np.uint8)
        for i, t in enumerate(ts):
            _read_interleaved(f, t, out=w[i * n_out // 8 : (i + 1) * n_out // 8])
        return Linear(w, int(qtype), n_in, len(ts) * n_out, None, True)
