"""The transformer ops against plain numpy / transformers references, and a YaRN model end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hf_fixtures import make_qwen2_checkpoint
from transformers import Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from qwenlite.backends.cpu import PARALLEL_ATTENTION_WORK, CPUBackend
from qwenlite.converters.hf_to_gguf import convert
from qwenlite.errors import QwenliteError
from qwenlite.kernels.ops import rms_norm, rope_neox, rope_tables, swiglu
from qwenlite.runtime.kvcache import KVCache

RNG = np.random.default_rng(0)


def test_rms_norm() -> None:
    x = RNG.standard_normal((5, 96)).astype(np.float32)
    w = RNG.standard_normal(96).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(rms_norm(x, w, 1e-6), ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("n_tokens", [3, 9])  # serial and parallel rows
def test_swiglu(n_tokens: int) -> None:
    g, u = RNG.standard_normal((2, n_tokens, 70)).astype(np.float32)
    ref = g / (1 + np.exp(-g.astype(np.float64))) * u
    np.testing.assert_allclose(swiglu(g, u), ref, rtol=1e-5, atol=1e-6)


def test_swiglu_exp_over_the_whole_range() -> None:
    """The vectorized exp inside silu: within 5e-7 relative of float64 everywhere silu is not ~0,
    including the clamped tails (|x| up to 1e4) and ties where rounding picks the next power of 2."""
    x = np.concatenate([np.linspace(-100, 100, 400_001), [-1e4, -88.0, -87.5, 87.5, 1e4, 0.0]]).astype(np.float32)
    x = x.reshape(1, -1)
    got = swiglu(x, np.ones_like(x))[0]
    ref = x[0] / (1 + np.exp(-x[0].astype(np.float64)))
    big = np.abs(ref) > 1e-30
    assert np.all(np.isfinite(got))
    assert (np.abs(got - ref)[big] / np.abs(ref[big])).max() < 5e-7
    assert np.abs(got[~big]).max() < 1e-30


@pytest.mark.parametrize(
    ("rope", "factor", "orig"), [("default", 1.0, 0), ("linear", 4.0, 0), ("yarn", 4.0, 32768), ("yarn", 2.0, 512)]
)
def test_rope_tables_match_transformers(rope: str, factor: float, orig: int) -> None:
    params = {"rope_type": rope, "rope_theta": 1e6}
    if rope != "default":
        params |= {"factor": factor, "original_max_position_embeddings": orig or 32768}
    cfg = Qwen2Config(hidden_size=896, num_attention_heads=14, max_position_embeddings=131072, rope_parameters=params)
    if rope == "default":
        inv_freq = 1.0 / (1e6 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
        attn_factor = 1.0
    else:
        inv_freq, attn_factor = ROPE_INIT_FUNCTIONS[rope](cfg, "cpu")
    cos, sin = rope_tables(70000, 64, 1e6, "none" if rope == "default" else rope, factor, orig)
    # Both sides work in float32: an ulp of difference in one frequency (two pow implementations) moves
    # the angle by position x ulp, and angles of ~7e4 rad carry ~4e-3 of rounding, so the tolerance grows
    # with the position. A wrong formula (scaling, ramp, mscale) is off by far more than these.
    for step, stop, atol in ((7, 4096, 3e-5), (997, 70000, 5e-4)):
        pos = torch.arange(0, stop, step, dtype=torch.float32)
        ang = pos[:, None] * inv_freq[None, :].float()
        np.testing.assert_allclose(cos[:stop:step], (ang.cos() * attn_factor).numpy(), atol=atol)
        np.testing.assert_allclose(sin[:stop:step], (ang.sin() * attn_factor).numpy(), atol=atol)


def test_rope_neox_matches_transformers() -> None:
    T, H, hd = 6, 3, 16
    x = RNG.standard_normal((T, H * hd)).astype(np.float32)
    cos, sin = rope_tables(64, hd, 10000.0)
    ours = x.copy()
    rope_neox(ours, H, np.arange(5, 5 + T), cos, sin)
    c = torch.from_numpy(np.concatenate([cos[5 : 5 + T]] * 2, axis=1))[None]
    s = torch.from_numpy(np.concatenate([sin[5 : 5 + T]] * 2, axis=1))[None]
    q = torch.from_numpy(x.reshape(T, H, hd).transpose(1, 0, 2).copy())[None]
    ref, _ = apply_rotary_pos_emb(q, q, c, s)
    np.testing.assert_allclose(ours, ref[0].numpy().transpose(1, 0, 2).reshape(T, H * hd), atol=1e-5)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float64)


def _q8_0(x: np.ndarray) -> np.ndarray:
    """ggml's Q8_0 round trip of rows (blocks of 32 along the last axis, f16 scales, C roundf)."""
    b = x.reshape(*x.shape[:-1], -1, 32).astype(np.float32)
    d = np.abs(b).max(-1, keepdims=True) / np.float32(127)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
    q = np.clip(np.sign(b * inv) * np.floor(np.abs(b * inv) + 0.5), -127, 127)
    return (q * d.astype(np.float16).astype(np.float32)).reshape(x.shape).astype(np.float64)


_ROUND = {"f32": lambda x: x.astype(np.float64), "f16": _f16, "q8_0": _q8_0}


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize(("n_head", "n_kv", "hd", "pos0", "T"), [(6, 2, 32, 4, 5), (8, 2, 64, 200, 9)])
def test_causal_gqa_attention_over_cache(kind: str, n_head: int, n_kv: int, hd: int, pos0: int, T: int) -> None:
    """Every cache type against float64 attention over the same rounded keys and values, two sequences
    in one batch (each token sees only its own); both drivers (the small case runs serially)."""
    n_ctx = pos0 + T + 3
    small = n_head * hd * 2 * (2 * T * pos0 + T * (T - 1) + 2 * T) < PARALLEL_ATTENTION_WORK
    assert small == (pos0 == 4)
    cache = KVCache(CPUBackend(), 1, n_kv, hd, 2, n_ctx, kind)
    keys = RNG.standard_normal((2, pos0 + T, n_kv * hd)).astype(np.float32)
    vals = RNG.standard_normal((2, pos0 + T, n_kv * hd)).astype(np.float32)
    seq = np.repeat([0, 1], pos0 + T)
    pos = np.tile(np.arange(pos0 + T), 2)
    cache.store(0, keys.reshape(-1, n_kv * hd), vals.reshape(-1, n_kv * hd), seq, pos)
    q = RNG.standard_normal((2 * T, n_head * hd)).astype(np.float32)
    qseq, qpos = np.repeat([1, 0], T), np.tile(np.arange(pos0, pos0 + T), 2)
    out = cache.attend(0, q, qseq, qpos, n_head)
    rk, rv = _ROUND[kind](keys), _ROUND[kind](vals)
    for t in range(2 * T):
        s_, p_ = qseq[t], qpos[t]
        for h in range(n_head):
            kv = h // (n_head // n_kv)
            k = rk[s_, : p_ + 1, kv * hd : (kv + 1) * hd]
            v = rv[s_, : p_ + 1, kv * hd : (kv + 1) * hd]
            sc = k @ q[t, h * hd : (h + 1) * hd] / np.sqrt(hd)
            p = np.exp(sc - sc.max())
            ref = (p / p.sum()) @ v
            np.testing.assert_allclose(out[t, h * hd : (h + 1) * hd], ref, rtol=1e-5, atol=1e-5)


def test_q8_0_keys_are_stored_without_their_rotated_bias() -> None:
    """Keys = RoPE(W h + b) with a bias 20x the rest (Qwen2's k_proj): the q8_0 cache quantizes only
    k - R(pos) b and adds q . R(pos) b exactly, so its attention stays within Q8_0 rounding of the
    bias-free part, many times closer than Q8_0 of the whole key."""
    hd, n_kv, n = 64, 2, 40
    cos, sin = rope_tables(n, hd, 10000.0)
    bias = (RNG.standard_normal(n_kv * hd) * 40).astype(np.float32)
    wh = RNG.standard_normal((n, n_kv * hd)).astype(np.float32) * 2
    keys = wh + bias
    rope_neox(keys, n_kv, np.arange(n), cos, sin)
    rb = np.tile(bias, (n, 1))
    rope_neox(rb, n_kv, np.arange(n), cos, sin)
    vals = RNG.standard_normal((n, n_kv * hd)).astype(np.float32)
    q = (RNG.standard_normal((1, 2 * hd)) * 0.2).astype(np.float32)
    cache = KVCache(CPUBackend(), 1, n_kv, hd, 1, n, "q8_0", k_bias=bias[None], rope=(cos, sin))
    cache.store(0, keys, vals, np.zeros(n, np.int64), np.arange(n))
    ours = cache.attend(0, q, np.array([0]), np.array([n - 1]), 2)[0]

    def attend(k: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = []
        for h in range(2):
            kk, vv = k[:, h * hd : (h + 1) * hd], v[:, h * hd : (h + 1) * hd]
            sc = kk @ q[0, h * hd : (h + 1) * hd].astype(np.float64) / np.sqrt(hd)
            p = np.exp(sc - sc.max())
            out.append((p / p.sum()) @ vv)
        return np.concatenate(out)

    split = attend(_q8_0(keys - rb) + rb, _q8_0(vals))
    np.testing.assert_allclose(ours, split, rtol=1e-4, atol=1e-4)
    exact_keys = attend(keys.astype(np.float64), _q8_0(vals))  # isolates what the keys' rounding does
    whole = attend(_q8_0(keys), _q8_0(vals))
    assert np.linalg.norm(ours - exact_keys) < np.linalg.norm(whole - exact_keys) / 4


def test_kv_cache_truncate_copy_and_sizes() -> None:
    be = CPUBackend()
    sizes = {k: KVCache(be, 2, 2, 64, 1, 8, k).bytes_per_token for k in ("f32", "f16", "q8_0")}
    assert sizes == {"f32": 2048, "f16": 1024, "q8_0": 544}
    assert sizes["q8_0"] / sizes["f32"] <= 0.27
    cache = KVCache(be, 1, 1, 32, 3, 8, "f32")
    x = RNG.standard_normal((5, 32)).astype(np.float32)
    cache.store(0, x, x, np.zeros(5, np.int64), np.arange(5))
    cache.commit(np.zeros(5, np.int64), np.arange(5))
    cache.copy_prefix(0, 2, 3)
    assert cache.length(2) == 3 and cache.length(1) == 0
    np.testing.assert_array_equal(cache.storage.k[0, 2, 0, :3], x[:3])
    q = RNG.standard_normal((1, 32)).astype(np.float32)
    a = cache.attend(0, q, np.array([0]), np.array([2]), 1)
    b = cache.attend(0, q, np.array([2]), np.array([2]), 1)
    np.testing.assert_array_equal(a, b)
    cache.truncate(0, 2)
    assert cache.length(0) == 2
    with pytest.raises(QwenliteError, match="cannot copy 4"):
        cache.copy_prefix(0, 1, 4)
    with pytest.raises(QwenliteError, match="sequence 3 does not exist"):
        cache.truncate(3, 0)
    with pytest.raises(QwenliteError, match="unknown KV cache type 'q4_1'"):
        KVCache(be, 1, 1, 32, 1, 8, "q4_1")


def test_yarn_model_equals_transformers(tmp_path: Path) -> None:
    """A checkpoint with YaRN scaling: converted, loaded, and run past its original context."""
    import qwenlite

    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
    hf_dir = make_qwen2_checkpoint(tmp_path, rope_parameters=rope, max_position_embeddings=64)
    out = convert(hf_dir, tmp_path / "yarn.gguf", "f32", progress=False)
    from transformers import Qwen2ForCausalLM

    hf = Qwen2ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids = list(RNG.integers(0, 300, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    with qwenlite.load(out, kv_type="f32") as m:  # the exact forward math; cache rounding is tested apart
        assert m.config.rope_scaling == "yarn" and m.config.rope_orig_ctx == 16
        ours = m.logits(ids)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * np.abs(ref).max())
