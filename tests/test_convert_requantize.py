"""GGUF -> GGUF re-quantization: the same code path as conversion, so converting to f32 and then
re-quantizing must give byte-identical tensors and the same metadata as converting directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from hf_fixtures import make_qwen2moe_checkpoint

from qwenlite import quant
from qwenlite.converters.hf_to_gguf import convert
from qwenlite.converters.requantize import requantize
from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType
from qwenlite.gguf.reader import GGUFFile


@pytest.fixture(scope="module")
def moe_f32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("rq")
    d = make_qwen2moe_checkpoint(tmp)
    return d, convert(d, tmp / "f32.gguf", "f32", progress=False)


def _fields(path: Path) -> dict[str, tuple[list[int], object]]:
    out = {}
    for key, f in GGUFReader(path).fields.items():
        value = f.contents()
        out[key] = (f.types, value.tolist() if isinstance(value, np.ndarray) else value)
    return out


@pytest.mark.parametrize("ftype", ["q4_k_m", "q8_0", "f16"])
def test_requantize_equals_direct_conversion(moe_f32: tuple[Path, Path], tmp_path: Path, ftype: str) -> None:
    d, f32 = moe_f32
    direct = convert(d, tmp_path / "direct.gguf", ftype, progress=False)
    again = requantize(f32, tmp_path / "again.gguf", ftype, progress=False)
    assert direct.read_bytes() == again.read_bytes()
    assert _fields(direct) == _fields(again)


def test_requantize_from_f16_and_bf16(moe_f32: tuple[Path, Path], tmp_path: Path) -> None:
    """Float inputs are widened exactly, then quantized: same bytes as quantizing the widened values."""
    d, _ = moe_f32
    for src_type in ("f16", "bf16"):
        src = convert(d, tmp_path / f"{src_type}.gguf", src_type, progress=False)
        out = requantize(src, tmp_path / f"{src_type}-q8.gguf", "q8_0", progress=False)
        with GGUFFile(src) as a, GGUFFile(out) as b:
            assert b.metadata["general.file_type"] == 7
            for t in a:
                widened = quant.dequantize(
                    t.data.reshape(-1, quant.row_nbytes(t.qtype, t.shape[-1])), t.qtype, t.shape[-1]
                )
                qt = b.tensor(t.name).qtype
                if t.qtype == GGMLType.F32:  # norms, biases, routers stay as they are
                    assert qt == GGMLType.F32
                want = quant.quantize(widened, qt).reshape(-1)
                np.testing.assert_array_equal(b.tensor(t.name).data, want, err_msg=t.name)


def test_refuses_quantized_input_and_own_path(moe_f32: tuple[Path, Path], tmp_path: Path) -> None:
    _, f32 = moe_f32
    q = requantize(f32, tmp_path / "q.gguf", "q4_k_m", progress=False)
    with pytest.raises(QwenliteError, match=r"already quantized \(Q\d"):
        requantize(q, tmp_path / "qq.gguf", "q8_0", progress=False)
    with pytest.raises(QwenliteError, match="refusing to overwrite"):
        requantize(f32, f32, "q8_0", progress=False)
    assert not (tmp_path / "qq.gguf").exists()


def test_interrupted_requantize_leaves_no_file(
    moe_f32: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qwenlite.converters import pipeline

    _, f32 = moe_f32

    def boom(x: np.ndarray, qtype: int) -> np.ndarray:
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.quant, "quantize", boom)
    with pytest.raises(KeyboardInterrupt):
        requantize(f32, tmp_path / "x.gguf", "q8_0", progress=False)
    assert list(tmp_path.iterdir()) == []
