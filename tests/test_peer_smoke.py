"""The llama.cpp oracles themselves work: if these fail, every test built on them means nothing.

Quantization is checked bit-for-bit against the independent ``gguf.quants`` Python reference for the
types it implements, and through ``gguf.quants.dequantize`` for the K-quants it cannot produce. The
model-level oracles are checked against llama.cpp's own tokenizer vectors and against each other
(incremental greedy decoding must agree with the argmax of one batched logits pass).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize

from tests.peer import (
    ggml_quantize,
    llama_greedy,
    llama_logits,
    llama_tokenize,
    llama_tokenize_many,
    requires_peer,
)

pytestmark = [pytest.mark.peer, requires_peer]

DATA = Path(__file__).parent / "data"
SEP = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def model_path(real_model_path: Path) -> Path:
    """The real 0.5B model (conftest's ``real_model_path``; only pulled when the peer is there)."""
    return real_model_path


def _weights(rows: int, n: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows with a few outliers, like real weights (outliers stress the scale choice)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[rng.random((rows, n)) < 0.01] *= 8.0
    return x


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_0, T.Q5_1])
def test_ggml_quantize_matches_gguf_reference(qtype: T) -> None:
    x = _weights(8, 512)
    assert ggml_quantize(qtype, x) == quantize(x, qtype).tobytes()


@pytest.mark.parametrize(("qtype", "max_rel_err"), [(T.Q4_K, 0.12), (T.Q5_K, 0.06), (T.Q6_K, 0.03)])
def test_ggml_quantize_kquants_roundtrip(qtype: T, max_rel_err: float) -> None:
    """gguf cannot quantize K-quants, but its dequantizer decodes ggml's bytes to close values."""
    x = _weights(4, 1024, seed=1)
    raw = np.frombuffer(ggml_quantize(qtype, x), dtype=np.uint8).reshape(4, -1)
    back = dequantize(raw, qtype)
    rel = np.linalg.norm(back - x) / np.linalg.norm(x)
    assert rel < max_rel_err
    assert rel > 1e-4  # really quantized, not a float copy


def test_ggml_quantize_rejects_bad_rows() -> None:
    with pytest.raises(ValueError, match="multiple of the block size"):
        ggml_quantize(T.Q4_K, np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(ValueError, match="unknown ggml type"):
        ggml_quantize(999, np.zeros((1, 32), dtype=np.float32))


def test_llama_tokenize_matches_llama_cpp_vectors() -> None:
    """llama.cpp's own tokenizer test (test-tokenizer-0) on the Qwen2 vocab, through our wrapper."""
    texts = (DATA / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8").split(SEP)[:-1]
    lines = (DATA / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").splitlines()
    expected = [[int(t) for t in line.split()] for line in lines]
    assert len(texts) == len(expected) == 46
    got = llama_tokenize_many(DATA / "ggml-vocab-qwen2.gguf", texts, special=False)
    assert got == expected


def test_llama_tokenize_special_flag(model_path: Path) -> None:
    assert llama_tokenize(model_path, "Hello world", special=False) == [9707, 1879]
    assert llama_tokenize(model_path, "<|im_start|>user", special=True) == [151644, 872]
    assert 151644 not in llama_tokenize(model_path, "<|im_start|>user", special=False)


def test_llama_greedy_agrees_with_logits(model_path: Path) -> None:
    prompt = llama_tokenize(
        model_path,
        "<|im_start|>user\nWrite a Python function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n",
        special=True,
    )
    out = llama_greedy(model_path, prompt, 8)
    assert len(out) == 8
    logits = llama_logits(model_path, prompt + out[:-1])
    assert logits.shape == (len(prompt) + 7, 151936)
    assert np.isfinite(logits).all()
    assert logits[len(prompt) - 1 :].argmax(axis=1).tolist() == out
