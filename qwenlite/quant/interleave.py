"""The interleaved ("x8") weight layout: eight output rows stored block by block, field by field.

Why: in the row-major GGUF layout one SIMD register holds 32 bytes of a single row, so every block
ends in a horizontal reduction and every sub-block scale has to be broadcast across lanes. Storing
the same bytes of eight rows next to each other turns lanes into rows: a 32-byte load holds the
same 4 bytes of rows 0..7, the activation is a 4-byte broadcast, ``vpdpbusd`` leaves one partial
sum per row in each lane, and the per-row scales are themselves lane vectors. Nothing is reduced
across lanes, and the 8 results of a block group are one vector store. llama.cpp's CPU backend
repacks Q4_0/Q4_K/IQ4_NL into similar x8 layouts at load time for the same reason.

Layout (same bits as the file, same size): a format lists its block's ``FIELDS`` as
``(byte offset, size)``. Block ``b`` of an 8-row group occupies bytes ``[8*TYPE_SIZE*b, ...)`` of
the group; within it the fields follow in the order of the list, field ``(off, size)`` starting at
``8*p`` where ``p`` is the sum of the sizes listed before it. A field whose size is a multiple of 4
is stored in 4-byte units, unit ``u`` of rows 0..7 at ``8*p + 32*u + 4*r``; any other field (an f16
scale) stores its ``size`` bytes per row consecutively, row ``r`` at ``8*p + size*r``. Formats list
their scales first: a kernel reads a block's scales before its quants, and a block read front to
back streams from memory at full speed where one that starts at its end and jumps back does not
(Q6_K, whose scales end the file's block, ran 3-4x slower out of cache with them last).

This module holds the format-independent parts: packing and unpacking (``pack``, ``unpack_rows``)
and the IR skeleton of every x8 dot kernel (``row_dot_x8``), which loops over blocks, keeps one
float64 accumulator vector per activation row and leaves the integer work of a block to the
format's emitter.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from qwenlite.errors import QwenliteError

ROWS = 8

_I8 = ir.IntType(8)
_I16 = ir.IntType(16)
_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_F64 = ir.DoubleType()
_V8I32 = ir.VectorType(_I32, 8)
_V8I16 = ir.VectorType(_I16, 8)
_V32I8 = ir.VectorType(_I8, 32)
_V8F32 = ir.VectorType(_F32, 8)
_V8F64 = ir.VectorType(_F64, 8)


def field_table(fields: tuple[tuple[int, int], ...], type_size: int) -> np.ndarray:
    """``FIELDS`` as an int64 ``[n, 3]`` array of (file offset, size, interleaved offset), checked to
    tile the block exactly once. Interleaved offsets follow the order of the list."""
    table = np.array(fields, np.int64).reshape(-1, 2)
    covered = sorted((int(o), int(o + s)) for o, s in table)
    pos = 0
    for start, end in covered:
        if start != pos or end <= start:
            raise ValueError(f"block fields {fields} do not tile a {type_size}-byte block")
        pos = end
    if pos != type_size:
        raise ValueError(f"block fields {fields} do not tile a {type_size}-byte block")
    packed = np.concatenate([[0], np.cumsum(table[:-1, 1])])
    return np.column_stack([table, packed])


@njit(cache=True, error_model="numpy", inline="always")
def _dest(b, poff, size, byte, r, type_size):
    """Offset in the 8-row group of byte ``byte`` of the field of ``size`` bytes at interleaved
    offset ``poff`` of block ``b``, for row ``r``."""
    base = 8 * (b * type_size + poff)
    if size % 4 == 0:
        return base + 32 * (byte // 4) + 4 * r + byte % 4
    return base + size * r + byte


def _copier(bits):
    """An intrinsic ``(dst, d, src, s)``: ``dst[d:d+n] = src[s:s+n]`` for ``n = bits/8`` bytes as one
    unaligned load and store (no bounds check)."""
    ity = ir.IntType(bits)

    @intrinsic
    def copy(typingctx, dst, d, src, s):  # noqa: ARG001 - signature fixed by numba
        if not (isinstance(dst, types.Array) and isinstance(src, types.Array)):
            return None

        def codegen(context, builder, sig, args):
            def ptr(aryty, ary, idxty, idx):
                data = context.make_array(aryty)(context, builder, ary).data
                p = builder.gep(data, [context.cast(builder, idx, idxty, types.intp)])
                return builder.bitcast(p, ity.as_pointer())

            value = builder.load(ptr(sig.args[2], args[2], sig.args[3], args[3]), align=1)
            builder.store(value, ptr(sig.args[0], args[0], sig.args[1], args[1]), align=1)
            return context.get_dummy_value()

        return types.none(dst, d, src, s), codegen

    return copy


_copy_word = _copier(32)
_copy_half = _copier(16)


@njit(cache=True, error_model="numpy", parallel=True, nogil=True)
def _pack(w, fields, type_size, out):
    nb = w.shape[1] // type_size
    for g in prange(out.shape[0]):
        dst = out[g]
        for r in range(ROWS):
            src = w[ROWS * g + r]
            for b in range(nb):
                ob = b * type_size
                for f in range(fields.shape[0]):
                    off = ob + fields[f, 0]
                    size = fields[f, 1]
                    base = 8 * (ob + fields[f, 2])
                    if size % 4 == 0:
                        for u in range(size // 4):
                            _copy_word(dst, base + 32 * u + 4 * r, src, off + 4 * u)
                    elif size == 2:
                        _copy_half(dst, base + 2 * r, src, off)
                    else:
                        for k in range(size):
                            dst[base + size * r + k] = src[off + k]


@njit(cache=True, error_model="numpy")
def _unpack(w8, ids, fields, type_size, out):
    nb = out.shape[1] // type_size
    for i in range(ids.shape[0]):
        g = ids[i] // ROWS
        r = ids[i] % ROWS
        for b in range(nb):
            for f in range(fields.shape[0]):
                off = fields[f, 0]
                size = fields[f, 1]
                for k in range(size):
                    out[i, b * type_size + off + k] = w8[g, _dest(b, fields[f, 2], size, k, r, type_size)]


def pack(w: np.ndarray, fields: np.ndarray, type_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Raw rows ``uint8 [N, row_bytes]`` (N a multiple of 8) -> groups ``uint8 [N/8, 8*row_bytes]``
    (written into ``out`` when given)."""
    n, row_bytes = w.shape
    if n % ROWS or row_bytes % type_size:
        raise QwenliteError(f"cannot interleave {n} rows of {row_bytes} bytes in groups of {ROWS}")
    if out is None:
        out = np.empty((n // ROWS, ROWS * row_bytes), np.uint8)
    elif out.shape != (n // ROWS, ROWS * row_bytes) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise QwenliteError(f"interleaved output must be C-contiguous uint8 {(n // ROWS, ROWS * row_bytes)}")
    _pack(np.ascontiguousarray(w), fields, type_size, out)
    return out


def unpack_rows(w8: np.ndarray, ids: np.ndarray, fields: np.ndarray, type_size: int) -> np.ndarray:
    """Rows ``ids`` of an interleaved weight, back in the file's layout: ``uint8 [len(ids), row_bytes]``."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= w8.shape[0] * ROWS):
        raise QwenliteError(f"row ids out of range 0..{w8.shape[0] * ROWS - 1}")
    out = np.empty((ids.size, w8.shape[1] // ROWS), np.uint8)
    _unpack(w8, ids, fields, type_size, out)
    return out


def splat(builder, value, vecty):
    """A ``vecty`` vector with ``value`` (a scalar IR value or a Python number) in every lane."""
    if not isinstance(value, ir.Value):
        return ir.Constant(vecty, [value] * vecty.count)
    vec = builder.insert_element(ir.Constant(vecty, None), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_I32, vecty.count), [0] * vecty.count))


class Block:
    """IR accessors for one block of an 8-row group, handed to a format's x8 emitter.

    Fields are named by their offset in the file's block (``where`` finds the field holding a
    file byte and its interleaved offset), so a format may split a field into several in any
    order. ``unit``/``words`` load unit ``u`` (file bytes ``off+4u..off+4u+3``) for rows 0..7 (as
    32 bytes or 8 x i32); ``halves`` the 2-byte field at ``off`` for rows 0..7 (8 x i16); ``act(t, k)``
    broadcasts activation bytes ``k..k+3`` of this block of activation row ``t``; ``bsum(t, j)``
    is the activation's ``j``-th block sum (the ``asum`` entries of this block).
    """

    def __init__(self, builder, w, ob, acts, sums, a0, s0, where):
        self.builder = builder
        self._w, self._ob, self._acts, self._sums, self._a0, self._s0 = w, ob, acts, sums, a0, s0
        self._where = where

    def _load(self, base, off, vecty):
        b = self.builder
        ptr = b.gep(base, [off])
        return b.load(b.bitcast(ptr, vecty.as_pointer()), align=1, typ=vecty)

    def _at(self, off, u):
        """Group offset of unit ``u`` of the field at file offset ``off`` (of byte ``off`` for ``u=0``)."""
        start, packed = self._where(off + 4 * u)
        return self.builder.add(self._ob, ir.Constant(self._ob.type, 8 * packed + 8 * (off + 4 * u - start)))

    def unit(self, off, u):
        return self._load(self._w, self._at(off, u), _V32I8)

    def words(self, off, u):
        return self._load(self._w, self._at(off, u), _V8I32)

    def halves(self, off):
        return self._load(self._w, self._at(off, 0), _V8I16)

    def act(self, t, k):
        b = self.builder
        word = self._load(self._acts[t], b.add(self._a0, ir.Constant(self._a0.type, k)), _I32)
        return b.bitcast(splat(b, word, _V8I32), _V32I8)

    def bsum(self, t, j):
        b = self.builder
        return self._load(self._sums[t], b.add(self._s0, ir.Constant(self._s0.type, j)), _I32)


def is_rows(tup, dtype):
    """Typing check shared by the dot intrinsics: ``tup`` is a tuple of arrays of ``dtype``."""
    return isinstance(tup, types.UniTuple) and isinstance(tup.dtype, types.Array) and tup.dtype.dtype == dtype


def act_rows_ok(aqs, ads, asums):
    """Typing check of every dot intrinsic's activation arguments: equally long tuples of int8
    quants, float32 scales and int32 block sums."""
    return (
        is_rows(aqs, types.int8) and is_rows(ads, types.float32) and is_rows(asums, types.int32)
        and aqs.count == ads.count == asums.count
    )


def row_dot_x8(fields, type_size, act_block, sum_block, emit):
    """Build the x8 dot intrinsic of a format:
    ``(w8, aqs, ads, asums, nb, outs, r) -> None`` writes, for each of the ``n`` activation rows
    ``t`` (tuples of equal length), the dots of the 8 rows of group ``w8`` (1-D, ``nb`` blocks) into
    ``outs[t][r:r+8]``. ``fields`` is the format's ``FIELDS``.

    ``emit(blk, n)`` gives, per activation row, the block's terms as a list of
    ``(scale, ints, negate)``: ``scale`` an 8 x f32 vector of per-row weight scales and ``ints``
    the 8 x i32 integer dots they multiply. The skeleton adds ``fpext(scale*d_a)*sitofp(ints)``
    (or subtracts, if ``negate``) into the row's float64 accumulator in list order: the same
    operations, in the same order, as the row-major K-quant kernels (``row_dot_k``), so both
    layouts give bit-identical results. Activation block ``i`` starts at ``i*act_block`` in ``aq``
    and ``i*sum_block`` in ``asum``; its scale is ``ad[i]``.
    """

    table = field_table(fields, type_size)

    def where(byte):
        """(file offset, interleaved offset) of the field holding file byte ``byte``."""
        for off, size, packed in table:
            if off <= byte < off + size:
                return int(off), int(packed)
        raise ValueError(f"byte {byte} is outside the block")

    @intrinsic
    def dot(typingctx, w, aqs, ads, asums, nb, outs, r):  # noqa: ARG001 - signature fixed by numba
        ok = (
            isinstance(w, types.Array) and w.dtype == types.uint8 and w.ndim == 1
            and act_rows_ok(aqs, ads, asums) and is_rows(outs, types.float32) and aqs.count == outs.count
            and isinstance(nb, types.Integer) and isinstance(r, types.Integer)
        )
        if not ok:
            return None
        n = aqs.count

        def codegen(context, builder, sig, args):
            intp = context.get_value_type(types.intp)

            def data(aryty, val):
                return context.make_array(aryty)(context, builder, val).data

            def tup(k):
                vals = cgutils.unpack_tuple(builder, args[k], n)
                return [data(sig.args[k].dtype, v) for v in vals]

            w = data(sig.args[0], args[0])
            acts, scales, sums, outp = tup(1), tup(2), tup(3), tup(5)
            nblocks = context.cast(builder, args[4], sig.args[4], types.intp)
            row = context.cast(builder, args[6], sig.args[6], types.intp)
            totals = [cgutils.alloca_once_value(builder, ir.Constant(_V8F64, [0.0] * ROWS)) for _ in range(n)]
            with cgutils.for_range(builder, nblocks) as loop:
                i = loop.index
                ob = builder.mul(i, ir.Constant(intp, ROWS * type_size))
                a0 = builder.mul(i, ir.Constant(intp, act_block))
                s0 = builder.mul(i, ir.Constant(intp, sum_block))
                blk = Block(builder, w, ob, acts, sums, a0, s0, where)
                for t, terms in enumerate(emit(blk, n)):
                    da = splat(builder, builder.load(builder.gep(scales[t], [i])), _V8F32)
                    acc = builder.load(totals[t])
                    for scale, ints, negate in terms:
                        wide = builder.fpext(builder.fmul(scale, da), _V8F64)
                        term = builder.fmul(wide, builder.sitofp(ints, _V8F64))
                        acc = builder.fsub(acc, term) if negate else builder.fadd(acc, term)
                    builder.store(acc, totals[t])
            for t in range(n):
                dst = builder.bitcast(builder.gep(outp[t], [row]), _V8F32.as_pointer())
                builder.store(builder.fptrunc(builder.load(totals[t]), _V8F32), dst, align=4)
            return context.get_dummy_value()

        return types.none(w, aqs, ads, asums, nb, outs, r), codegen

    return dot
