"""The streaming GGUF writer: files read back identically by gguf-py's reader and qwenlite's reader,
aligned offsets, atomic rename, and no temp file left behind on any failure."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from qwenlite.errors import GGUFError
from qwenlite.gguf.constants import GGMLType, GGUFValueType
from qwenlite.gguf.reader import GGUFFile
from qwenlite.gguf.writer import GGUFWriter

V = GGUFValueType
SCALARS = [
    ("t.u8", 255, V.UINT8),
    ("t.i8", -128, V.INT8),
    ("t.u16", 65535, V.UINT16),
    ("t.i16", -32768, V.INT16),
    ("t.u32", 2**32 - 1, V.UINT32),
    ("t.i32", -(2**31), V.INT32),
    ("t.f32", 0.25, V.FLOAT32),
    ("t.bool", True, V.BOOL),
    ("t.str", "héllo <|im_end|>\n", V.STRING),
    ("t.u64", 2**64 - 1, V.UINT64),
    ("t.i64", -(2**63), V.INT64),
    ("t.f64", 1e-300, V.FLOAT64),
]
ARRAYS = [
    ("a.u8", [0, 1, 255], V.UINT8),
    ("a.i8", [-1, 2], V.INT8),
    ("a.u16", [7, 65535], V.UINT16),
    ("a.i16", [-7, 7], V.INT16),
    ("a.u32", [3, 1, 4], V.UINT32),
    ("a.i32", [-5, 6, 1], V.INT32),
    ("a.f32", [0.5, -2.0], V.FLOAT32),
    ("a.bool", [True, False, True], V.BOOL),
    ("a.str", ["a", "", "Ġthe", "日本"], V.STRING),
    ("a.u64", [2**63], V.UINT64),
    ("a.i64", [-(2**40)], V.INT64),
    ("a.f64", [1.5, -0.125], V.FLOAT64),
    ("a.empty", [], V.UINT32),
]


def _tensors(rng: np.random.Generator) -> list[tuple[str, tuple[int, ...], GGMLType, np.ndarray]]:
    """Odd byte sizes so that padding between tensors is exercised."""
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f16 = rng.standard_normal((7,)).astype(np.float16)
    f32_3d = rng.standard_normal((2, 3, 4)).astype(np.float32)
    return [
        ("a.weight", (3, 5), GGMLType.F32, f32),
        ("b.bias", (7,), GGMLType.F16, f16),
        ("c.exps", (2, 3, 4), GGMLType.F32, f32_3d),
    ]


def _write(path: Path, rng: np.random.Generator) -> list[tuple[str, tuple[int, ...], GGMLType, np.ndarray]]:
    tensors = _tensors(rng)
    with GGUFWriter(path) as w:
        w.add_string("general.architecture", "qwen2")
        for key, value, vtype in SCALARS:
            w.add(key, value, vtype)
        for key, values, etype in ARRAYS:
            w.add_array(key, values, etype)
        for name, shape, qtype, data in tensors:
            w.add_tensor_info(name, shape, qtype, data.nbytes)
        w.begin_data()
        for name, _, _, data in tensors:
            flat = data.reshape(-1).view(np.uint8)
            w.write_tensor(name, [flat[:5], flat[5:]])  # split chunks: streaming, not one blob
    return tensors


def test_roundtrip_gguf_py(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    tensors = _write(path, np.random.default_rng(0))
    r = GGUFReader(path)
    for key, value, vtype in SCALARS:
        f = r.fields[key]
        assert f.types == [vtype]
        got = f.contents()
        if vtype == V.FLOAT32:
            assert got == pytest.approx(value)
        else:
            assert got == value
    for key, values, etype in ARRAYS:
        f = r.fields[key]
        assert f.types[:1] == [V.ARRAY]
        if values:
            assert f.types[1] == etype
        assert (
            list(f.contents()) == pytest.approx(values)
            if etype in (V.FLOAT32, V.FLOAT64)
            else list(f.contents()) == values
        )
    by_name = {t.name: t for t in r.tensors}
    assert list(by_name) == [t[0] for t in tensors]
    for name, shape, qtype, data in tensors:
        t = by_name[name]
        assert t.tensor_type == qtype
        assert list(t.shape) == list(shape[::-1])  # gguf-py reports ne order
        assert t.data_offset % 32 == 0
        np.testing.assert_array_equal(np.asarray(t.data).reshape(-1), data.reshape(-1))


def test_roundtrip_qwenlite_reader(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    tensors = _write(path, np.random.default_rng(1))
    with GGUFFile(path) as f:
        assert f.version == 3
        for key, value, vtype in SCALARS:
            if vtype == V.FLOAT32:
                assert f.metadata[key] == pytest.approx(value)
            else:
                assert f.metadata[key] == value
        for key, values, etype in ARRAYS:
            got = f.metadata[key]
            assert list(got) == pytest.approx(values) if etype in (V.FLOAT32, V.FLOAT64) else list(got) == values
        assert list(f.tensors) == [t[0] for t in tensors]
        for name, shape, qtype, data in tensors:
            info = f.tensor(name)
            assert info.shape == shape and info.qtype == qtype
            assert (info.offset - f.data_offset) % 32 == 0
            np.testing.assert_array_equal(info.data, data.reshape(-1).view(np.uint8))


def test_custom_alignment(tmp_path: Path) -> None:
    path = tmp_path / "a.gguf"
    data = np.arange(3, dtype=np.float32)
    with GGUFWriter(path, alignment=64) as w:
        w.add_tensor_info("x", (3,), GGMLType.F32, 12)
        w.add_tensor_info("y", (3,), GGMLType.F32, 12)
        w.begin_data()
        w.write_tensor("x", [data])
        w.write_tensor("y", [data + 1])
    r = GGUFReader(path)
    assert r.fields["general.alignment"].contents() == 64
    assert all(t.data_offset % 64 == 0 for t in r.tensors)
    with GGUFFile(path) as f:
        np.testing.assert_array_equal(f.tensor("y").data.view(np.float32), data + 1)


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_exception_removes_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    with pytest.raises(RuntimeError), GGUFWriter(path) as w:
        w.add_tensor_info("x", (4,), GGMLType.F32, 16)
        w.begin_data()
        assert w.tmp_path.exists() and w.tmp_path.name == f"x.gguf.incomplete-{os.getpid()}"
        raise RuntimeError("boom")
    assert _leftovers(tmp_path) == []


def test_keyboard_interrupt_removes_temp_file_and_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"old")

    def chunks():  # noqa: ANN202
        yield np.zeros(2, np.float32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), GGUFWriter(path) as w:
        w.add_tensor_info("x", (4,), GGMLType.F32, 16)
        w.begin_data()
        w.write_tensor("x", chunks())
    assert _leftovers(tmp_path) == ["x.gguf"]
    assert path.read_bytes() == b"old"


def test_size_and_order_checks(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    with pytest.raises(GGUFError, match="wrote 8 bytes, declared 16"), GGUFWriter(path) as w:
        w.add_tensor_info("x", (4,), GGMLType.F32, 16)
        w.begin_data()
        w.write_tensor("x", [np.zeros(2, np.float32)])
    with pytest.raises(GGUFError, match="more than the declared"), GGUFWriter(path) as w:
        w.add_tensor_info("x", (4,), GGMLType.F32, 16)
        w.begin_data()
        w.write_tensor("x", [np.zeros(5, np.float32)])
    with pytest.raises(GGUFError, match="out of order"), GGUFWriter(path) as w:
        w.add_tensor_info("x", (4,), GGMLType.F32, 16)
        w.add_tensor_info("y", (4,), GGMLType.F32, 16)
        w.begin_data()
        w.write_tensor("y", [np.zeros(4, np.float32)])
    with pytest.raises(GGUFError, match="never written"), GGUFWriter(path) as w:
        w.add_tensor_info("x", (4,), GGMLType.F32, 16)
    assert _leftovers(tmp_path) == []


def test_bad_metadata_is_rejected(tmp_path: Path) -> None:
    w = GGUFWriter(tmp_path / "x.gguf")
    with pytest.raises(GGUFError, match="does not fit"):
        w.add("k", 256, V.UINT8)
    with pytest.raises(GGUFError, match="expected an integer"):
        w.add("k", 1.5, V.UINT32)
    with pytest.raises(GGUFError, match="do not fit"):
        w.add_array("k", [-1], V.UINT32)
    w.add_uint32("k", 1)
    with pytest.raises(GGUFError, match="duplicate"):
        w.add_uint32("k", 2)
    with pytest.raises(GGUFError, match="duplicate tensor"):
        w.add_tensor_info("t", (1,), GGMLType.F32, 4)
        w.add_tensor_info("t", (1,), GGMLType.F32, 4)
    w.abort()
    assert _leftovers(tmp_path) == []
