"""The safetensors reader: zero-copy views equal to the safetensors library's own loading, sharded
checkpoints, and hostile or broken headers rejected with a clear error before any allocation."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwenlite.converters.safetensors_io import Checkpoint, SafetensorsError, SafetensorsFile, bf16_to_float32


def _raw_file(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def test_views_equal_library_and_are_zero_copy(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.float16),
        "c": torch.randn(2, 3, 4, generator=g).to(torch.bfloat16),
        "ids": torch.arange(4, dtype=torch.int64),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    want = load_file(tmp_path / "model.safetensors")
    with Checkpoint(tmp_path) as ckpt:
        assert sorted(ckpt.names()) == sorted(tensors)
        for name in ("a", "b", "c"):
            np.testing.assert_array_equal(ckpt.float32(name), want[name].to(torch.float32).numpy())
        raw = ckpt.raw("a")
        assert not raw.flags.owndata and not raw.flags.writeable  # a view into the read-only map
        assert ckpt.raw("c").dtype == np.uint16
        with pytest.raises(SafetensorsError, match="dtype I64; only F32, F16 and BF16"):
            ckpt.raw("ids")
        with pytest.raises(SafetensorsError, match="no tensor 'zzz'"):
            ckpt.raw("zzz")


def test_bf16_conversion_is_exact() -> None:
    x = torch.tensor([1.0, -2.5, 3.0e38, 1e-40, float("inf")], dtype=torch.bfloat16)
    bits = x.view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bf16_to_float32(bits), x.to(torch.float32).numpy())


def test_sharded_checkpoint(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2, 2)}, tmp_path / "s1.safetensors")
    save_file({"y": torch.zeros(3)}, tmp_path / "s2.safetensors")
    index = {"metadata": {}, "weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with Checkpoint(tmp_path) as ckpt:
        assert sorted(ckpt.names()) == ["x", "y"]
        np.testing.assert_array_equal(ckpt.float32("y"), np.zeros(3, np.float32))


@pytest.mark.parametrize(
    ("weight_map", "extra", "match"),
    [
        ({"x": "s1.safetensors", "y": "missing.safetensors"}, {}, "shard missing.safetensors is missing"),
        ({"x": "s1.safetensors", "y": "s1.safetensors"}, {}, "index lists 'y' but the shard lacks it"),
        ({"x": "s1.safetensors"}, {}, "holds 'x2'"),
        ({"x": "../s1.safetensors"}, {}, "bad shard file name"),
        ({"x": "s1.safetensors", "y": "s2.safetensors"}, {"x": "s2.safetensors"}, "appears in both"),
    ],
)
def test_bad_index(tmp_path: Path, weight_map: dict, extra: dict, match: str) -> None:
    save_file(
        {"x": torch.ones(2), "x2": torch.ones(1)} if "x2" in match else {"x": torch.ones(2)},
        tmp_path / "s1.safetensors",
    )
    save_file({"y": torch.ones(2), **({"x": torch.ones(1)} if extra else {})}, tmp_path / "s2.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SafetensorsError, match=match):
        Checkpoint(tmp_path)


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize(
    ("header", "data", "header_len", "match"),
    [
        (b"{}", b"", 2**63, "header length 9223372036854775808 is impossible"),
        (b"{}", b"", 2**20, "impossible for a 10-byte file"),
        (b"{not json", b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        (b"\xff\xfe{}", b"", None, "not valid JSON"),
        (b"[" * 100000 + b"]" * 100000, b"", None, "not valid JSON"),
        ({"a": _entry("F32", [2], 0, 16)}, bytes(8), None, r"outside the 8-byte data section"),
        ({"a": _entry("F32", [3], 0, 8)}, bytes(8), None, r"8 bytes stored but shape \[3\] x F32 needs 12"),
        ({"a": _entry("F32", [2], 0, 8), "b": _entry("F32", [2], 4, 12)}, bytes(12), None, "overlap"),
        ({"a": _entry("Q4", [2], 0, 8)}, bytes(8), None, "unknown dtype 'Q4'"),
        ({"a": _entry("F32", [-2], 0, 8)}, bytes(8), None, "bad shape"),
        ({"a": _entry("F32", [2], 8, 0)}, bytes(8), None, "outside"),
        ({"a": _entry("F32", [2], 0, "8")}, bytes(8), None, "bad data_offsets"),
        ({"a": [1, 2]}, bytes(8), None, "not an object"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
    ],
)
def test_hostile_headers(tmp_path: Path, header: dict | bytes, data: bytes, header_len: int | None, match: str) -> None:
    path = _raw_file(tmp_path / "model.safetensors", header, data, header_len)
    tracemalloc.start()
    try:
        with pytest.raises(SafetensorsError, match=match):
            SafetensorsFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20  # nothing sized by the hostile numbers was allocated


def test_tiny_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(SafetensorsError, match="too small"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(SafetensorsError, match="no model.safetensors"):
        Checkpoint(tmp_path)


def test_convert_reports_hostile_checkpoint(tmp_path: Path) -> None:
    """Through ``convert``: a clear QwenliteError, never a traceback from deep inside."""
    from hf_fixtures import make_qwen2_checkpoint

    from qwenlite.converters.hf_to_gguf import convert
    from qwenlite.errors import QwenliteError

    d = make_qwen2_checkpoint(tmp_path, num_hidden_layers=1)
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + blob[8:])
    with pytest.raises(QwenliteError, match="header length"):
        convert(d, tmp_path / "o.gguf", "f32", progress=False)
    (d / "model.safetensors").write_bytes(blob[: len(blob) // 2])  # truncated data section
    with pytest.raises(QwenliteError, match="outside the"):
        convert(d, tmp_path / "o.gguf", "f32", progress=False)
    assert not (tmp_path / "o.gguf").exists()
