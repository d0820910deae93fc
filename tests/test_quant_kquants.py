"""Q4_K, Q5_K and Q6_K against independent oracles.

- Dequantization: ``gguf.quants.dequantize`` (bitwise float32) on random blocks, on blocks built from
  known scales with a packer written here from the format description, and on the real model's
  Q4_K / Q6_K tensors.
- Quantization: ggml itself. Known-answer blocks in ``tests/data/kquant_known.npz`` were produced by
  ggml's ``quantize_row_q{4,5,6}_K_ref`` (the code ``ggml_quantize_chunk`` runs without an importance
  matrix); the ``peer`` tier re-derives them and compares many more rows live through libggml.
  Always-on properties (round-trip RMSE, near-idempotence, special rows) catch gross breakage
  without the peer.
- Dot products: float64 dot of gguf-dequantized weights with the dequantized Q8_K activations
  (both are exact integer sums, so only rounding of the block scales separates them), and the
  unquantized activations within the Q8_K error bound.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from qwenlite.errors import QwenliteError
from qwenlite.quant import q4_k, q5_k, q6_k

MODULES = [q4_k, q5_k, q6_k]
IDS = ["q4_k", "q5_k", "q6_k"]
KNOWN = Path(__file__).parent / "data" / "kquant_known.npz"

# RMSE / std of x - dequant(quant(x)) on N(0, 1) rows. Measured 0.069, 0.037, 0.018 with ggml's
# reference quantizers; the bounds leave ~10% slack, far below what a wrong level or scale gives.
RMSE_BOUND = {"q4_k": 0.076, "q5_k": 0.041, "q6_k": 0.020}


def _quant(mod, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.zeros(x.size // 256 * mod.TYPE_SIZE, np.uint8)
    mod.quantize_row(x, out)
    return out


def _deq(mod, raw: np.ndarray) -> np.ndarray:
    out = np.empty(raw.size // mod.TYPE_SIZE * 256, np.float32)
    mod.dequantize_row(np.ascontiguousarray(raw), out)
    return out


def _oracle_deq(mod, raw: np.ndarray) -> np.ndarray:
    return dequantize(raw, mod.TYPE).reshape(-1).astype(np.float32)


def _assert_bitwise(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype == np.float32
    bad = np.nonzero(a.view(np.uint32) != b.view(np.uint32))[0]
    assert bad.size == 0, f"{bad.size} values differ, first at {bad[:5]}: {a[bad[:5]]} vs {b[bad[:5]]}"


def _f16_positions(mod) -> list[int]:
    return [208] if mod is q6_k else [0, 2]


def _random_blocks(mod, rng: np.random.Generator, nb: int) -> np.ndarray:
    """Random bytes with finite f16 scales: positive, negative, zero and subnormal d / dmin."""
    raw = rng.integers(0, 256, (nb, mod.TYPE_SIZE), dtype=np.uint8)
    for pos in _f16_positions(mod):
        h = rng.integers(0, 0x7C00, nb, dtype=np.uint16) | (rng.integers(0, 2, nb, dtype=np.uint16) << 15)
        h[::7] = 0
        h[1::7] = 0x8000
        h[2::7] = rng.integers(1, 0x400, h[2::7].size, dtype=np.uint16)  # subnormal
        raw[:, pos : pos + 2] = h.view(np.uint8).reshape(nb, 2)
    return raw.reshape(-1)


# ------------------------------------------------------------------------------------------------
# layout and dequantization


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_layout_constants(mod) -> None:
    block, size = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(mod.TYPE))]
    assert (mod.BLOCK_SIZE, mod.TYPE_SIZE) == (block, size) == (256, mod.TYPE_SIZE)
    assert mod.ACT == "q8_k"


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_dequantize_random_blocks_bitwise(mod) -> None:
    raw = _random_blocks(mod, np.random.default_rng(1), 300)
    _assert_bitwise(_deq(mod, raw), _oracle_deq(mod, raw))


def _pack_scales_k4(sc: list[int], m: list[int]) -> np.ndarray:
    """12 scale bytes from eight 6-bit (scale, min) pairs, written from the format description."""
    b = np.zeros(12, np.uint8)
    for j in range(4):
        b[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6)
        b[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6)
        b[j + 8] = (sc[j + 4] & 15) | ((m[j + 4] & 15) << 4)
    return b


@pytest.mark.parametrize("mod", [q4_k, q5_k], ids=["q4_k", "q5_k"])
def test_dequantize_known_scales_all_subblocks(mod) -> None:
    """Every sub-block (j >= 4 included) gets the scale and min it was packed with."""
    rng = np.random.default_rng(2)
    d, dmin = np.float16(0.5), np.float16(0.25)
    nbits = 4 if mod is q4_k else 5
    for _ in range(40):
        sc = [int(v) for v in rng.integers(0, 64, 8)]
        m = [int(v) for v in rng.integers(0, 64, 8)]
        q = rng.integers(0, 1 << nbits, 256)
        blk = np.zeros(mod.TYPE_SIZE, np.uint8)
        blk[0:2] = np.array([d]).view(np.uint8)
        blk[2:4] = np.array([dmin]).view(np.uint8)
        blk[4:16] = _pack_scales_k4(sc, m)
        qs = 16 if mod is q4_k else 48
        for c in range(4):
            lo, hi = q[64 * c : 64 * c + 32], q[64 * c + 32 : 64 * c + 64]
            blk[qs + 32 * c : qs + 32 * c + 32] = (lo & 15) | ((hi & 15) << 4)
            if mod is q5_k:
                blk[16:48] |= ((lo >> 4) << (2 * c)).astype(np.uint8) | ((hi >> 4) << (2 * c + 1)).astype(np.uint8)
        expect = np.array(
            [
                np.float32(d) * np.float32(sc[i // 32]) * np.float32(q[i]) - np.float32(dmin) * np.float32(m[i // 32])
                for i in range(256)
            ],
            np.float32,
        )
        got = _deq(mod, blk)
        np.testing.assert_array_equal(got, expect)
        _assert_bitwise(got, _oracle_deq(mod, blk))


def test_dequantize_q6_k_known_scales() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        sc = rng.integers(-128, 128, 16).astype(np.int8)
        q = rng.integers(0, 64, 256)
        blk = np.zeros(210, np.uint8)
        for half in range(2):
            v = q[128 * half : 128 * half + 128]
            blk[64 * half : 64 * half + 32] = (v[0:32] & 15) | ((v[64:96] & 15) << 4)
            blk[64 * half + 32 : 64 * half + 64] = (v[32:64] & 15) | ((v[96:128] & 15) << 4)
            blk[128 + 32 * half : 160 + 32 * half] = (
                (v[0:32] >> 4) | ((v[32:64] >> 4) << 2) | ((v[64:96] >> 4) << 4) | ((v[96:128] >> 4) << 6)
            )
        blk[192:208] = sc.view(np.uint8)
        blk[208:210] = np.array([np.float16(-0.125)]).view(np.uint8)
        expect = np.float32(-0.125) * sc[np.arange(256) // 16].astype(np.float32) * (q - 32).astype(np.float32)
        got = _deq(q6_k, blk)
        np.testing.assert_array_equal(got, expect)
        _assert_bitwise(got, _oracle_deq(q6_k, blk))


def test_dequantize_real_tensors_bitwise(real_model_path: Path) -> None:
    if not Path(real_model_path).exists():
        pytest.skip("real model not available")
    reader = gguf.GGUFReader(str(real_model_path))
    mods = {"Q4_K": q4_k, "Q6_K": q6_k}
    seen = {"Q4_K": 0, "Q6_K": 0}
    for t in reader.tensors:
        name = t.tensor_type.name
        if name not in mods or seen[name] >= 3:
            continue
        seen[name] += 1
        mod = mods[name]
        raw = np.asarray(t.data).reshape(-1).view(np.uint8)[: 4000 * mod.TYPE_SIZE]
        _assert_bitwise(_deq(mod, raw), _oracle_deq(mod, raw))
    assert seen == {"Q4_K": 3, "Q6_K": 3}


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_bad_buffers_raise(mod) -> None:
    with pytest.raises(QwenliteError):
        mod.dequantize_row(np.zeros(mod.TYPE_SIZE - 1, np.uint8), np.empty(256, np.float32))
    with pytest.raises(QwenliteError):
        mod.dequantize_row(np.zeros(mod.TYPE_SIZE, np.uint8), np.empty(100, np.float32))
    with pytest.raises(QwenliteError):
        mod.quantize_row(np.zeros(512, np.float32), np.zeros(mod.TYPE_SIZE, np.uint8))
    with pytest.raises(QwenliteError):
        mod.dot_row(
            np.zeros(mod.TYPE_SIZE, np.uint8), np.zeros(512, np.int8), np.zeros(2, np.float32), np.zeros(32, np.int32)
        )


# ------------------------------------------------------------------------------------------------
# quantization


@pytest.mark.parametrize("mod,key", list(zip(MODULES, IDS, strict=True)), ids=IDS)
def test_quantize_roundtrip_rmse(mod, key) -> None:
    x = np.random.default_rng(4).standard_normal(256 * 64).astype(np.float32)
    y = _oracle_deq(mod, _quant(mod, x))
    rmse = float(np.sqrt(np.mean((x - y) ** 2)))
    assert rmse < RMSE_BOUND[key]
    # Better than the plain round-to-nearest grid over each block's range would be far too weak a
    # check; instead every value must also sit within a few steps of its input.
    assert float(np.abs(x - y).max()) < 12 * RMSE_BOUND[key]


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_quantize_nearly_idempotent(mod) -> None:
    """Re-quantizing dequantized values moves them far less than the first quantization did."""
    x = np.random.default_rng(5).standard_normal(256 * 32).astype(np.float32)
    y = _oracle_deq(mod, _quant(mod, x))
    y2 = _oracle_deq(mod, _quant(mod, y))
    first = np.sqrt(np.mean((x - y) ** 2))
    second = np.sqrt(np.mean((y - y2) ** 2))
    assert second <= 0.15 * first


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_quantize_special_rows(mod) -> None:
    zeros = _quant(mod, np.zeros(512, np.float32))
    assert not zeros.any()
    for c in (0.37, -2.5, 12.0):
        y = _oracle_deq(mod, _quant(mod, np.full(256, c, np.float32)))
        np.testing.assert_allclose(y, c, rtol=2e-3)
    x = (np.random.default_rng(6).standard_normal(256) * 1e-30).astype(np.float32)
    y = _oracle_deq(mod, _quant(mod, x))  # f16 scales underflow: everything decodes to 0
    assert np.all(np.isfinite(y)) and np.abs(y).max() <= 1e-30 * 10


def test_known_answer_blocks() -> None:
    """Bytes recorded from ggml's reference quantizers for random and adversarial rows."""
    data = np.load(KNOWN)
    for key, mod in zip(IDS, MODULES, strict=True):
        for r, x in enumerate(data["inputs"]):
            got = _quant(mod, x)
            want = data[key][r]
            assert np.array_equal(got, want), (
                f"{key} row {r} ({data['names'][r]}): bytes differ at {np.nonzero(got != want)[0][:8]}"
            )


# ------------------------------------------------------------------------------------------------
# dot products


def _q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q8_K reference (ggml quantize_row_q8_K_ref semantics), vectorized in float32."""
    xb = np.asarray(x, np.float32).reshape(-1, 256)
    mx = xb[np.arange(len(xb)), np.argmax(np.abs(xb), axis=1)]
    aq = np.zeros(xb.shape, np.int8)
    ad = np.zeros(len(xb), np.float32)
    nz = mx != 0
    iscale = (np.float32(-127.0) / mx[nz]).astype(np.float32)
    v = np.rint((iscale[:, None] * xb[nz]).astype(np.float32))  # |v| <= 127: rint == nearest_int
    aq[nz] = np.minimum(127, v).astype(np.int8)
    ad[nz] = np.float32(1.0) / iscale
    asum = aq.reshape(-1, 16).astype(np.int32).sum(axis=1).astype(np.int32)
    return aq.reshape(-1), ad, asum


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_dot_row_matches_dequantized(mod) -> None:
    rng = np.random.default_rng(7)
    n = 256 * 19
    for r in range(12):
        w = rng.standard_normal(n) * np.repeat(np.exp(rng.uniform(-2, 2, n // 32)), 32)
        if r % 3 == 0:
            w += 0.5  # nonzero means exercise the min term
        raw = _quant(mod, w.astype(np.float32))
        x = (rng.standard_normal(n) * np.repeat(np.exp(rng.uniform(-3, 3, n // 256)), 256)).astype(np.float32)
        aq, ad, asum = _q8_k(x)
        wd = _oracle_deq(mod, raw).astype(np.float64)
        a = aq.astype(np.float64) * np.repeat(ad.astype(np.float64), 256)
        got = float(mod.dot_row(raw, aq, ad, asum))
        # Both sides are exact integer sums per block; they differ only by the float32 rounding of
        # d_w*d_a (and of gguf's per-value products), i.e. a few ulp of sum|w*a|.
        scale = float(np.abs(wd * a).sum())
        assert abs(got - float(wd @ a)) <= 1e-6 * scale
        # Against the unquantized activations: Q8_K rounds each value by at most d_a/2.
        err_bound = float(np.abs(wd).reshape(-1, 256).sum(axis=1) @ (np.abs(ad.astype(np.float64)) / 2)) * 1.01
        assert abs(got - float(wd @ x.astype(np.float64))) <= err_bound + 1e-6 * scale


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_dot_row_extreme_integers(mod) -> None:
    """All weights and activations at their extremes: int32 accumulation must not overflow."""
    n = 256 * 4
    raw = _random_blocks(mod, np.random.default_rng(8), n // 256)
    raw = raw.reshape(-1, mod.TYPE_SIZE)
    if mod is q6_k:
        raw[:, :192] = 0  # q = -32 everywhere
        raw[:, 192:208] = np.uint8(0x80)  # scale -128
        raw[:, 208:210] = np.array([np.float16(1.0)]).view(np.uint8)
    else:
        raw[:, 4:] = 0xFF  # q and 6-bit scales / mins all at their maximum
        raw[:, 0:4] = np.array([np.float16(1.0), np.float16(1.0)]).view(np.uint8)
    raw = raw.reshape(-1)
    aq = np.full(n, -128, np.int8)
    aq[::2] = 127
    ad = np.full(n // 256, 1.0, np.float32)
    asum = aq.reshape(-1, 16).astype(np.int32).sum(axis=1).astype(np.int32)
    want = float(_oracle_deq(mod, raw).astype(np.float64) @ aq.astype(np.float64))
    assert float(mod.dot_row(raw, aq, ad, asum)) == pytest.approx(want, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# ggml oracle (libggml from the llama.cpp peer)


def _adversarial_rows(rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    n = 1024
    rows = [
        ("gauss", rng.standard_normal(n)),
        ("subblock-scaled", rng.standard_normal(n) * np.repeat(np.exp(rng.uniform(-6, 6, n // 16)), 16)),
        ("shifted", rng.standard_normal(n) + np.repeat(rng.uniform(-3, 3, n // 32), 32)),
        ("all-zero", np.zeros(n)),
        ("constant", np.full(n, 0.37)),
        ("negative-constant", np.full(n, -2.5)),
        ("uniform-positive", rng.uniform(0, 1, n)),
        ("grid", rng.integers(-20, 20, n) * 0.125),
        ("tiny", rng.standard_normal(n) * 1e-30),
        ("huge", rng.standard_normal(n) * 1e35),
        ("huge-range", rng.standard_normal(n) * np.exp(rng.uniform(-40, 40, n))),
        ("sparse", rng.standard_normal(n) * (rng.random(n) < 0.05)),
    ]
    x = rng.standard_normal(n) * 0.01
    x[77] = 50.0
    x[600] = -50.0
    rows.append(("outliers", x))
    x = rng.standard_normal(n)
    x[:32] = 0
    x[64:96] = 1e-9
    rows.append(("dead-subblocks", x))
    return [(name, v.astype(np.float32)) for name, v in rows]


@pytest.mark.peer
@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_quantize_matches_ggml(mod) -> None:
    peer = pytest.importorskip("peer")
    if not peer.peer_available():
        pytest.skip("llama.cpp peer not built (run `make peer`)")
    rng = np.random.default_rng(9)
    rows = _adversarial_rows(rng)
    rows.append(("laplace-many", rng.laplace(size=256 * 2000).astype(np.float32)))
    for name, x in rows:
        want = np.frombuffer(peer.ggml_quantize(int(mod.TYPE), x), np.uint8)
        got = _quant(mod, x)
        bad = np.nonzero((got != want).reshape(-1, mod.TYPE_SIZE).any(axis=1))[0]
        assert bad.size == 0, f"{name}: {bad.size} blocks differ from ggml, first {bad[:5]}"


@pytest.mark.peer
def test_known_answer_data_is_ggml() -> None:
    """The recorded known-answer bytes are what libggml produces today."""
    peer = pytest.importorskip("peer")
    if not peer.peer_available():
        pytest.skip("llama.cpp peer not built (run `make peer`)")
    data = np.load(KNOWN)
    for key, mod in zip(IDS, MODULES, strict=True):
        for r, x in enumerate(data["inputs"]):
            want = np.frombuffer(peer.ggml_quantize(int(mod.TYPE), x), np.uint8)
            assert np.array_equal(data[key][r], want), f"{key} row {r}"


@pytest.mark.parametrize("mod", MODULES, ids=IDS)
def test_dot_row_with_runtime_activation_quantizer(mod) -> None:
    """The runtime's Q8_K rows (qwenlite.quant.activation) feed dot_row exactly like the reference."""
    from qwenlite.quant.activation import quantize_q8_k

    rng = np.random.default_rng(10)
    n = 256 * 6
    raw = _quant(mod, rng.standard_normal(n).astype(np.float32))
    x = rng.standard_normal(n).astype(np.float32)
    aq, ad, asum = np.empty(n, np.int8), np.empty(n // 256, np.float32), np.empty(n // 16, np.int32)
    quantize_q8_k(x, aq, ad, asum)
    ref = _q8_k(x)
    np.testing.assert_array_equal(aq, ref[0])
    assert mod.dot_row(raw, aq, ad, asum) == mod.dot_row(raw, *ref)
