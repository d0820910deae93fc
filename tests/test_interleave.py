"""The interleaved (x8) weight layout: packing is lossless, and every x8 dot kernel gives what the
row-major kernel of the same format gives (bit for bit for the K-quants, whose x8 kernels do the
same integer and float operations in the same order; to float64 rounding for the 32-value formats).

The row-major kernels themselves are checked against gguf-dequantized float64 references in
test_matmul.py, so this closes the chain x8 -> row-major -> gguf.
"""

import numpy as np
import pytest
from numba import njit

from qwenlite import quant
from qwenlite.backends.cpu import CPUBackend
from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType
from qwenlite.kernels.matmul import X8_TYPES, matmul
from qwenlite.model.weights import Linear
from qwenlite.quant import interleave
from qwenlite.quant.activation import quantize_rows_q8_0, quantize_rows_q8_k

X8 = [t for t, m in quant.FORMATS.items() if hasattr(m, "dot_rows_x8")]
K_QUANTS = {GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K}


def _weights(qtype: GGMLType, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Quantized rows of heavy-tailed values (outliers exercise the large scales and mins)."""
    x = rng.standard_t(3, size=(n, k)).astype(np.float32) * rng.uniform(0.01, 2.0, size=(n, 1)).astype(np.float32)
    return quant.quantize(x, int(qtype))


def _acts(fmt, t: int, k: int, rng: np.random.Generator):
    a = (rng.standard_normal((t, k)) * rng.uniform(0.1, 5.0, size=(t, 1))).astype(np.float32)
    a[:, :: 97] *= 20.0  # activation outliers, as real models have
    return quantize_rows_q8_k(a) if fmt.ACT == "q8_k" else quantize_rows_q8_0(a)


def _dot_x8(fmt, w8, aq, ad, asum, nb):
    """All rows of ``w8`` against the activation rows, through ``dot_rows_x8`` with 1 and 4 tokens."""
    out = np.full((aq.shape[0], w8.shape[0] * 8), np.nan, np.float32)
    kernel = fmt.dot_rows_x8

    @njit
    def run(w8, aq, ad, asum, out):
        t = 0
        while t + 4 <= aq.shape[0]:
            for g in range(w8.shape[0]):
                kernel(
                    w8[g], (aq[t], aq[t + 1], aq[t + 2], aq[t + 3]), (ad[t], ad[t + 1], ad[t + 2], ad[t + 3]),
                    (asum[t], asum[t + 1], asum[t + 2], asum[t + 3]), nb, (out[t], out[t + 1], out[t + 2], out[t + 3]),
                    8 * g,
                )
            t += 4
        while t < aq.shape[0]:
            for g in range(w8.shape[0]):
                kernel(w8[g], (aq[t],), (ad[t],), (asum[t],), nb, (out[t],), 8 * g)
            t += 1

    run(w8, aq, ad, asum, out)
    return out


def test_some_formats_have_x8_kernels() -> None:
    assert GGMLType.Q4_K in X8


@pytest.mark.parametrize("qtype", X8, ids=lambda t: t.name)
def test_pack_unpack_roundtrip(qtype: GGMLType) -> None:
    fmt = quant.FORMATS[qtype]
    rng = np.random.default_rng(int(qtype))
    w = rng.integers(0, 256, size=(24, 2 * fmt.TYPE_SIZE), dtype=np.uint8)
    fields = interleave.field_table(fmt.FIELDS, fmt.TYPE_SIZE)
    w8 = interleave.pack(w, fields, fmt.TYPE_SIZE)
    assert w8.shape == (3, 16 * fmt.TYPE_SIZE)
    assert sorted(w8.ravel().tolist()) == sorted(w.ravel().tolist())  # same bytes, moved
    ids = np.array([23, 0, 9, 9, 16])
    np.testing.assert_array_equal(interleave.unpack_rows(w8, ids, fields, fmt.TYPE_SIZE), w[ids])


@pytest.mark.parametrize("qtype", X8, ids=lambda t: t.name)
@pytest.mark.parametrize("n_tokens", [1, 6])
def test_x8_kernel_matches_row_major(qtype: GGMLType, n_tokens: int) -> None:
    fmt = quant.FORMATS[qtype]
    rng = np.random.default_rng(100 + int(qtype) + n_tokens)
    n, k = 32, 4 * 256
    w = _weights(qtype, n, k, rng)
    aq, ad, asum = _acts(fmt, n_tokens, k, rng)
    ref = np.array([[fmt.dot_row(w[r], aq[t], ad[t], asum[t]) for r in range(n)] for t in range(n_tokens)])
    w8 = interleave.pack(w, interleave.field_table(fmt.FIELDS, fmt.TYPE_SIZE), fmt.TYPE_SIZE)
    got = _dot_x8(fmt, w8, aq, ad, asum, k // fmt.BLOCK_SIZE)
    if qtype in K_QUANTS:
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_field_table_must_tile_the_block() -> None:
    with pytest.raises(ValueError):
        interleave.field_table(((0, 2), (4, 12)), 16)
    with pytest.raises(ValueError):
        interleave.field_table(((0, 2), (2, 16)), 16)


def test_pack_refuses_partial_groups() -> None:
    with pytest.raises(QwenliteError, match="groups of 8"):
        interleave.pack(np.zeros((12, 144), np.uint8), interleave.field_table(((0, 144),), 144), 144)
    w8 = np.zeros((1, 8 * 144), np.uint8)
    with pytest.raises(QwenliteError, match="out of range"):
        interleave.unpack_rows(w8, np.array([8]), interleave.field_table(((0, 144),), 144), 144)


@pytest.mark.parametrize("qtype", sorted(X8_TYPES), ids=lambda t: GGMLType(t).name)
@pytest.mark.parametrize("n_tokens", [1, 3, 37])
def test_matmul_interleaved_equals_row_major(qtype: GGMLType, n_tokens: int) -> None:
    """Through the threaded driver (token tiles, 4-token groups, remainders), both layouts agree."""
    fmt = quant.FORMATS[qtype]
    rng = np.random.default_rng(7 + n_tokens)
    k = 2 * 256
    w = _weights(qtype, 72, k, rng)
    x = (rng.standard_normal((n_tokens, k)) * 3).astype(np.float32)
    ref = matmul(w, int(qtype), x)
    got = matmul(quant.interleave_rows(w, int(qtype)), int(qtype), x, interleaved=True)
    if qtype in K_QUANTS:
        np.testing.assert_array_equal(got, ref)
    else:
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    assert fmt.ACT in ("q8_0", "q8_k")


def test_matmul_interleaved_checks_layout() -> None:
    w = np.zeros((8, 144), np.uint8)
    with pytest.raises(QwenliteError, match="interleaved"):
        matmul(w, int(GGMLType.Q4_K), np.zeros(256, np.float32), interleaved=True)
    with pytest.raises(QwenliteError, match="no interleaved kernel"):
        matmul(np.zeros((1, 8 * 4), np.uint8), int(GGMLType.F32), np.zeros(8, np.float32), interleaved=True)


def test_expert_stacks_interleave_per_expert() -> None:
    rng = np.random.default_rng(3)
    w = _weights(GGMLType.Q4_K, 3 * 16, 256, rng).reshape(3, 16, -1)
    w8 = quant.interleave_rows(w, int(GGMLType.Q4_K))
    assert w8.shape == (3, 2, 8 * 144)
    for e in range(3):
        np.testing.assert_array_equal(quant.deinterleave_rows(w8[e], int(GGMLType.Q4_K), np.arange(16)), w[e])


def test_real_model_loads_interleaved(real_model) -> None:  # noqa: ANN001 - pytest fixture
    """The loader interleaves every matrix it can, and embedding lookups read the file's layout."""
    net = real_model.network
    linears = [lin for b in net.blocks for lin in (b.wq, b.wk, b.wv, b.wo, b.ffn.gate_up, b.ffn.down)]
    linears.append(net.output)
    assert all(b.ffn.gate_up is not None and b.ffn.gate_up.n_out == 2 * b.ffn.n_ff for b in net.blocks)
    for lin in linears:
        assert lin.interleaved == (lin.qtype in X8_TYPES and lin.n_out % 8 == 0)
    assert any(lin.interleaved for lin in linears)
    assert not net.embed.interleaved or net.embed is net.output
    raw = real_model.file.tensor("token_embd.weight")
    ids = np.array([0, 151643, 1234])
    expect = quant.dequantize(raw.rows()[ids], raw.qtype, raw.shape[-1])
    np.testing.assert_array_equal(CPUBackend().embed(net.embed, ids), expect)


def test_interleaved_embedding_rows_match_file_layout() -> None:
    """Tied embeddings: the output matrix is interleaved and lookups de-interleave the rows they need."""
    rng = np.random.default_rng(11)
    w = _weights(GGMLType.Q4_K, 32, 256, rng)
    lin = Linear(quant.interleave_rows(w, int(GGMLType.Q4_K)), int(GGMLType.Q4_K), 256, 32, None, True)
    ids = np.array([31, 0, 8, 8])
    np.testing.assert_array_equal(CPUBackend().embed(lin, ids), quant.dequantize(w[ids], int(GGMLType.Q4_K), 256))
