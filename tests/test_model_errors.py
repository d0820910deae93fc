"""Files that parse as GGUF but are not a model qwenlite can run get one clear error at load time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hf_fixtures import make_qwen2_checkpoint

import qwenlite
from qwenlite.converters.hf_to_gguf import convert
from qwenlite.errors import GGUFError, QwenliteError
from qwenlite.gguf.constants import GGMLType
from qwenlite.gguf.reader import GGUFFile, TensorInfo
from qwenlite.gguf.writer import GGUFWriter


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    return convert(make_qwen2_checkpoint(d), d / "tiny-f32.gguf", "f32", progress=False)


Edit = Callable[[TensorInfo], tuple[tuple[int, ...], int, bytes]]


def rewrite(
    src: Path, out: Path, meta: dict | None = None, tensor: str | None = None, edit: Edit | None = None
) -> Path:
    """Copy ``src`` with some metadata values replaced and one tensor's (shape, type, bytes) replaced."""
    with GGUFFile(src) as f, GGUFWriter(out) as w:
        for key, value in f.metadata.items():
            vtype, elem = f.metadata_types[key]
            w.add(key, (meta or {}).get(key, value), vtype, elem)
        parts = {}
        for t in f:
            shape, qtype, data = edit(t) if t.name == tensor and edit else (t.shape, t.qtype, t.data.tobytes())
            parts[t.name] = data
            w.add_tensor_info(t.name, shape, qtype, len(data))
        w.begin_data()
        for name, data in parts.items():
            w.write_tensor(name, [data])
    return out


def test_tiny_model_loads(tiny_gguf: Path) -> None:
    with qwenlite.load(tiny_gguf) as m:
        assert m.logits([1, 2, 3]).shape == (3, m.config.n_vocab)


def test_unsupported_architecture(tiny_gguf: Path, tmp_path: Path) -> None:
    bad = rewrite(tiny_gguf, tmp_path / "llama.gguf", meta={"general.architecture": "llama"})
    with pytest.raises(GGUFError, match="architecture 'llama' is not supported"):
        qwenlite.load(bad)


def test_unsupported_tensor_type(tiny_gguf: Path, tmp_path: Path) -> None:
    def to_iq4_nl(t: TensorInfo) -> tuple[tuple[int, ...], int, bytes]:
        return t.shape, GGMLType.IQ4_NL, bytes(t.n_values // 32 * 18)

    bad = rewrite(tiny_gguf, tmp_path / "iq4.gguf", tensor="blk.1.attn_q.weight", edit=to_iq4_nl)
    with pytest.raises(GGUFError, match=r"'blk.1.attn_q.weight' has type IQ4_NL, which qwenlite cannot run"):
        qwenlite.load(bad)


def test_wrong_tensor_shape(tiny_gguf: Path, tmp_path: Path) -> None:
    def transpose(t: TensorInfo) -> tuple[tuple[int, ...], int, bytes]:
        return t.shape[::-1], t.qtype, t.data.tobytes()

    bad = rewrite(tiny_gguf, tmp_path / "shape.gguf", tensor="blk.0.ffn_up.weight", edit=transpose)
    with pytest.raises(GGUFError, match=r"'blk.0.ffn_up.weight' has shape \(96, 160\), expected \(160, 96\)"):
        qwenlite.load(bad)


def test_missing_tensor_and_bad_hyperparameters(tiny_gguf: Path, tmp_path: Path) -> None:
    bad = rewrite(tiny_gguf, tmp_path / "heads.gguf", meta={"qwen2.attention.head_count_kv": np.uint32(3)})
    with pytest.raises(GGUFError, match="heads"):
        qwenlite.load(bad)
    bad = rewrite(tiny_gguf, tmp_path / "layers.gguf", meta={"qwen2.block_count": 4})
    with pytest.raises(GGUFError, match="missing tensor 'blk.3.attn_norm.weight'"):
        qwenlite.load(bad)


def test_prompt_longer_than_context(tiny_gguf: Path) -> None:
    with qwenlite.load(tiny_gguf, n_ctx=16) as m:
        with pytest.raises(QwenliteError, match="the token list is 17 tokens but a sequence's context is 16"):
            m.logits(list(range(17)))
        with pytest.raises(QwenliteError, match="the prompt is 20 tokens but a sequence's context is 16"):
            m.generate(list(range(20)), max_tokens=4)
        with pytest.raises(QwenliteError, match=f"token id {m.config.n_vocab} out of range"):
            m.logits([m.config.n_vocab])
        assert isinstance(m.generate(list(range(10)), max_tokens=4), str)
