"""Embeddings: the real 0.5B model's final normed hidden states, pooled, against transformers'
``last_hidden_state`` (Qwen2Model applies the final norm) on the checkpoint dequantized from the same
GGUF; batched against one text at a time; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from qwenlite.errors import QwenliteError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.", "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "Le cœur a ses raisons que la raison ne connaît point.", "Der Zug nach München fährt um 8 Uhr ab.",
    "El perro corre por el parque.", "今日は天気がいいですね。", "机器学习模型在边缘设备上运行。",
    "오늘 저녁에 뭐 먹을래?",
    "Привет, как дела?", "مرحبا بالعالم", "नमस्ते दुनिया", "Γειά σου κόσμε", "Merhaba dünya, nasılsın?",
    "SELECT name FROM users WHERE id = 42;", "🦙 emoji and ümlauts", "x", "1 2 3 4 5 6 7 8 9 10",
    "Tiếng Việt có dấu", "שלום עולם", "import numpy as np\nprint(np.arange(10).sum())",
]


def _hf_states(hf_model, ids: list[int]) -> np.ndarray:  # noqa: ANN001
    import torch

    with torch.no_grad():
        return hf_model.model(torch.tensor([ids])).last_hidden_state[0].float().numpy()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_embeddings_match_transformers(real_model, hf_model, pooling: str) -> None:  # noqa: ANN001
    got = real_model.embed(TEXTS, pooling=pooling)
    assert got.shape == (len(TEXTS), real_model.config.n_embd) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-5)
    cos = []
    for text, v in zip(TEXTS, got):
        h = _hf_states(hf_model, real_model.tokenize(text))
        ref = {"mean": h.mean(axis=0), "last": h[-1], "cls": h[0]}[pooling]
        cos.append(float(v @ _unit(ref)))
    # One text of the 20 is allowed below 0.999: 'שלום עולם' (3 tokens), whose second token's state is
    # ill-conditioned: every 8-bit activation or f16 cache rounding moves it. Our KV cache types give
    # cosines of 0.75 (f32), 0.61 (f16) and 0.71 (q8_0) at that position against transformers;
    # llama.cpp on the same file gives 0.73 (f32 cache) and 0.63 (f16), and ours against llama.cpp's is
    # 0.9987 (f16). On float weights with an f32 cache every text is >= 0.999
    # (test_embeddings_on_float_weights). With "last" two texts fall to 0.9988 and 0.9949 here.
    low = [c for c in cos if c < 0.999]
    allowed, floor = {"mean": (1, 0.85), "last": (2, 0.99), "cls": (0, 0.999)}[pooling]
    assert len(low) <= allowed and min(cos) >= floor, cos


def test_unpooled_states_and_no_normalization(real_model, hf_model) -> None:  # noqa: ANN001
    states = real_model.embed(TEXTS[:3], pooling="none", normalize=False)
    for text, h in zip(TEXTS[:3], states):  # well-conditioned texts: every token agrees
        ref = _hf_states(hf_model, real_model.tokenize(text))
        assert h.shape == ref.shape
        cos = np.sum(_unit(h) * _unit(ref), axis=1)
        assert cos.min() >= 0.999, cos
    raw = real_model.embed(TEXTS[0], normalize=False)[0]
    np.testing.assert_allclose(raw, states[0].mean(axis=0), rtol=1e-5, atol=1e-5)


def test_batched_equals_one_at_a_time(real_model) -> None:  # noqa: ANN001
    batched = real_model.embed(TEXTS)
    alone = np.stack([real_model.embed(t)[0] for t in TEXTS])
    assert np.array_equal(batched, alone)
    ids = [real_model.tokenize(t) for t in TEXTS[:2]]
    assert np.array_equal(real_model.embed(ids), batched[:2])  # token lists are accepted too


def test_bad_arguments(real_model) -> None:  # noqa: ANN001
    with pytest.raises(QwenliteError, match="pooling must be one of mean, last, cls, none"):
        real_model.embed("x", pooling="max")
    with pytest.raises(QwenliteError, match="non-empty list"):
        real_model.embed([])
    with pytest.raises(QwenliteError, match="text 1 is empty"):
        real_model.embed(["a", ""])
    assert real_model.default_pooling == "mean"  # the file has no pooling_type key


def test_cli_embed(real_model_path, real_model, tmp_path) -> None:  # noqa: ANN001
    f = tmp_path / "texts.txt"
    one_line = [TEXTS[0], TEXTS[2], TEXTS[5]]
    f.write_text("\n".join(one_line) + "\n\n", encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "qwenlite", "embed", "-m", str(real_model_path), "-f", str(f),
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    got = np.array([d["embedding"] for d in doc["data"]], np.float32)
    np.testing.assert_allclose(got, real_model.embed(one_line), atol=1e-6)
    r = subprocess.run([sys.executable, "-m", "qwenlite", "embed", "-m", str(real_model_path), "-p", TEXTS[0],
                        "--pooling", "last"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    line = np.array(r.stdout.split(), np.float32)
    np.testing.assert_allclose(line, real_model.embed(TEXTS[0], pooling="last")[0], atol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_embeddings_on_float_weights(real_task_gguf, hf_model, pooling: str) -> None:  # noqa: ANN001
    """The trunk converted to f32 (the sequence-classifier file of tests/conftest.py: the same trunk as
    the causal LM, whose transformers model is the oracle), run with an f32 cache: no 8-bit activations
    and no f16 rounding, so every text of the multilingual set agrees to >= 0.999."""
    import qwenlite

    _, path = real_task_gguf("sequence-classification", "f32")
    with qwenlite.load(path, n_threads=2, kv_type="f32") as m:
        got = m.embed(TEXTS, pooling=pooling)
        ids = [m.tokenize(t) for t in TEXTS]
    cos = []
    for text_ids, v in zip(ids, got):
        h = _hf_states(hf_model, text_ids)
        ref = {"mean": h.mean(axis=0), "last": h[-1], "cls": h[0]}[pooling]
        cos.append(float(v @ _unit(ref)))
    print(f"{pooling}: min cosine {min(cos):.6f}")
    assert min(cos) >= 0.999, cos
