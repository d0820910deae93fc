"""Structure-aware mutations of GGUF files: header, metadata values and types, tokenizer arrays,
tensor table, tensor data, and raw bytes.

A seed file is parsed once into a ``RawGGUF`` (keys with their stored types, tensor infos, the data
section as bytes); a mutation edits that structure and ``RawGGUF.encode`` writes it back with no
checks at all, so values no writer would produce (nested arrays 2,000 deep, counts that lie, offsets
past the end, invalid UTF-8) reach the reader exactly as an attacker would write them.
"""

from __future__ import annotations

import copy
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qwenlite.gguf.constants import GGUF_MAGIC, SCALAR_STRUCT, GGUFValueType

VT = GGUFValueType
INT_TYPES = (VT.UINT8, VT.INT8, VT.UINT16, VT.INT16, VT.UINT32, VT.INT32, VT.UINT64, VT.INT64)
FLOAT_TYPES = (VT.FLOAT32, VT.FLOAT64)
NUMERIC = (*INT_TYPES, *FLOAT_TYPES, VT.BOOL)
INT_RANGE = {
    VT.UINT8: (0, 2**8 - 1), VT.INT8: (-(2**7), 2**7 - 1), VT.UINT16: (0, 2**16 - 1),
    VT.INT16: (-(2**15), 2**15 - 1), VT.UINT32: (0, 2**32 - 1), VT.INT32: (-(2**31), 2**31 - 1),
    VT.UINT64: (0, 2**64 - 1), VT.INT64: (-(2**63), 2**63 - 1),
}
FLOATS = (float("nan"), float("inf"), float("-inf"), 0.0, -0.0, -1.0, 1e-30, 1e30, 3.4e38, 0.5, 1e6)
STRINGS = ("", "x", "none", "yarn", "linear", "qwen2", "qwen2moe", "llama", "gpt2", "A" * 65535,
           "{{ messages", "{% for m in messages %}{{ m.content }}{% endfor %}", "\u0000", "é" * 40)
# Where a block's f16 scale sits (bytes from the block start) and the block size, for NaN injection.
SCALE_AT = {2: (0, 18), 3: (0, 20), 6: (0, 22), 7: (0, 24), 8: (0, 34), 12: (0, 144), 13: (0, 176), 14: (208, 210)}


@dataclass
class Array:
    """An array value: element type and items (nested ``Array`` items when ``etype`` is ARRAY)."""

    etype: int
    items: Any


@dataclass
class Raw:
    """A value given as its encoded payload bytes (after the type field)."""

    payload: bytes


@dataclass
class RawGGUF:
    version: int
    kv: list[list[Any]]  # [key bytes, vtype int, value]
    tensors: list[list[Any]]  # [name bytes, ne list, type int, offset int]
    data: bytes
    alignment: int = 32
    n_kv: int | None = None  # counts as written; None: the true counts
    n_tensors: int | None = None
    magic: bytes = GGUF_MAGIC
    tail: list[tuple[str, Any]] = field(default_factory=list)  # byte-level edits applied after encoding

    @classmethod
    def parse(cls, path: Path) -> RawGGUF:
        from qwenlite.gguf.reader import GGUFFile

        with GGUFFile(path) as f:
            kv = []
            for key, value in f.metadata.items():
                vtype, elem = f.metadata_types[key]
                if vtype == VT.ARRAY:
                    value = Array(int(elem), list(value) if elem == VT.STRING else np.asarray(value).copy())
                kv.append([key.encode(), int(vtype), value])
            tensors = [[t.name.encode(), list(reversed(t.shape)), int(t.qtype), t.offset - f.data_offset] for t in f]
            data = bytes(np.frombuffer(f._mmap, np.uint8)[f.data_offset :])
            return cls(f.version, kv, tensors, data, f.alignment)

    def encode(self) -> bytes:
        out = [self.magic, struct.pack("<I", self.version),
               struct.pack("<QQ", len(self.tensors) if self.n_tensors is None else self.n_tensors,
                           len(self.kv) if self.n_kv is None else self.n_kv)]
        for key, vtype, value in self.kv:
            out += [_string(key), struct.pack("<I", vtype), _value(vtype, value)]
        for name, ne, qtype, offset in self.tensors:
            out += [_string(name), struct.pack("<I", len(ne))]
            out += [struct.pack("<Q", d % 2**64) for d in ne]
            out += [struct.pack("<IQ", qtype % 2**32, offset % 2**64)]
        header = b"".join(out)
        header += bytes(-len(header) % self.alignment)
        blob = bytearray(header + self.data)
        for op, arg in self.tail:
            if op == "flip":
                for pos, byte in arg:
                    if pos < len(blob):
                        blob[pos] = byte
            elif op == "truncate":
                del blob[arg:]
            elif op == "insert":
                pos, extra = arg
                blob[pos:pos] = extra
        return bytes(blob)

    def header_size(self) -> int:
        return len(self.encode()) - len(self.data) if not self.tail else len(self.data)

    def find(self, key: str) -> list[Any] | None:
        return next((e for e in self.kv if e[0] == key.encode()), None)


def _string(s: bytes | str) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.payload
    if vtype == VT.STRING:
        return _string(value)
    if vtype == VT.ARRAY:
        arr: Array = value
        head = struct.pack("<IQ", arr.etype % 2**32, len(arr.items))
        if arr.etype == VT.STRING:
            return head + b"".join(_string(s) for s in arr.items)
        if arr.etype == VT.ARRAY:
            return head + b"".join(_value(VT.ARRAY, a) for a in arr.items)
        if arr.etype in SCALAR_STRUCT:
            fmt = SCALAR_STRUCT[VT(arr.etype)]
            return head + b"".join(struct.pack(fmt, _fit(VT(arr.etype), v)) for v in arr.items)
        return head
    if vtype in SCALAR_STRUCT:
        return struct.pack(SCALAR_STRUCT[VT(vtype)], _fit(VT(vtype), value))
    return b""  # unknown type: no payload


def _fit(vt: GGUFValueType, v: Any) -> Any:
    """``v`` made representable in ``vt`` (the mutation chose the type; wrap, do not refuse)."""
    if vt in INT_RANGE:
        lo, hi = INT_RANGE[vt]
        try:
            iv = int(v)
        except (ValueError, OverflowError, TypeError):
            iv = hi
        return (iv - lo) % (hi - lo + 1) + lo
    if vt == VT.BOOL:
        return bool(v) if not isinstance(v, float) or v == v else True
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def nested(depth: int) -> Raw:
    """An array of one array of one array ... ``depth`` levels deep (built without recursion)."""
    payload = struct.pack("<IQ", VT.UINT32, 1) + struct.pack("<I", 1)
    for _ in range(depth - 1):
        payload = struct.pack("<IQ", VT.ARRAY, 1) + payload
    return Raw(payload)


def hostile_value(rng: random.Random, like: int | None = None) -> tuple[int, Any]:
    """A (type, value) pair: of type ``like`` when given (hostile in range), else of any type."""
    vt = VT(like) if like is not None and rng.random() < 0.6 else rng.choice(list(VT))
    if vt in INT_RANGE:
        lo, hi = INT_RANGE[vt]
        return vt, rng.choice([0, 1, 2, 3, 7, 8, 255, 256, 2**31, hi, lo, -1, 2**40, rng.randint(lo, hi)])
    if vt in FLOAT_TYPES:
        return vt, rng.choice(FLOATS)
    if vt == VT.BOOL:
        return vt, rng.random() < 0.5
    if vt == VT.STRING:
        if rng.random() < 0.2:
            return vt, bytes([0xFF, 0xFE, 0x80]) + b"abc"  # invalid UTF-8
        return vt, rng.choice(STRINGS)
    kind = rng.choice(["u32", "i32", "f32", "str", "empty", "nested", "bool"])
    if kind == "u32":
        return VT.ARRAY, Array(VT.UINT32, [rng.choice([0, 1, 2, 5, 99, 2**32 - 1]) for _ in range(rng.randint(1, 6))])
    if kind == "i32":
        items = [rng.choice([-1, 0, 1, 2**31 - 1, -(2**31)]) for _ in range(rng.randint(1, 6))]
        return VT.ARRAY, Array(VT.INT32, items)
    if kind == "f32":
        return VT.ARRAY, Array(VT.FLOAT32, [rng.choice(FLOATS) for _ in range(3)])
    if kind == "str":
        return VT.ARRAY, Array(VT.STRING, [rng.choice(STRINGS[:8]) for _ in range(3)])
    if kind == "bool":
        return VT.ARRAY, Array(VT.BOOL, [True, False])
    if kind == "nested":
        return VT.ARRAY, nested(rng.choice([2, 3, 10, 900, 5000]))
    return VT.ARRAY, Array(rng.choice([VT.UINT32, VT.STRING, VT.ARRAY]), [])


# --------------------------------------------------------------------------------------------------
# mutation families: each edits ``g`` in place


def _key_entry(g: RawGGUF, rng: random.Random, prefer: tuple[str, ...] = ()) -> list[Any]:
    hits = [e for e in g.kv if any(e[0].decode(errors="replace").endswith(p) for p in prefer)] if prefer else []
    return rng.choice(hits or g.kv)


HPARAM_KEYS = ("block_count", "context_length", "embedding_length", "feed_forward_length", "head_count",
               "head_count_kv", "key_length", "value_length", "freq_base", "layer_norm_rms_epsilon",
               "scaling.type", "scaling.factor", "original_context_length", "expert_count", "expert_used_count",
               "expert_feed_forward_length", "expert_shared_feed_forward_length", "expert_weights_norm",
               "dense_layers", "architecture", "alignment", "file_type")


def m_header(g: RawGGUF, rng: random.Random) -> None:
    what = rng.choice(["version", "n_kv", "n_tensors", "magic", "alignment"])
    if what == "version":
        g.version = rng.choice([0, 1, 2, 4, 2**31, 2**32 - 1])
    elif what == "n_kv":
        g.n_kv = rng.choice([len(g.kv) + 1, len(g.kv) - 1, 0, 2**63, 2**64 - 1])
    elif what == "n_tensors":
        g.n_tensors = rng.choice([len(g.tensors) + 1, len(g.tensors) - 1, 0, 2**40, 2**64 - 1])
    elif what == "magic":
        g.magic = rng.choice([b"GGUF"[::-1], b"GGML", b"\x00\x00\x00\x00"])
    else:
        g.kv.insert(0, [b"general.alignment", VT.UINT32, rng.choice([0, 1, 3, 8, 64, 2**31, 2**32 - 1])])


def m_meta_value(g: RawGGUF, rng: random.Random) -> None:
    e = _key_entry(g, rng, HPARAM_KEYS if rng.random() < 0.8 else ())
    vt, value = hostile_value(rng, like=e[1] if e[1] != VT.ARRAY else None)
    e[1], e[2] = vt, value


def m_meta_add(g: RawGGUF, rng: random.Random) -> None:
    arch = next((e[2] for e in g.kv if e[0] == b"general.architecture"), "qwen2")
    key = f"{arch}.{rng.choice(HPARAM_KEYS)}" if rng.random() < 0.8 else rng.choice(
        ["general.alignment", "tokenizer.ggml.pre", "tokenizer.chat_template", "x" * 70000])
    if g.find(key) is not None and rng.random() < 0.5:
        g.kv.append([key.encode(), VT.UINT32, 1])  # a duplicate key
        return
    vt, value = hostile_value(rng)
    g.kv.append([key.encode(), vt, value])


def m_meta_drop(g: RawGGUF, rng: random.Random) -> None:
    e = _key_entry(g, rng, HPARAM_KEYS + ("tokens", "merges", "token_type", "model", "pre"))
    g.kv.remove(e)


def m_meta_nest(g: RawGGUF, rng: random.Random) -> None:
    e = _key_entry(g, rng)
    e[1], e[2] = VT.ARRAY, nested(rng.choice([2, 50, 900, 3000, 20000]))


def m_meta_type(g: RawGGUF, rng: random.Random) -> None:
    """Keep the value's bytes but change its declared type (or an array's element type)."""
    e = _key_entry(g, rng, HPARAM_KEYS + ("tokens", "token_type", "merges"))
    if e[1] == VT.ARRAY and isinstance(e[2], Array) and rng.random() < 0.7:
        e[2] = Raw(_value(VT.ARRAY, e[2]))
        payload = bytearray(e[2].payload)
        payload[0:4] = struct.pack("<I", rng.choice([0, 4, 5, 6, 8, 9, 12, 13, 99]))
        e[2] = Raw(bytes(payload))
    else:
        e[2] = Raw(_value(e[1], e[2]))
        e[1] = rng.choice([*NUMERIC, VT.STRING, VT.ARRAY, 13, 99])


def m_tokenizer(g: RawGGUF, rng: random.Random) -> None:
    tokens, types, merges = g.find("tokenizer.ggml.tokens"), g.find("tokenizer.ggml.token_type"), g.find(
        "tokenizer.ggml.merges")
    what = rng.choice(["short", "long", "dup", "empty", "types", "typeval", "merges", "merge-garbage", "special",
                       "model", "pre", "huge-token"])
    if what in ("short", "long", "dup", "empty", "huge-token") and tokens:
        items = list(tokens[2].items)
        if what == "short":
            del items[-rng.choice([1, 8, 9, len(items) // 2]) :]
        elif what == "long":
            items += [f"extra{i}" for i in range(rng.choice([1, 8, 100]))]
        elif what == "dup":
            items[rng.randrange(len(items))] = items[rng.randrange(len(items))]
        elif what == "empty":
            items[rng.randrange(len(items))] = ""
        else:
            items[rng.randrange(len(items))] = "a" * 100000
        tokens[2] = Array(VT.STRING, items)
    elif what in ("types", "typeval") and types:
        arr = np.asarray(types[2].items).copy()
        if what == "types":
            arr = arr[: rng.randrange(len(arr))]
        else:
            arr[rng.randrange(len(arr))] = rng.choice([0, 7, 99, -1, 2**31 - 1])
        types[2] = Array(types[2].etype, arr)
    elif what in ("merges", "merge-garbage") and merges:
        items = list(merges[2].items)
        if what == "merges":
            items = items[: rng.randrange(len(items) + 1)] if rng.random() < 0.5 else items[::-1]
        else:
            items[rng.randrange(len(items))] = rng.choice(["", "a", "a b c", "zz qq", " ", "Ġ Ġ"])
        merges[2] = Array(VT.STRING, items)
    elif what == "special":
        key = rng.choice(["bos", "eos", "eot", "padding", "unknown"])
        g.kv.append([f"tokenizer.ggml.{key}_token_id".encode(), VT.UINT32, rng.choice([2**32 - 1, 10**6, 0])])
    elif what == "model":
        e = g.find("tokenizer.ggml.model")
        if e:
            e[2] = rng.choice(["llama", "bert", "", "gpt2 "])
    else:
        e = g.find("tokenizer.ggml.pre")
        if e:
            e[2] = rng.choice(["llama3", "", "qwen2\x00", "default"])


def m_template(g: RawGGUF, rng: random.Random) -> None:
    e = g.find("tokenizer.chat_template")
    bad = rng.choice([
        "{{", "{% for %}", "{{ raise_exception('no') }}", "{{ messages[0].content.__class__.__mro__ }}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{{ 'x' * 100000000 }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "<|im_start|>" * 3,
        "{{ (messages|first)['nope']['deeper'] }}", "{% set x = namespace(a=1) %}{{ x.a / 0 }}",
    ])
    if e:
        e[1], e[2] = VT.STRING, bad
    else:
        g.kv.append([b"tokenizer.chat_template", VT.STRING, bad])


def _tensor(g: RawGGUF, rng: random.Random) -> list[Any]:
    return rng.choice(g.tensors)


def m_tensor_shape(g: RawGGUF, rng: random.Random) -> None:
    t = _tensor(g, rng)
    ne = t[1]
    what = rng.choice(["dim", "swap", "add", "drop"])
    if what == "dim":
        i = rng.randrange(len(ne))
        ne[i] = rng.choice([0, 1, ne[i] - 1, ne[i] + 1, ne[i] * 2, ne[i] + 32, 2**40 - 1, 2**63, 2**64 - 1])
    elif what == "swap" and len(ne) > 1:
        ne.reverse()
    elif what == "add":
        ne.append(rng.choice([1, 2, 8]))
        if rng.random() < 0.2:
            ne.extend([1, 1, 1])
    else:
        ne[:] = ne[:-1] or [0]


def m_tensor_type(g: RawGGUF, rng: random.Random) -> None:
    t = _tensor(g, rng)
    t[2] = rng.choice([0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 20, 24, 28, 30, 31, 39, 100, 2**31])


def m_tensor_offset(g: RawGGUF, rng: random.Random) -> None:
    t = _tensor(g, rng)
    t[3] = rng.choice([t[3] + 1, t[3] + g.alignment, 0, max(0, t[3] - g.alignment), len(g.data), 2**62, 2**64 - 32])


def m_tensor_name(g: RawGGUF, rng: random.Random) -> None:
    t = _tensor(g, rng)
    what = rng.choice(["dup", "rename", "drop", "utf8", "long", "empty"])
    if what == "dup":
        t[0] = _tensor(g, rng)[0]
    elif what == "rename":
        t[0] = t[0].replace(b"blk.0", b"blk.99") if b"blk.0" in t[0] else t[0] + b".x"
    elif what == "drop":
        g.tensors.remove(t)
    elif what == "utf8":
        t[0] = b"\xff\xfe" + t[0]
    elif what == "long":
        t[0] = b"t" * 70000
    else:
        t[0] = b""


def m_tensor_data(g: RawGGUF, rng: random.Random) -> None:
    """NaN / inf into a tensor's values (f32, f16, bf16) or into a block's f16 scale (quantized)."""
    t = _tensor(g, rng)
    data = bytearray(g.data)
    start = t[3]
    n_rows_vals = int(np.prod(t[1]))
    bad16 = rng.choice([0x7E00, 0x7C00, 0xFC00])
    for _ in range(rng.choice([1, 3])):
        if t[2] == 0:
            pos = start + 4 * rng.randrange(n_rows_vals)
            data[pos : pos + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), float("-inf"), 3e38]))
        elif t[2] == 1:
            pos = start + 2 * rng.randrange(n_rows_vals)
            data[pos : pos + 2] = struct.pack("<H", bad16)
        elif t[2] == 30:
            pos = start + 2 * rng.randrange(n_rows_vals)
            data[pos : pos + 2] = struct.pack("<H", rng.choice([0x7FC0, 0x7F80]))
        elif t[2] in SCALE_AT:
            at, size = SCALE_AT[t[2]]
            n_blocks = max(1, n_rows_vals // (32 if size < 100 else 256))
            pos = start + size * rng.randrange(n_blocks) + at
            data[pos : pos + 2] = struct.pack("<H", bad16)
    g.data = bytes(data)


def m_tensor_bytes(g: RawGGUF, rng: random.Random) -> None:
    """Random bytes over part of a tensor's data: finite garbage weights (huge scales, any quants) that
    load and run, so the forward pass meets overflow and garbage instead of a refused header."""
    t = _tensor(g, rng)
    data = bytearray(g.data)
    start = t[3]
    size = min(len(data) - start, max(1, int(np.prod(t[1])) // 2))
    if size <= 0:
        return
    a = start + rng.randrange(size)
    n = min(rng.choice([2, 16, 256, 4096]), len(data) - a)
    data[a : a + n] = bytes(rng.randrange(256) for _ in range(n))
    g.data = bytes(data)


def m_bytes(g: RawGGUF, rng: random.Random) -> None:
    size = len(g.encode()) - len(g.data)
    flips = [(rng.randrange(size), rng.randrange(256)) for _ in range(rng.choice([1, 2, 4, 16]))]
    g.tail.append(("flip", flips))


def m_truncate(g: RawGGUF, rng: random.Random) -> None:
    total = len(g.encode())
    g.tail.append(("truncate", rng.choice([rng.randrange(total), total - 1, rng.randrange(64), total - 32])))


def m_insert(g: RawGGUF, rng: random.Random) -> None:
    size = len(g.encode()) - len(g.data)
    g.tail.append(("insert", (rng.randrange(size), bytes(rng.randrange(256) for _ in range(rng.choice([1, 4, 8]))))))


FAMILIES = {
    "header": m_header,
    "meta-value": m_meta_value,
    "meta-add": m_meta_add,
    "meta-drop": m_meta_drop,
    "meta-nest": m_meta_nest,
    "meta-type": m_meta_type,
    "tokenizer": m_tokenizer,
    "template": m_template,
    "tensor-shape": m_tensor_shape,
    "tensor-type": m_tensor_type,
    "tensor-offset": m_tensor_offset,
    "tensor-name": m_tensor_name,
    "tensor-data": m_tensor_data,
    "tensor-bytes": m_tensor_bytes,
    "bytes": m_bytes,
    "truncate": m_truncate,
    "insert": m_insert,
}


def mutate(seed: RawGGUF, family: str, rng: random.Random) -> bytes:
    """One mutant of ``seed`` (1-2 edits of ``family``, sometimes one of another family too)."""
    g = copy.deepcopy(seed)
    FAMILIES[family](g, rng)
    if rng.random() < 0.15:
        FAMILIES[rng.choice([f for f in FAMILIES if f not in ("bytes", "truncate", "insert")])](g, rng)
    return g.encode()
