"""F32 (ggml type 0): plain little-endian float32 values, one per 4 bytes.

Used for norms and biases, and by the converter for tensors kept unquantized. Its dot kernel takes
the float activation row directly (``ACT = "f32"``): there is nothing to gain from quantizing it.
"""

import numpy as np
from numba import njit

from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType

TYPE = GGMLType.F32
BLOCK_SIZE = 1
TYPE_SIZE = 4
ACT = "f32"

_F0 = np.float32(0.0)


@njit(cache=True, error_model="numpy")
def check_bytes(n, nbytes, type_size):
    """Raise QwenliteError unless ``nbytes`` holds ``n`` values of ``type_size`` bytes."""
    if nbytes < n * type_size:
        raise QwenliteError("float buffer is shorter than the row it should hold")


@njit(cache=True, error_model="numpy")
def dequantize_row(src, dst):
    """Bytes -> float32 (a copy; the bytes may not be 4-aligned, so no reinterpreting view)."""
    n = dst.shape[0]
    check_bytes(n, src.shape[0], TYPE_SIZE)
    dst[:] = src[: 4 * n].view(np.float32)


@njit(cache=True, error_model="numpy")
def quantize_row(src, dst):
    """float32 -> bytes, bit for bit."""
    n = src.shape[0]
    check_bytes(n, dst.shape[0], TYPE_SIZE)
    dst[: 4 * n] = src.view(np.uint8)


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "contract", "nsz"})
def dot_row(w, x):
    """One F32 weight row . one float32 activation row (reassociated so it vectorizes)."""
    n = x.shape[0]
    check_bytes(n, w.shape[0], TYPE_SIZE)
    wf = w[: 4 * n].view(np.float32)
    total = _F0
    for j in range(n):
        total += wf[j] * x[j]
    return total
