"""``x @ W^T`` with W kept in its quantized GGUF form: the one kernel every linear layer runs.

How it works (the llama.cpp CPU recipe, in Numba):

1. The activation rows are quantized once per call into the weight's activation format
   (``ACT`` of the weight's format module: Q8_0 rows for the legacy types, Q8_K rows for the
   K-quants, plain float32 for F32/F16/BF16), so the inner products run in int32.
2. One parallel (``prange``) loop over chunks of output rows. Inside a chunk, tokens are visited in
   tiles and every weight row is dotted with all tokens of the tile while it is hot in cache: during
   prefill each weight byte comes from memory once per tile instead of once per token. During
   decode (one token) the loop streams the weight once, which is the bandwidth floor.
3. The per-type work is the format module's ``dot_rows``; the if-chain that picks it tests a
   loop-invariant integer, one predictable branch per row. Nothing is dequantized into a copy.
4. Weights the loader interleaved (``interleaved=True``, the x8 layout of ``quant.interleave``) run
   the formats' ``dot_rows_x8`` kernels over groups of 8 rows instead; decode (one activation row)
   takes loops whose body is a single format's kernel, which LLVM schedules markedly better than
   the dispatching tile loop. ``matmul_experts`` does the same for a MoE layer's selected experts.

Thread count: whatever ``numba.set_num_threads`` the caller set (prange honours it per call).
"""

import numpy as np
from numba import njit, prange

from qwenlite import quant
from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType
from qwenlite.quant import bf16, f16, f32, q4_0, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0
from qwenlite.quant.activation import quantize_q8_0, quantize_q8_k

# Output rows per work item: small enough to balance two threads on the 128-row K/V projections,
# large enough (with the token tile) that a prefill tile of weight rows stays in L2.
_ROW_CHUNK = 16
# Tokens dotted against a weight row while it is in cache; the tile's activations (T*K int8)
# should stay in L2 as well.
_TOKEN_TILE = 32
# Below this many tokens, quantizing the activations serially beats opening a parallel region.
_PARALLEL_QUANT_MIN_ROWS = 8
# Below this many weight bytes x tokens (about 15 us of work on one core), the rows run on the
# calling thread: waking a second thread costs several microseconds on a quiet machine and up to a
# scheduler time slice when the cores are oversubscribed.
_PARALLEL_MIN_BYTES = 160_000
# Interleaved row groups (8 rows each) per work item: the same 16 rows as _ROW_CHUNK.
_GROUP_CHUNK = 2

_F16 = int(GGMLType.F16)
_BF16 = int(GGMLType.BF16)
_Q4_0 = int(GGMLType.Q4_0)
_Q5_0 = int(GGMLType.Q5_0)
_Q5_1 = int(GGMLType.Q5_1)
_Q4_K = int(GGMLType.Q4_K)
_Q5_K = int(GGMLType.Q5_K)
_Q6_K = int(GGMLType.Q6_K)


@njit(cache=True, error_model="numpy", inline="always")
def _rows_q8_0(qtype, w, aqs, ads, asums, nb):
    if qtype == _Q4_0:
        return q4_0.dot_rows(w, aqs, ads, asums, nb)
    if qtype == _Q5_0:
        return q5_0.dot_rows(w, aqs, ads, asums, nb)
    if qtype == _Q5_1:
        return q5_1.dot_rows(w, aqs, ads, asums, nb)
    return q8_0.dot_rows(w, aqs, ads, asums, nb)


@njit(cache=True, error_model="numpy", inline="always")
def _rows_q8_k(qtype, w, aqs, ads, asums, nb):
    if qtype == _Q6_K:
        return q6_k.dot_rows(w, aqs, ads, asums, nb)
    if qtype == _Q5_K:
        return q5_k.dot_rows(w, aqs, ads, asums, nb)
    return q4_k.dot_rows(w, aqs, ads, asums, nb)


@njit(cache=True, error_model="numpy", inline="always")
def _rows(act_k, qtype, w, aqs, ads, asums, nb):
    if act_k:
        return _rows_q8_k(qtype, w, aqs, ads, asums, nb)
    return _rows_q8_0(qtype, w, aqs, ads, asums, nb)


@njit(cache=True, error_model="numpy", inline="always")
def _chunk(act_k, qtype, w, aq, ad, asum, out, c):
    """Output rows of chunk ``c`` for all tokens: token tiles, and within a tile groups of four
    tokens that share each unpacked weight block (``dot_rows`` with 4-tuples)."""
    T, K = aq.shape
    nb = K // 256 if act_k else K // 32
    r0 = c * _ROW_CHUNK
    r1 = min(w.shape[0], r0 + _ROW_CHUNK)
    for t0 in range(0, T, _TOKEN_TILE):
        t1 = min(T, t0 + _TOKEN_TILE)
        for r in range(r0, r1):
            row = w[r]
            t = t0
            while t + 4 <= t1:
                s0, s1, s2, s3 = _rows(
                    act_k, qtype, row,
                    (aq[t], aq[t + 1], aq[t + 2], aq[t + 3]),
                    (ad[t], ad[t + 1], ad[t + 2], ad[t + 3]),
                    (asum[t], asum[t + 1], asum[t + 2], asum[t + 3]),
                    nb,
                )
                out[t, r] = s0
                out[t + 1, r] = s1
                out[t + 2, r] = s2
                out[t + 3, r] = s3
                t += 4
            while t < t1:
                out[t, r] = _rows(act_k, qtype, row, (aq[t],), (ad[t],), (asum[t],), nb)[0]
                t += 1


@njit(cache=True, error_model="numpy", inline="always")
def _quantize_acts(act_k, x):
    """The activation rows in the weight's integer format (Q8_K if ``act_k`` else Q8_0)."""
    T, K = x.shape
    bs = 256 if act_k else 32
    aq = np.empty((T, K), np.int8)
    ad = np.empty((T, K // bs), np.float32)
    asum = np.empty((T, K // 16 if act_k else K // 32), np.int32)
    if T < _PARALLEL_QUANT_MIN_ROWS:
        for t in range(T):
            if act_k:
                quantize_q8_k(x[t], aq[t], ad[t], asum[t])
            else:
                quantize_q8_0(x[t], aq[t], ad[t], asum[t])
    else:
        for t in prange(T):
            if act_k:
                quantize_q8_k(x[t], aq[t], ad[t], asum[t])
            else:
                quantize_q8_0(x[t], aq[t], ad[t], asum[t])
    return aq, ad, asum


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _matmul_int(w, qtype, act_k, x, out):
    """Quantize the activation rows, then all row chunks; serial when the whole product is too
    small to pay for waking the other threads."""
    aq, ad, asum = _quantize_acts(act_k, x)
    n_chunks = (w.shape[0] + _ROW_CHUNK - 1) // _ROW_CHUNK
    if w.shape[0] * w.shape[1] * x.shape[0] < _PARALLEL_MIN_BYTES:
        for c in range(n_chunks):
            _chunk(act_k, qtype, w, aq, ad, asum, out, c)
    else:
        for c in prange(n_chunks):
            _chunk(act_k, qtype, w, aq, ad, asum, out, c)


# Formats whose x8 kernels ``_rows_x8`` dispatches to (``Linear.load`` interleaves only these).
X8_TYPES = frozenset(
    {GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K}
)
_Q8_0 = int(GGMLType.Q8_0)
# Whether a type's activations are Q8_K rows (K-quants) rather than Q8_0 rows, per x8 type.
_ACT_K = {int(t): quant.get_format(int(t)).ACT == "q8_k" for t in X8_TYPES}


@njit(cache=True, error_model="numpy", inline="always")
def _rows_x8(qtype, w8, aqs, ads, asums, nb, outs, r):
    if qtype == _Q4_K:
        q4_k.dot_rows_x8(w8, aqs, ads, asums, nb, outs, r)
    elif qtype == _Q6_K:
        q6_k.dot_rows_x8(w8, aqs, ads, asums, nb, outs, r)
    elif qtype == _Q5_K:
        q5_k.dot_rows_x8(w8, aqs, ads, asums, nb, outs, r)
    elif qtype == _Q5_0:
        q5_0.dot_rows_x8(w8, aqs, ads, asums, nb, outs, r)
    elif qtype == _Q8_0:
        q8_0.dot_rows_x8(w8, aqs, ads, asums, nb, outs, r)
    elif qtype == _Q4_0:
        q4_0.dot_rows_x8(w8, aqs, ads, asums, nb, outs, r)
    elif qtype == _Q5_1:
        q5_1.dot_rows_x8(w8, aqs, ads, asums, nb, outs, r)


@njit(cache=True, error_model="numpy", inline="always")
def _chunk_x8(qtype, w8, aq, ad, asum, nb, out, c):
    """Row groups of chunk ``c`` for all tokens, in token tiles; four tokens share each unpacked block."""
    T = aq.shape[0]
    g0 = c * _GROUP_CHUNK
    g1 = min(w8.shape[0], g0 + _GROUP_CHUNK)
    for t0 in range(0, T, _TOKEN_TILE):
        t1 = min(T, t0 + _TOKEN_TILE)
        for g in range(g0, g1):
            t = t0
            while t + 4 <= t1:
                _rows_x8(
                    qtype, w8[g],
                    (aq[t], aq[t + 1], aq[t + 2], aq[t + 3]),
                    (ad[t], ad[t + 1], ad[t + 2], ad[t + 3]),
                    (asum[t], asum[t + 1], asum[t + 2], asum[t + 3]),
                    nb, (out[t], out[t + 1], out[t + 2], out[t + 3]), 8 * g,
                )
                t += 4
            while t < t1:
                _rows_x8(qtype, w8[g], (aq[t],), (ad[t],), (asum[t],), nb, (out[t],), 8 * g)
                t += 1


@njit(cache=True, error_model="numpy", inline="always")
def _groups_one_token(qtype, w8, a, d, s, nb, o, g0, g1):
    """Groups ``g0:g1`` against one activation row (``_groups`` with 1-tuples)."""
    _groups(qtype, w8, (a,), (d,), (s,), nb, (o,), g0, g1)


@njit(cache=True, error_model="numpy", inline="always")
def _groups(qtype, w8, a, d, s, nb, o, g0, g1):
    """Groups ``g0:g1`` against the activation rows of the tuples ``a, d, s`` (1 or 4 rows; outputs
    ``o``). The format test sits outside the group loop, so the loop body is a single format's
    kernel: LLVM schedules that about 20% faster than the per-group dispatch of ``_chunk_x8``
    (measured on Q4_K decode, 2 threads). With 4 rows (a decode step of four sequences) each weight
    block is read once for all four; every row's arithmetic is the same as alone."""
    if qtype == _Q4_K:
        for g in range(g0, g1):
            q4_k.dot_rows_x8(w8[g], a, d, s, nb, o, 8 * g)
    elif qtype == _Q6_K:
        for g in range(g0, g1):
            q6_k.dot_rows_x8(w8[g], a, d, s, nb, o, 8 * g)
    elif qtype == _Q5_K:
        for g in range(g0, g1):
            q5_k.dot_rows_x8(w8[g], a, d, s, nb, o, 8 * g)
    elif qtype == _Q5_0:
        for g in range(g0, g1):
            q5_0.dot_rows_x8(w8[g], a, d, s, nb, o, 8 * g)
    elif qtype == _Q8_0:
        for g in range(g0, g1):
            q8_0.dot_rows_x8(w8[g], a, d, s, nb, o, 8 * g)
    elif qtype == _Q4_0:
        for g in range(g0, g1):
            q4_0.dot_rows_x8(w8[g], a, d, s, nb, o, 8 * g)
    elif qtype == _Q5_1:
        for g in range(g0, g1):
            q5_1.dot_rows_x8(w8[g], a, d, s, nb, o, 8 * g)


# Up to this many activation rows (a batched decode step), _matmul_x8 runs the format-pure group loops
# per token quad instead of the dispatching tile loop: 4 sequences decode that way about 20% faster.
_FEW_TOKENS = 16


@njit(cache=True, error_model="numpy", inline="always")
def _few_tokens(qtype, w8, aq, ad, asum, nb, out, g0, g1):
    T = aq.shape[0]
    t = 0
    while t + 4 <= T:
        _groups(qtype, w8, (aq[t], aq[t + 1], aq[t + 2], aq[t + 3]), (ad[t], ad[t + 1], ad[t + 2], ad[t + 3]),
                (asum[t], asum[t + 1], asum[t + 2], asum[t + 3]), nb, (out[t], out[t + 1], out[t + 2], out[t + 3]),
                g0, g1)
        t += 4
    while t < T:
        _groups_one_token(qtype, w8, aq[t], ad[t], asum[t], nb, out[t], g0, g1)
        t += 1


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _matmul_x8(w8, qtype, act_k, x, out):
    """``_matmul_int`` for interleaved weights: the same activation rows, parallel over chunks of row
    groups; a single activation row (decode) takes the format-pure loops of ``_groups_one_token``."""
    aq, ad, asum = _quantize_acts(act_k, x)
    nb = x.shape[1] // (256 if act_k else 32)
    G = w8.shape[0]
    n_chunks = (G + _GROUP_CHUNK - 1) // _GROUP_CHUNK
    serial = G * w8.shape[1] * x.shape[0] < _PARALLEL_MIN_BYTES
    if x.shape[0] == 1:
        if serial:
            _groups_one_token(qtype, w8, aq[0], ad[0], asum[0], nb, out[0], 0, G)
        else:
            for c in prange(n_chunks):
                g0 = c * _GROUP_CHUNK
                _groups_one_token(qtype, w8, aq[0], ad[0], asum[0], nb, out[0], g0, min(G, g0 + _GROUP_CHUNK))
    elif x.shape[0] <= _FEW_TOKENS:
        if serial:
            _few_tokens(qtype, w8, aq, ad, asum, nb, out, 0, G)
        else:
            for c in prange(n_chunks):
                g0 = c * _GROUP_CHUNK
                _few_tokens(qtype, w8, aq, ad, asum, nb, out, g0, min(G, g0 + _GROUP_CHUNK))
    elif serial:
        _tiles(qtype, w8, aq, ad, asum, nb, out, 0, G)
    else:
        for c in prange(n_chunks):
            g0 = c * _GROUP_CHUNK
            _tiles(qtype, w8, aq, ad, asum, nb, out, g0, min(G, g0 + _GROUP_CHUNK))


@njit(cache=True, error_model="numpy", inline="always")
def _tiles(qtype, w8, aq, ad, asum, nb, out, g0, g1):
    """Prefill: groups ``g0:g1`` against all tokens, a tile of ``_TOKEN_TILE`` tokens at a time (the
    tile's activations stay in L2 while the groups' weights stay in L1), each tile in token quads through
    the format-pure loops of ``_few_tokens``. The per-group dispatch of ``_chunk_x8`` that this replaced
    prefilled the 1.5B Q4_K_M at 25 tok/s for 64 tokens on 2 threads, against 31 tok/s for 16 tokens
    through ``_few_tokens``. Tokens form the same quads as before, so every row's bits are unchanged."""
    T = aq.shape[0]
    for t0 in range(0, T, _TOKEN_TILE):
        t1 = min(T, t0 + _TOKEN_TILE)
        _few_tokens(qtype, w8, aq[t0:t1], ad[t0:t1], asum[t0:t1], nb, out[t0:t1], g0, g1)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _matmul_grouped(ws, qtype, act_k, interleaved, x, starts, experts, out):
    """Rows ``starts[j]:starts[j+1]`` of ``x`` times matrix ``experts[j]`` of the stack ``ws``, for every
    segment j, in one parallel region over (segment, row chunk) pairs: a MoE layer's selected experts
    cost one thread wake-up per projection instead of one per expert (ggml's ``mul_mat_id``)."""
    aq, ad, asum = _quantize_acts(act_k, x)
    nb = x.shape[1] // (256 if act_k else 32)
    per_chunk = _GROUP_CHUNK if interleaved else _ROW_CHUNK
    n_chunks = (ws.shape[1] + per_chunk - 1) // per_chunk
    n_items = experts.shape[0] * n_chunks
    if interleaved and starts.shape[0] - 1 == x.shape[0]:
        # Decode: one row per segment. A loop of its own whose body is only the format-pure group
        # loop: with the general paths inlined beside it, the same work ran at half the speed.
        for item in prange(n_items):
            j = item // n_chunks
            g0 = item % n_chunks * _GROUP_CHUNK
            t = starts[j]
            g1 = min(ws.shape[1], g0 + _GROUP_CHUNK)
            _groups_one_token(qtype, ws[experts[j]], aq[t], ad[t], asum[t], nb, out[t], g0, g1)
        return
    for item in prange(n_items):
        j = item // n_chunks
        c = item % n_chunks
        t0 = starts[j]
        t1 = starts[j + 1]
        if interleaved:
            _chunk_x8(qtype, ws[experts[j]], aq[t0:t1], ad[t0:t1], asum[t0:t1], nb, out[t0:t1], c)
        else:
            _chunk(act_k, qtype, ws[experts[j]], aq[t0:t1], ad[t0:t1], asum[t0:t1], out[t0:t1], c)


@njit(cache=True, error_model="numpy", inline="always")
def _dot_f32(qtype, w, x):
    if qtype == _F16:
        return f16.dot_row(w, x)
    if qtype == _BF16:
        return bf16.dot_row(w, x)
    return f32.dot_row(w, x)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _matmul_f32(w, qtype, x, out):
    T = x.shape[0]
    N = w.shape[0]
    for c in prange((N + _ROW_CHUNK - 1) // _ROW_CHUNK):
        r0 = c * _ROW_CHUNK
        r1 = min(N, r0 + _ROW_CHUNK)
        for t0 in range(0, T, _TOKEN_TILE):
            t1 = min(T, t0 + _TOKEN_TILE)
            for r in range(r0, r1):
                row = w[r]
                for t in range(t0, t1):
                    out[t, r] = _dot_f32(qtype, row, x[t])


def matmul(
    w: np.ndarray, qtype: int, x: np.ndarray, out: np.ndarray | None = None, interleaved: bool = False
) -> np.ndarray:
    """``x @ W^T`` for a quantized weight ``w`` (``uint8 [N, row_bytes]``) and ``x`` float32 ``[T, K]``.

    With ``interleaved`` the weight is in the x8 layout of ``quant.interleave_rows``
    (``uint8 [N/8, 8*row_bytes]``) and runs the format's x8 kernel; the result is the same.
    Returns float32 ``[T, N]`` (written into ``out`` when given: float32, C-contiguous, ``[T, N]``).
    A 1-D ``x`` of length K gives a 1-D result of length N. ``w`` may be a read-only memmap view.
    Bad shapes or types raise QwenliteError before any kernel runs.
    """
    fmt = quant.get_format(qtype)
    x = np.asarray(x)
    vector = x.ndim == 1
    if vector:
        x = x[None, :]
    if x.ndim != 2:
        raise QwenliteError(f"matmul needs activations [T, K], got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    T, K = x.shape
    row_bytes = quant.row_nbytes(qtype, K)
    w = np.asarray(w)
    rows = 8 if interleaved else 1
    if interleaved and qtype not in X8_TYPES:
        raise QwenliteError(f"{fmt.TYPE.name} has no interleaved kernel")
    if w.dtype != np.uint8 or w.ndim != 2 or w.shape[1] != rows * row_bytes:
        layout = f"uint8 [N/8, {8 * row_bytes}] (interleaved)" if interleaved else f"uint8 [N, {row_bytes}]"
        raise QwenliteError(f"{fmt.TYPE.name} weight for K={K} must be {layout}, got {w.dtype} {w.shape}")
    w = np.ascontiguousarray(w)
    N = w.shape[0] * rows
    if out is None:
        out = np.empty((T, N), np.float32)
    else:
        if vector and out.ndim == 1:
            out = out[None, :]
        if out.shape != (T, N) or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
            raise QwenliteError(
                f"matmul out must be writable C-contiguous float32 {(T, N)}, got {out.dtype} {out.shape}"
            )
    if T and N:
        if interleaved:
            _matmul_x8(w, int(fmt.TYPE), fmt.ACT == "q8_k", x, out)
        elif fmt.ACT == "f32":
            _matmul_f32(w, int(fmt.TYPE), x, out)
        else:
            _matmul_int(w, int(fmt.TYPE), fmt.ACT == "q8_k", x, out)
    return out[0] if vector else out


def matmul_x8_trusted(w8: np.ndarray, qtype: int, x: np.ndarray) -> np.ndarray:
    """``matmul(w8, qtype, x, interleaved=True)`` without its checks, for weights the loader built and
    checked and activations the model made (C-contiguous float32 ``[T, K]``). The checks cost 2.8 us of
    the 14.3 us a call to the 0.5B's K projection takes at T=1, and a 0.5B decode step makes 145 calls
    (0.4 ms of ~30 ms); user-facing callers keep ``matmul``."""
    out = np.empty((x.shape[0], w8.shape[0] * 8), np.float32)
    if x.shape[0]:
        _matmul_x8(w8, qtype, _ACT_K[qtype], x, out)
    return out


def matmul_experts(
    ws: np.ndarray, qtype: int, x: np.ndarray, starts: np.ndarray, experts: np.ndarray, interleaved: bool = False
) -> np.ndarray:
    """Segment-wise ``matmul`` against a stack of expert matrices: rows ``starts[j]:starts[j+1]`` of
    ``x`` (float32 ``[M, K]``) times expert ``experts[j]`` of ``ws`` (``uint8 [E, N, row_bytes]``, or
    ``[E, N/8, 8*row_bytes]`` when ``interleaved``). Returns float32 ``[M, N]``; each row equals what
    ``matmul`` gives for it alone.
    """
    fmt = quant.get_format(qtype)
    ws = np.asarray(ws)
    if ws.ndim != 3:
        raise QwenliteError(f"expert weights must be a 3-D stack, got shape {ws.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    experts = np.ascontiguousarray(experts, dtype=np.int64)
    if x.ndim != 2 or starts.ndim != 1 or experts.ndim != 1 or starts.shape[0] != experts.shape[0] + 1:
        raise QwenliteError("matmul_experts needs x [M, K], starts [S+1] and experts [S]")
    if starts[0] != 0 or starts[-1] != x.shape[0] or np.any(np.diff(starts) < 0):
        raise QwenliteError(f"segment starts must rise from 0 to {x.shape[0]}")
    if experts.size and (experts.min() < 0 or experts.max() >= ws.shape[0]):
        raise QwenliteError(f"expert ids must be in 0..{ws.shape[0] - 1}")
    if fmt.ACT == "f32":
        rows = 8 if interleaved else 1
        out = np.empty((x.shape[0], ws.shape[1] * rows), np.float32)
        for j, e in enumerate(experts):
            out[starts[j] : starts[j + 1]] = matmul(ws[e], qtype, x[starts[j] : starts[j + 1]], interleaved=interleaved)
        return out
    # Shape and layout checks of one expert are those of matmul; the stack shares them.
    probe = matmul(ws[0], qtype, np.zeros((0, x.shape[1]), np.float32), interleaved=interleaved)
    out = np.empty((x.shape[0], probe.shape[1]), np.float32)
    if x.shape[0] and experts.size:
        ws = np.ascontiguousarray(ws)
        _matmul_grouped(ws, int(fmt.TYPE), fmt.ACT == "q8_k", interleaved, x, starts, experts, out)
    return out
