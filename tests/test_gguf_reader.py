"""The GGUF reader on the real file and on hand-crafted broken and hostile files (built with struct here,
independently of qwenlite's writer)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from qwenlite.errors import GGUFError
from qwenlite.gguf.constants import GGMLType, GGUFValueType
from qwenlite.gguf.reader import GGUFFile


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: GGUFValueType, payload: bytes) -> bytes:
    return _str(key) + struct.pack("<I", vtype) + payload


def build(
    tensors: list[tuple[str, list[int], int, int]],
    data: bytes,
    kvs: list[bytes] | None = None,
    version: int = 3,
    magic: bytes = b"GGUF",
) -> bytes:
    """A GGUF image: ``tensors`` as (name, ne, type, relative offset), then 32-aligned ``data``."""
    kvs = kvs if kvs is not None else [_kv("general.architecture", GGUFValueType.STRING, _str("qwen2"))]
    head = magic + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    for name, ne, qtype, off in tensors:
        head += _str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        head += struct.pack("<IQ", qtype, off)
    head += b"\0" * (-len(head) % 32)
    return head + data


def write(tmp_path: Path, image: bytes) -> Path:
    p = tmp_path / "m.gguf"
    p.write_bytes(image)
    return p


def test_good_file_reads_like_gguf_py(tmp_path: Path) -> None:
    a = np.arange(64, dtype=np.float32)
    b = np.linspace(-1, 1, 32).astype(np.float16)
    data = a.tobytes() + b.tobytes()
    p = write(tmp_path, build([("a", [16, 4], GGMLType.F32, 0), ("b", [32], GGMLType.F16, 256)], data))
    with GGUFFile(p) as f:
        assert f.architecture == "qwen2"
        ta, tb = f.tensor("a"), f.tensor("b")
        assert ta.shape == (4, 16) and ta.qtype == GGMLType.F32 and ta.nbytes == 256
        np.testing.assert_array_equal(ta.data.view(np.float32).reshape(4, 16), a.reshape(4, 16))
        np.testing.assert_array_equal(tb.data.view(np.float16), b)
        assert ta.rows().shape == (4, 64)
    ref = GGUFReader(p)
    assert [t.name for t in ref.tensors] == ["a", "b"]


def test_real_model_metadata_and_tensors(real_model_path: Path) -> None:
    ref = GGUFReader(real_model_path)
    with GGUFFile(real_model_path) as f:
        assert f.architecture == "qwen2"
        assert f.metadata["qwen2.block_count"] == 24
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 151936
        assert f.metadata["tokenizer.ggml.tokens"][151645] == "<|im_end|>"
        assert len(f.tensors) == len(ref.tensors)
        for t in ref.tensors:
            mine = f.tensor(t.name)
            assert mine.shape == tuple(int(d) for d in reversed(t.shape))
            assert mine.qtype == int(t.tensor_type)
            assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda img: img[:10], "truncated"),
        (lambda img: b"GGUX" + img[4:], "not a GGUF file"),
        (lambda img: img[:4] + struct.pack("<I", 99) + img[8:], "unsupported GGUF version 99"),
        (lambda img: img[:-100], "past the end of the file"),
    ],
)
def test_broken_files_are_refused(tmp_path: Path, mutate, message: str) -> None:  # noqa: ANN001
    img = build([("a", [64, 4], GGMLType.F32, 0)], np.zeros(256, np.float32).tobytes()[:1024])
    p = write(tmp_path, mutate(img))
    with pytest.raises(GGUFError, match=message):
        GGUFFile(p)


def test_offset_past_end(tmp_path: Path) -> None:
    p = write(tmp_path, build([("a", [8], GGMLType.F32, 1 << 40)], b"\0" * 32))
    with pytest.raises(GGUFError, match="past the end"):
        GGUFFile(p)


def test_shape_not_multiple_of_block(tmp_path: Path) -> None:
    p = write(tmp_path, build([("a", [33, 2], GGMLType.Q8_0, 0)], b"\0" * 128))
    with pytest.raises(GGUFError, match="not a multiple of the Q8_0 block of 32"):
        GGUFFile(p)


def test_unknown_tensor_type(tmp_path: Path) -> None:
    p = write(tmp_path, build([("a", [32], 77, 0)], b"\0" * 128))
    with pytest.raises(GGUFError, match="unknown ggml type 77"):
        GGUFFile(p)


def test_overlapping_tensors(tmp_path: Path) -> None:
    p = write(tmp_path, build([("a", [16], GGMLType.F32, 0), ("b", [16], GGMLType.F32, 32)], b"\0" * 128))
    with pytest.raises(GGUFError, match="overlap"):
        GGUFFile(p)


def test_hostile_array_count_does_not_allocate(tmp_path: Path) -> None:
    huge = _kv("x", GGUFValueType.ARRAY, struct.pack("<IQ", GGUFValueType.UINT64, 1 << 60))
    p = write(tmp_path, build([], b"", kvs=[huge]))
    with pytest.raises(GGUFError, match="array 'x'"):
        GGUFFile(p)
    strings = _kv("y", GGUFValueType.ARRAY, struct.pack("<IQ", GGUFValueType.STRING, 1 << 50))
    p = write(tmp_path, build([], b"", kvs=[strings]))
    with pytest.raises(GGUFError, match="claims"):
        GGUFFile(p)


def test_hostile_string_length(tmp_path: Path) -> None:
    p = write(tmp_path, build([], b"", kvs=[_str("k") + struct.pack("<IQ", GGUFValueType.STRING, 1 << 62)]))
    with pytest.raises(GGUFError, match="truncated or corrupt"):
        GGUFFile(p)
    p = write(tmp_path, build([], b"", kvs=[struct.pack("<Q", 1 << 40)]))
    with pytest.raises(GGUFError, match="more than the limit"):
        GGUFFile(p)


def test_hostile_counts_in_header(tmp_path: Path) -> None:
    img = b"GGUF" + struct.pack("<IQQ", 3, 1 << 62, 1 << 62) + b"\0" * 64
    with pytest.raises(GGUFError, match="corrupt"):
        GGUFFile(write(tmp_path, img))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="no such model file"):
        GGUFFile(tmp_path / "nope.gguf")


def test_read_rows_copies_the_same_bytes(real_model_path: Path) -> None:
    """``read_rows`` (the loader's copy path) returns exactly the mapped bytes, for any row range."""
    with GGUFFile(real_model_path) as f:
        t = f.tensor("blk.0.ffn_down.weight")
        rows = t.rows()
        np.testing.assert_array_equal(f.read_rows(t, 0, rows.shape[0]), rows)
        np.testing.assert_array_equal(f.read_rows(t, 17, 40), rows[17:40])
        assert f.read_rows(t, 5, 5).shape == (0, rows.shape[1])
        with pytest.raises(GGUFError, match="outside tensor"):
            f.read_rows(t, 0, rows.shape[0] + 1)
