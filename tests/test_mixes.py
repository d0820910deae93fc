"""Per-tensor type choice: must equal llama-quantize (src/llama-quant.cpp).

Oracle 1: the real llama.cpp-made Qwen2.5-Coder-0.5B Q4_K_M file: fed its own tensor list in its own
(alphabetical) order, the mix must reproduce every stored type. Oracle 2: the rules of
``llama_tensor_get_type`` worked by hand for MoE shapes (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B, and an
8-expert model for the special rules).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qwenlite.converters.mixes import FILE_TYPES, choose_types, ggml_n_dims, use_more_bits
from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType
from qwenlite.gguf.reader import GGUFFile

T = GGMLType


def test_real_q4_k_m_file_types(real_model_path: Path) -> None:
    """The published file predates llama.cpp #9005 (counters in file order): ``counter_order="file"``
    reproduces every type; today's rule (layer order) differs exactly where the two counters disagree."""
    with GGUFFile(real_model_path) as f:
        tensors = list(f)
        listing = [(t.name, t.shape) for t in tensors]
        chosen = choose_types(listing, "q4_k_m", f.metadata["qwen2.block_count"], counter_order="file")
        got = {t.name: (c or t.qtype) for t, c in zip(tensors, chosen)}
        assert got == {t.name: t.qtype for t in tensors}
        today = choose_types(listing, "q4_k_m", 24)
        changed = {t.name for t, a, b in zip(tensors, chosen, today) if a != b}
        order = [int(n.split(".")[1]) for n, _ in listing if n.endswith("attn_v.weight")]
        expect = {f"blk.{layer}.{kind}.weight" for pos, layer in enumerate(order)
                  if use_more_bits(pos, 24) != use_more_bits(layer, 24) for kind in ("attn_v", "ffn_down")}
        assert changed == expect and len(changed) == 32
        # the file is in alphabetical order, so the attn_v counter differs from the layer number:
        names = [t.name for t in tensors if t.name.endswith("attn_v.weight")]
        assert names[:3] == ["blk.0.attn_v.weight", "blk.1.attn_v.weight", "blk.10.attn_v.weight"]
        assert f.tensor("blk.10.attn_v.weight").qtype == T.Q8_0  # counter 2 -> use_more_bits; layer 10 would not


def test_use_more_bits_24_layers() -> None:
    assert [i for i in range(24) if use_more_bits(i, 24)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 21, 22, 23]


def test_ggml_n_dims() -> None:
    assert ggml_n_dims((1, 2048)) == 1  # ffn_gate_inp_shexp
    assert ggml_n_dims((60, 2048)) == 2
    assert ggml_n_dims((60, 1408, 2048)) == 3
    assert ggml_n_dims((7,)) == 1


def _dense(n_layer: int, d: int, ff: int, tied: bool, vocab: int = 1000) -> list[tuple[str, tuple[int, ...]]]:
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (vocab, d))]
    for i in range(n_layer):
        out += [
            (f"blk.{i}.attn_norm.weight", (d,)),
            (f"blk.{i}.attn_q.weight", (d, d)),
            (f"blk.{i}.attn_q.bias", (d,)),
            (f"blk.{i}.attn_k.weight", (d // 4, d)),
            (f"blk.{i}.attn_v.weight", (d // 4, d)),
            (f"blk.{i}.attn_output.weight", (d, d)),
            (f"blk.{i}.ffn_gate.weight", (ff, d)),
            (f"blk.{i}.ffn_up.weight", (ff, d)),
            (f"blk.{i}.ffn_down.weight", (d, ff)),
        ]
    out.append(("output_norm.weight", (d,)))
    if not tied:
        out.append(("output.weight", (vocab, d)))
    return out


def _moe(n_layer: int, d: int, n_e: int, f_e: int, f_sh: int, heads: tuple[int, int], dense=()) -> list:  # noqa: ANN001
    hd = d // heads[0]
    out: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (5000, d))]
    for i in range(n_layer):
        out += [
            (f"blk.{i}.attn_q.weight", (heads[0] * hd, d)),
            (f"blk.{i}.attn_k.weight", (heads[1] * hd, d)),
            (f"blk.{i}.attn_v.weight", (heads[1] * hd, d)),
            (f"blk.{i}.attn_output.weight", (d, heads[0] * hd)),
            (f"blk.{i}.ffn_norm.weight", (d,)),
        ]
        if i in dense:
            out += [(f"blk.{i}.ffn_gate.weight", (4 * d, d)), (f"blk.{i}.ffn_down.weight", (d, 4 * d))]
            continue
        out += [
            (f"blk.{i}.ffn_gate_inp.weight", (n_e, d)),
            (f"blk.{i}.ffn_gate_exps.weight", (n_e, f_e, d)),
            (f"blk.{i}.ffn_up_exps.weight", (n_e, f_e, d)),
            (f"blk.{i}.ffn_down_exps.weight", (n_e, d, f_e)),
            (f"blk.{i}.ffn_gate_inp_shexp.weight", (1, d)),
            (f"blk.{i}.ffn_gate_shexp.weight", (f_sh, d)),
            (f"blk.{i}.ffn_up_shexp.weight", (f_sh, d)),
            (f"blk.{i}.ffn_down_shexp.weight", (d, f_sh)),
        ]
    return out + [("output_norm.weight", (d,)), ("output.weight", (5000, d))]


def _types(tensors: list, ftype: str, n_layer: int, n_expert: int = 0) -> dict[str, GGMLType | None]:
    return {name: t for (name, _), t in zip(tensors, choose_types(tensors, ftype, n_layer, n_expert))}


def test_qwen15_moe_a27b_q4_k_m() -> None:
    """24 layers, d 2048, 60 experts, expert ffn 1408 (not a multiple of 256), shared ffn 5632."""
    ts = _moe(24, 2048, 60, 1408, 5632, (16, 16))
    ty = _types(ts, "q4_k_m", 24, 60)
    assert ty["blk.0.ffn_gate_inp.weight"] is None and ty["blk.0.ffn_gate_inp_shexp.weight"] is None
    assert ty["blk.0.ffn_norm.weight"] is None
    assert ty["blk.0.ffn_gate_exps.weight"] == T.Q4_K  # rows of 2048
    for i in range(24):
        more = use_more_bits(i, 24)
        # ffn_down_exps: rows of 1408 -> Q6_K falls back to Q8_0, Q4_K to Q5_0
        assert ty[f"blk.{i}.ffn_down_exps.weight"] == (T.Q8_0 if more else T.Q5_0), i
        assert ty[f"blk.{i}.ffn_down_shexp.weight"] == (T.Q6_K if more else T.Q4_K), i  # rows of 5632
        assert ty[f"blk.{i}.attn_v.weight"] == (T.Q6_K if more else T.Q4_K), i
        assert ty[f"blk.{i}.attn_k.weight"] == T.Q4_K and ty[f"blk.{i}.attn_output.weight"] == T.Q4_K
    assert ty["output.weight"] == T.Q6_K and ty["token_embd.weight"] == T.Q4_K
    ty5 = _types(ts, "q5_k_m", 24, 60)
    assert ty5["blk.3.ffn_down_exps.weight"] == T.Q5_1  # Q5_K -> Q5_1 on rows of 1408
    assert ty5["blk.0.ffn_down_exps.weight"] == T.Q8_0
    assert ty5["blk.3.ffn_gate_exps.weight"] == T.Q5_K


def test_moe_layer_from_name_with_dense_layers() -> None:
    """In an MoE model ffn_down's layer is parsed from the name, so a dense layer in between does
    not shift the count; in a dense model it is the running count."""
    ts = _moe(16, 256, 4, 256, 256, (4, 4), dense=(0, 5))
    ty = _types(ts, "q4_k_m", 16, 4)
    for i in range(16):
        name = f"blk.{i}.ffn_down.weight" if i in (0, 5) else f"blk.{i}.ffn_down_exps.weight"
        assert ty[name] == (T.Q6_K if use_more_bits(i, 16) else T.Q4_K), i


def test_eight_experts_special_rules() -> None:
    ts = _moe(8, 512, 8, 512, 512, (8, 2))
    q4 = _types(ts, "q4_k_m", 8, 8)
    q5 = _types(ts, "q5_k_m", 8, 8)
    q40 = _types(ts, "q4_0", 8, 8)
    for i in range(8):
        assert q4[f"blk.{i}.attn_v.weight"] == q5[f"blk.{i}.attn_v.weight"] == T.Q8_0
        assert q4[f"blk.{i}.attn_k.weight"] == q40[f"blk.{i}.attn_k.weight"] == T.Q8_0
        assert q4[f"blk.{i}.attn_output.weight"] == T.Q5_K
        assert q5[f"blk.{i}.attn_output.weight"] == T.Q5_K  # the base type anyway
        assert q40[f"blk.{i}.attn_output.weight"] == T.Q4_0
        assert q4[f"blk.{i}.attn_q.weight"] == T.Q4_K


def test_dense_rules_and_fallbacks() -> None:
    ts = _dense(8, 256, 512, tied=True)
    ty = _types(ts, "q4_k_m", 8)
    assert ty["token_embd.weight"] == T.Q6_K  # tied: the output rule
    assert ty["blk.0.ffn_down.weight"] == T.Q6_K and ty["blk.1.ffn_down.weight"] == T.Q4_K
    assert _types(_dense(8, 256, 512, tied=False), "q4_k_m", 8)["token_embd.weight"] == T.Q4_K
    # rows not a multiple of 32 -> F16 (1-D norms untouched)
    odd = _types(_dense(2, 80, 100, tied=False), "q4_k_m", 2)
    assert odd["blk.0.attn_q.weight"] == T.F16 and odd["blk.0.ffn_down.weight"] == T.F16
    assert odd["output.weight"] == T.F16 and odd["blk.0.attn_norm.weight"] is None
    # rows of 96: Q5_K -> Q5_1, Q6_K -> Q8_0
    mid = _types(_dense(8, 96, 96 * 4, tied=False), "q5_k_m", 8)
    assert mid["blk.3.attn_q.weight"] == T.Q5_1 and mid["blk.0.attn_v.weight"] == T.Q8_0


def test_legacy_and_float_types() -> None:
    ts = _dense(4, 256, 512, tied=False)
    q40 = _types(ts, "q4_0", 4)
    assert q40["output.weight"] == T.Q6_K  # llama-quantize's output rule applies to every quantized type
    assert q40["token_embd.weight"] == q40["blk.0.attn_v.weight"] == q40["blk.0.ffn_down.weight"] == T.Q4_0
    q80 = _types(ts, "q8_0", 4)
    assert set(q80.values()) == {T.Q8_0, None}
    q6 = _types(ts, "q6_k", 4)
    assert set(q6.values()) == {T.Q6_K, None}
    assert _types(_dense(4, 96, 128, tied=False), "q6_k", 4)["blk.0.attn_q.weight"] == T.Q8_0
    for ft, base in (("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16)):
        fl = _types(_dense(2, 80, 100, tied=False), ft, 2)  # floats never fall back
        assert fl["blk.0.attn_q.weight"] == fl["output.weight"] == base
        assert fl["blk.0.attn_norm.weight"] is None
    assert set(FILE_TYPES) == {"f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k"}


def test_unknown_type_and_bad_layer() -> None:
    with pytest.raises(QwenliteError, match="unknown output type"):
        choose_types([], "iq2_xs", 1)
    with pytest.raises(QwenliteError, match="cannot tell the layer"):
        choose_types([("blk.9.ffn_down_exps.weight", (4, 64, 64))], "q4_k_m", 2, 4)


def test_converting_the_real_checkpoint_plans_the_llama_cpp_file(hf_reference_dir: Path, real_model_path: Path) -> None:
    """The 0.5B model as an HF checkpoint (rebuilt from the GGUF): a q4_k_m conversion would write
    exactly the tensors, shapes and order of llama.cpp's own Q4_K_M file (llama.cpp's converter order
    blk.0, blk.1, blk.10, ...), with the types of today's llama-quantize (see the test above)."""
    from qwenlite.converters.hf_to_gguf import plan

    with GGUFFile(real_model_path) as f:
        real = [(t.name, t.shape, t.qtype) for t in f]
    planned = plan(hf_reference_dir, "q4_k_m")
    assert [(n, s) for n, s, _ in planned] == [(n, s) for n, s, _ in real]
    today = choose_types([(n, s) for n, s, _ in real], "q4_k_m", 24)
    assert [q for _, _, q in planned] == [c or q for (_, _, q), c in zip(real, today)]
