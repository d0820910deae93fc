"""KV-cache kernels of the CPU backend: store keys/values of a batch, and causal GQA attention over them.

One layer's cache is ``[n_seq, n_kv, n_ctx, head_dim]`` per tensor (K and V): every sequence slot
owns its own run of positions, so a token can only ever read keys of its own sequence, and the keys
of one head lie contiguous in position order for the attention scan. Three element types:

- ``f32``: float32, exact.
- ``f16``: IEEE half bit patterns (uint16), rounded to nearest even when stored, widened exactly
  with F16C's ``vcvtph2ps`` when read (an LLVM ``fpext half``).
- ``q8_0``: ggml's Q8_0 blocks along ``head_dim``: int8 values ``[..., head_dim]`` and one f16 scale
  per 32 values ``[..., head_dim/32]`` (34 bytes per 32 values, 0.266x of f32, as llama.cpp's
  ``-ctk q8_0``), quantized with ggml's reference rule (``d = amax/127``, ``q = roundf(x/d)``). Keys
  are stored without their bias (below).

Why keys lose their bias: Qwen2's k_proj bias is large (|b| up to 145-160 in the first layers of the
0.5B model, where the rest of a key is below 7), so a key's Q8_0 step is set by the bias and the part
that differs between positions keeps two or three bits. Measured on the real 0.5B model against
transformers: plain Q8_0 keys and values gave top-1 agreement 300/317, mean relative L2 0.046, max
0.31 (a Hadamard rotation of each head made it worse, 293/317: it spreads the bias over every
channel). The q8_0 cache therefore stores ``k - R(pos) b`` (R the RoPE rotation at the key's position)
and adds the bias's share of each score exactly: with NEOX pairs (i, i+h),
``q . R(p) b = sum_i cos[p,i] (q_i b_i + q_{i+h} b_{i+h}) + sin[p,i] (q_{i+h} b_i - q_i b_{i+h})``,
two half-length vectors per query and one more dot with the RoPE tables per key. That cuts the keys'
quantization error 20-40x in layers 0-2 (relative error 0.008 -> 0.0002 on layer 0).

Determinism: every (token, head) pair of the attention is one job whose arithmetic depends only on
that token's query and its own sequence's keys 0..pos; nothing is reduced across jobs or threads.
The serial and parallel drivers call the same job function. So a token's output is bit-identical
whether it runs alone, batched with other sequences, in any prefill chunk, on any thread count.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from qwenlite.kernels.ops import FASTMATH
from qwenlite.quant.halfprec import f32_to_f16_bits
from qwenlite.quant.q8_0 import roundf


@intrinsic
def _f16_to_f32(typingctx, bits):  # noqa: ARG001 - signature fixed by numba
    """An f16 bit pattern (uint16) widened to float32: bitcast to half, ``fpext`` (exact; vectorizes
    to vcvtph2ps where the CPU has F16C)."""
    if not isinstance(bits, types.Integer) or bits.bitwidth != 16:
        return None

    def codegen(context, builder, signature, args):  # noqa: ARG001
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(bits), codegen


_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F127 = np.float32(127.0)


# ---- store --------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def store_f32(cache, x, seq, pos):  # noqa: ANN001, ANN201
    """``x [T, n_kv*hd]`` into ``cache [n_seq, n_kv, n_ctx, hd]`` at (seq[t], pos[t])."""
    n_kv, hd = cache.shape[1], cache.shape[3]
    for t in range(x.shape[0]):
        for h in range(n_kv):
            for i in range(hd):
                cache[seq[t], h, pos[t], i] = x[t, h * hd + i]


@njit(cache=True, nogil=True)
def store_f16(cache, x, seq, pos):  # noqa: ANN001, ANN201
    """As ``store_f32``, rounded to f16 bit patterns (uint16 cache)."""
    n_kv, hd = cache.shape[1], cache.shape[3]
    for t in range(x.shape[0]):
        for h in range(n_kv):
            for i in range(hd):
                cache[seq[t], h, pos[t], i] = f32_to_f16_bits(x[t, h * hd + i])


@njit(cache=True, error_model="numpy", inline="always")
def _quantize_q8_0(src, qs, ds):
    """One head's values ``src [hd]`` as Q8_0 blocks: int8 ``qs [hd]``, f16-bit scales ``ds [hd/32]``."""
    for b in range(src.shape[0] // 32):
        amax = _F0
        for j in range(32 * b, 32 * b + 32):
            a = abs(src[j])
            amax = amax if amax > a else a
        d = amax / _F127
        inv = _F1 / d if d != _F0 else _F0
        for j in range(32 * b, 32 * b + 32):
            qs[j] = np.int8(roundf(src[j] * inv))
        ds[b] = f32_to_f16_bits(d)


@njit(cache=True, error_model="numpy", nogil=True)
def store_q8_0(qs, ds, x, seq, pos, bias, cos, sin):  # noqa: ANN001, ANN201
    """As ``store_f32``, as Q8_0 blocks of 32: int8 ``qs``, f16 ``ds``. ``bias [n_kv*hd]`` (the keys'
    bias; zeros for values) is subtracted as RoPE rotated it at each position."""
    n_kv, hd = qs.shape[1], qs.shape[3]
    half = hd // 2
    row = np.empty(hd, np.float32)
    for t in range(x.shape[0]):
        s, p = seq[t], pos[t]
        for h in range(n_kv):
            o = h * hd
            for i in range(half):
                c, sn = cos[p, i], sin[p, i]
                b0, b1 = bias[o + i], bias[o + half + i]
                row[i] = x[t, o + i] - (b0 * c - b1 * sn)
                row[half + i] = x[t, o + half + i] - (b0 * sn + b1 * c)
            _quantize_q8_0(row, qs[s, h, p], ds[s, h, p])


# ---- attention: one (token, head) job per type ------------------------------------------------


@njit(cache=True, fastmath=FASTMATH, inline="always", error_model="numpy")
def _softmax_inplace(scores, n):
    # error_model="numpy" here and in the jobs: weights holding NaN / inf can make ``total`` 0, and a
    # ZeroDivisionError raised inside a kernel is a traceback; inf / NaN instead reach the forward
    # pass's finiteness check, which names the layer.
    best = np.float32(-np.inf)
    for j in range(n):
        best = max(best, scores[j])
    total = _F0
    for j in range(n):
        e = np.exp(scores[j] - best)
        scores[j] = e
        total += e
    return _F1 / total


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _job_f32(q, kc, vc, seq, pos, n_heads, job, out):  # noqa: ANN001, ANN202
    hd = kc.shape[3]
    t, h = job // n_heads, job % n_heads
    s, kvh = seq[t], h // (n_heads // kc.shape[1])
    n = pos[t] + 1
    scale = np.float32(1.0 / math.sqrt(hd))
    qv = q[t, h * hd : (h + 1) * hd]
    scores = np.empty(n, np.float32)
    for j in range(n):
        acc = _F0
        for i in range(hd):
            acc += qv[i] * kc[s, kvh, j, i]
        scores[j] = acc * scale
    inv = _softmax_inplace(scores, n)
    o = out[t, h * hd : (h + 1) * hd]
    for j in range(n):
        w = scores[j] * inv
        for i in range(hd):
            o[i] += w * vc[s, kvh, j, i]


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _job_f16(q, kc, vc, seq, pos, n_heads, job, out):  # noqa: ANN001, ANN202
    hd = kc.shape[3]
    t, h = job // n_heads, job % n_heads
    s, kvh = seq[t], h // (n_heads // kc.shape[1])
    n = pos[t] + 1
    scale = np.float32(1.0 / math.sqrt(hd))
    qv = q[t, h * hd : (h + 1) * hd]
    scores = np.empty(n, np.float32)
    for j in range(n):
        acc = _F0
        for i in range(hd):
            acc += qv[i] * _f16_to_f32(kc[s, kvh, j, i])
        scores[j] = acc * scale
    inv = _softmax_inplace(scores, n)
    o = out[t, h * hd : (h + 1) * hd]
    for j in range(n):
        w = scores[j] * inv
        for i in range(hd):
            o[i] += w * _f16_to_f32(vc[s, kvh, j, i])


@njit(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")
def _job_q8_0(q, kq, kd, vq, vd, kbias, cos, sin, seq, pos, n_heads, job, out):  # noqa: ANN001, ANN202
    """Keys stored without their rotated bias: its share of each score is added exactly."""
    hd = kq.shape[3]
    half = hd // 2
    t, h = job // n_heads, job % n_heads
    s, kvh = seq[t], h // (n_heads // kq.shape[1])
    n = pos[t] + 1
    scale = np.float32(1.0 / math.sqrt(hd))
    qv = q[t, h * hd : (h + 1) * hd]
    b = kbias[kvh * hd : (kvh + 1) * hd]
    bc = np.empty(half, np.float32)
    bs = np.empty(half, np.float32)
    for i in range(half):
        bc[i] = qv[i] * b[i] + qv[half + i] * b[half + i]
        bs[i] = qv[half + i] * b[i] - qv[i] * b[half + i]
    scores = np.empty(n, np.float32)
    for j in range(n):
        acc = _F0
        for i in range(half):
            acc += bc[i] * cos[j, i] + bs[i] * sin[j, i]
        for blk in range(hd // 32):
            part = _F0
            for i in range(32 * blk, 32 * blk + 32):
                part += qv[i] * np.float32(kq[s, kvh, j, i])
            acc += part * _f16_to_f32(kd[s, kvh, j, blk])
        scores[j] = acc * scale
    inv = _softmax_inplace(scores, n)
    o = out[t, h * hd : (h + 1) * hd]
    for j in range(n):
        w = scores[j] * inv
        for blk in range(hd // 32):
            wd = w * _f16_to_f32(vd[s, kvh, j, blk])
            for i in range(32 * blk, 32 * blk + 32):
                o[i] += wd * np.float32(vq[s, kvh, j, i])


@njit(cache=True, parallel=True, nogil=True)
def attend_f32(q, kc, vc, seq, pos, n_heads, parallel, out):  # noqa: ANN001, ANN201
    """Attention of every (token, head) of ``q [T, n_heads*hd]``; ``parallel`` picks the driver only."""
    n_jobs = q.shape[0] * n_heads
    if parallel:
        for job in prange(n_jobs):
            _job_f32(q, kc, vc, seq, pos, n_heads, job, out)
    else:
        for job in range(n_jobs):
            _job_f32(q, kc, vc, seq, pos, n_heads, job, out)


@njit(cache=True, parallel=True, nogil=True)
def attend_f16(q, kc, vc, seq, pos, n_heads, parallel, out):  # noqa: ANN001, ANN201
    n_jobs = q.shape[0] * n_heads
    if parallel:
        for job in prange(n_jobs):
            _job_f16(q, kc, vc, seq, pos, n_heads, job, out)
    else:
        for job in range(n_jobs):
            _job_f16(q, kc, vc, seq, pos, n_heads, job, out)


@njit(cache=True, parallel=True, nogil=True)
def attend_q8_0(q, kq, kd, vq, vd, kbias, cos, sin, seq, pos, n_heads, parallel, out):  # noqa: ANN001, ANN201
    n_jobs = q.shape[0] * n_heads
    if parallel:
        for job in prange(n_jobs):
            _job_q8_0(q, kq, kd, vq, vd, kbias, cos, sin, seq, pos, n_heads, job, out)
    else:
        for job in range(n_jobs):
            _job_q8_0(q, kq, kd, vq, vd, kbias, cos, sin, seq, pos, n_heads, job, out)
