"""HF -> GGUF conversion on tiny random checkpoints built with transformers (tests/hf_fixtures.py).

Oracles: the HF tensors themselves (f32 output must equal them bit for bit), ``gguf.quants.dequantize``
for quantized output (independent of qwenlite's kernels), gguf-py's reader next to qwenlite's, and the
real llama.cpp-made 0.5B file for the tokenizer keys and the metadata key types.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from hf_fixtures import make_qwen2_checkpoint, make_qwen2moe_checkpoint
from safetensors.torch import load_file

from qwenlite.converters import pipeline
from qwenlite.converters.hf_to_gguf import convert, load_config
from qwenlite.converters.mixes import choose_types
from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import GGMLType, TokenType
from qwenlite.gguf.reader import GGUFFile
from qwenlite.model.config import ModelConfig

ALL_TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k"]


def hf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every checkpoint tensor as float32 numpy (bf16 widened exactly by torch)."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update({k: v.to(torch.float32).numpy() for k, v in load_file(f).items()})
    return out


def expected_gguf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """The GGUF tensors a checkpoint must turn into, built independently of the converter."""
    cfg = json.loads((model_dir / "config.json").read_text())
    hf = hf_tensors(model_dir)
    out = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if not cfg.get("tie_word_embeddings", False):
        out["output.weight"] = hf["lm_head.weight"]
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.q_proj.bias": "attn_q.bias",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "mlp.gate.weight": "ffn_gate_inp.weight",
        "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
        "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
        "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
        "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    }
    for i in range(cfg["num_hidden_layers"]):
        for hf_suffix, g in names.items():
            key = f"model.layers.{i}.{hf_suffix}"
            if key in hf:
                out[f"blk.{i}.{g}"] = hf[key]
        n_exp = cfg.get("num_experts", 0)
        for proj, g in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
            experts = [hf.get(f"model.layers.{i}.mlp.experts.{e}.{proj}.weight") for e in range(n_exp)]
            if experts and experts[0] is not None:
                out[f"blk.{i}.{g}.weight"] = np.stack(experts)
    return out


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2_checkpoint(tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_qwen2moe_checkpoint(tmp_path_factory.mktemp("moe"))


def _check_f32_exact(model_dir: Path, out: Path) -> None:
    want = expected_gguf_tensors(model_dir)
    with GGUFFile(out) as f:
        assert set(f.tensors) == set(want)
        for name, arr in want.items():
            t = f.tensor(name)
            assert t.qtype == GGMLType.F32, name
            assert t.shape == arr.shape, name
            np.testing.assert_array_equal(t.data.view(np.float32).reshape(t.shape), arr, err_msg=name)
    r = GGUFReader(out)  # the independent reader sees the same tensors, ne reversed
    for t in r.tensors:
        np.testing.assert_array_equal(np.asarray(t.data).reshape(want[t.name].shape), want[t.name])


def test_dense_f32_equals_hf_and_metadata(dense_dir: Path, tmp_path: Path) -> None:
    out = convert(dense_dir, tmp_path / "m.gguf", "f32", progress=False)
    _check_f32_exact(dense_dir, out)
    cfg = json.loads((dense_dir / "config.json").read_text())
    with GGUFFile(out) as f:
        m = f.metadata
        assert m["general.architecture"] == "qwen2"
        assert m["general.name"] == dense_dir.name
        assert m["general.file_type"] == 0 and m["general.quantization_version"] == 2
        assert m["qwen2.block_count"] == cfg["num_hidden_layers"]
        assert m["qwen2.context_length"] == cfg["max_position_embeddings"]
        assert m["qwen2.embedding_length"] == cfg["hidden_size"]
        assert m["qwen2.feed_forward_length"] == cfg["intermediate_size"]
        assert m["qwen2.attention.head_count"] == cfg["num_attention_heads"]
        assert m["qwen2.attention.head_count_kv"] == cfg["num_key_value_heads"]
        assert m["qwen2.rope.freq_base"] == pytest.approx(1e6)
        assert m["qwen2.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
        assert not any(k.startswith("qwen2.rope.scaling") for k in m)
        tok = json.loads((dense_dir / "tokenizer.json").read_text())
        vocab, added = tok["model"]["vocab"], {a["id"]: a for a in tok["added_tokens"]}
        tokens, types = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]
        assert len(tokens) == len(types) == cfg["vocab_size"]
        for text, i in vocab.items():
            assert tokens[i] == text and types[i] == TokenType.NORMAL
        for i, a in added.items():
            assert tokens[i] == a["content"]
            assert types[i] == (TokenType.CONTROL if a["special"] else TokenType.USER_DEFINED)
        n_real = len(vocab) + len(added)
        assert tokens[n_real:] == [f"[PAD{i}]" for i in range(n_real, cfg["vocab_size"])]
        assert set(types[n_real:].tolist()) == {TokenType.UNUSED}
        assert m["tokenizer.ggml.merges"] == [" ".join(p) for p in tok["model"]["merges"]]
        assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "qwen2"
        ids = {a["content"]: i for i, a in added.items()}
        assert m["tokenizer.ggml.eos_token_id"] == ids["<|im_end|>"]
        assert m["tokenizer.ggml.padding_token_id"] == ids["<|endoftext|>"]
        assert m["tokenizer.ggml.bos_token_id"] == ids["<|endoftext|>"]  # from config.json
        assert m["tokenizer.ggml.add_bos_token"] is False
        assert (
            m["tokenizer.chat_template"]
            == json.loads((dense_dir / "tokenizer_config.json").read_text())["chat_template"]
        )


def test_metadata_key_types_match_llama_cpp_file(dense_dir: Path, tmp_path: Path, real_model_path: Path) -> None:
    """Every key the llama.cpp-made 0.5B file has (bar model-card names) exists with the same GGUF type."""
    out = convert(dense_dir, tmp_path / "m.gguf", "q4_k_m", progress=False)
    ours, real = GGUFReader(out).fields, GGUFReader(real_model_path).fields
    skip = {"general.finetune", "general.basename", "general.size_label"}
    for key, field in real.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        assert key in ours, key
        assert ours[key].types == field.types, key
    assert ours["general.file_type"].contents() == real["general.file_type"].contents() == 15


def test_tied_sharded_bf16(tmp_path: Path) -> None:
    d = make_qwen2_checkpoint(
        tmp_path, tie_word_embeddings=True, dtype="bfloat16", max_shard_size="60KB", hidden_size=64,
        intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    assert (d / "model.safetensors.index.json").is_file()
    out = convert(d, tmp_path / "t.gguf", "f32", progress=False)
    _check_f32_exact(d, out)
    with GGUFFile(out) as f:
        assert "output.weight" not in f.tensors
    # tied embeddings: the token embedding gets the output tensor's rule (Q8_0: 64 is not a multiple of 256)
    out = convert(d, tmp_path / "q.gguf", "q4_k_m", progress=False)
    with GGUFFile(out) as f:
        assert f.tensor("token_embd.weight").qtype == GGMLType.Q8_0


def test_moe_f32_equals_hf_and_metadata(moe_dir: Path, tmp_path: Path) -> None:
    out = convert(moe_dir, tmp_path / "m.gguf", "f32", progress=False)
    _check_f32_exact(moe_dir, out)
    cfg = json.loads((moe_dir / "config.json").read_text())
    with GGUFFile(out) as f:
        m = f.metadata
        assert m["general.architecture"] == "qwen2moe"
        assert m["qwen2moe.expert_count"] == cfg["num_experts"]
        assert m["qwen2moe.expert_used_count"] == cfg["num_experts_per_tok"]
        assert m["qwen2moe.expert_feed_forward_length"] == cfg["moe_intermediate_size"]
        assert m["qwen2moe.expert_shared_feed_forward_length"] == cfg["shared_expert_intermediate_size"]
        assert m["qwen2moe.feed_forward_length"] == cfg["intermediate_size"]
        assert m["qwen2moe.expert_weights_norm"] is True
        assert m["qwen2moe.dense_layers"].tolist() == [1]
        n_e, d, f_e = cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"]
        assert f.tensor("blk.0.ffn_gate_exps.weight").shape == (n_e, f_e, d)
        assert f.tensor("blk.0.ffn_down_exps.weight").shape == (n_e, d, f_e)
        assert f.tensor("blk.0.ffn_gate_inp.weight").shape == (n_e, d)
        assert f.tensor("blk.0.ffn_gate_inp_shexp.weight").shape == (1, d)
        assert "blk.1.ffn_gate.weight" in f.tensors and "blk.1.ffn_gate_exps.weight" not in f.tensors
    r = {t.name: t for t in GGUFReader(out).tensors}
    assert list(r["blk.0.ffn_gate_exps.weight"].shape) == [d, f_e, n_e]  # llama.cpp's ne order


def test_moe_variants(tmp_path: Path) -> None:
    """norm_topk_prob false, every other layer sparse (decoder_sparse_step=2), no dense list."""
    d = make_qwen2moe_checkpoint(tmp_path, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[],
                                 num_hidden_layers=4)  # fmt: skip
    out = convert(d, tmp_path / "v.gguf", "f32", progress=False)
    _check_f32_exact(d, out)
    with GGUFFile(out) as f:
        assert f.metadata["qwen2moe.expert_weights_norm"] is False
        assert f.metadata["qwen2moe.dense_layers"].tolist() == [0, 2]
    d = make_qwen2moe_checkpoint(tmp_path, name="all-sparse", mlp_only_layers=[], num_hidden_layers=2)
    with GGUFFile(convert(d, tmp_path / "s.gguf", "f32", progress=False)) as f:
        assert "qwen2moe.dense_layers" not in f.metadata


def test_rope_scaling_yarn(tmp_path: Path) -> None:
    d = make_qwen2_checkpoint(tmp_path, num_hidden_layers=1)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                              "rope_theta": 1000000.0}  # fmt: skip
    (d / "config.json").write_text(json.dumps(cfg))
    with GGUFFile(convert(d, tmp_path / "y.gguf", "f32", progress=False)) as f:
        assert f.metadata["qwen2.rope.scaling.type"] == "yarn"
        assert f.metadata["qwen2.rope.scaling.factor"] == 4.0
        assert f.metadata["qwen2.rope.scaling.original_context_length"] == 32768
        assert f.metadata["qwen2.rope.freq_base"] == 1e6
    cfg.pop("rope_parameters")  # transformers < 5 layout
    cfg["rope_theta"] = 5e5
    cfg["rope_scaling"] = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096}
    (d / "config.json").write_text(json.dumps(cfg))
    with GGUFFile(convert(d, tmp_path / "y2.gguf", "f32", progress=False)) as f:
        assert f.metadata["qwen2.rope.scaling.factor"] == 2.0
        assert f.metadata["qwen2.rope.freq_base"] == 5e5


@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("dense", {}),
        ("dense", {"tie_word_embeddings": True, "head_dim": 32}),
        ("dense", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}),
        ("dense", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
        ("moe", {}),
        ("moe", {"decoder_sparse_step": 2, "mlp_only_layers": [], "norm_topk_prob": False}),
    ],
)
def test_config_round_trip(kind: str, overrides: dict, tmp_path: Path) -> None:
    """One hyperparameter class: what the converter parses from config.json is what the runtime reads
    back from the file it wrote (floats as the float32 they are stored in)."""
    make = make_qwen2_checkpoint if kind == "dense" else make_qwen2moe_checkpoint
    d = make(tmp_path, num_hidden_layers=2, **overrides)
    want, _ = load_config(d)
    with GGUFFile(convert(d, tmp_path / "c.gguf", "f32", progress=False)) as f:
        got = ModelConfig.from_gguf(f)
    f32 = {k: float(np.float32(getattr(want, k))) for k in ("rope_base", "norm_eps", "rope_factor")}
    assert got == dataclasses.replace(want, **f32)


# --- quantized output -------------------------------------------------------------------------------


def _bound(qtype: GGMLType, x: np.ndarray) -> np.ndarray:
    """Largest error the format may make on each value of ``x`` (rows of whole blocks), per block:
    half a quantization step plus the f16 rounding of the scale for legacy formats (a whole step for
    Q4_0/Q5_0, whose asymmetric grid clamps one end); one full step of the super-block range for
    k-quants (their 6/8-bit sub-block scales add up to half a step)."""
    n = x.shape[-1]
    if qtype == GGMLType.F32:
        return np.zeros_like(x)
    if qtype == GGMLType.F16:
        return np.abs(x) * 2.0**-11 + 2.0**-24
    if qtype == GGMLType.BF16:
        return np.abs(x) * 2.0**-8
    block = 32 if qtype in (GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q5_1) else 256
    b = x.reshape(-1, n // block, block)
    amax = np.abs(b).max(-1, keepdims=True)
    rng = b.max(-1, keepdims=True) - np.minimum(b.min(-1, keepdims=True), 0)
    per_block = {
        GGMLType.Q8_0: amax * (0.5 / 127 + 2.0**-10),
        # d = -max/8 (-max/16): the value opposite the extreme is clamped by one whole step
        GGMLType.Q4_0: amax * (1 / 8 + 2.0**-10),
        GGMLType.Q5_0: amax * (1 / 16 + 2.0**-10),
        GGMLType.Q5_1: (b.max(-1, keepdims=True) - b.min(-1, keepdims=True)) * (0.5 / 31 + 2.0**-10) + amax * 2.0**-10,
        GGMLType.Q4_K: rng / 15,
        GGMLType.Q5_K: rng / 31,
        GGMLType.Q6_K: amax / 32,
    }[qtype]
    return np.broadcast_to(per_block, b.shape).reshape(x.shape) * 1.0001


@pytest.mark.parametrize("ftype", ALL_TYPES[1:])
def test_quantized_tensors_within_bounds(ftype: str, moe_dir: Path, tmp_path: Path) -> None:
    out = convert(moe_dir, tmp_path / f"{ftype}.gguf", ftype, progress=False)
    want = expected_gguf_tensors(moe_dir)
    cfg = json.loads((moe_dir / "config.json").read_text())
    with GGUFFile(out) as f:
        names = list(f.tensors)
        expected_types = choose_types(
            [(n, f.tensor(n).shape) for n in names], ftype, cfg["num_hidden_layers"], cfg["num_experts"]
        )
        for name, qt in zip(names, expected_types):
            t = f.tensor(name)
            assert t.qtype == (qt or GGMLType.F32), name
            got = dequantize(np.asarray(t.data), t.qtype).reshape(t.shape)
            x = want[name].reshape(-1, t.shape[-1])
            err = np.abs(got.reshape(x.shape) - x)
            bound = _bound(t.qtype, x)
            assert (err <= bound).all(), f"{name} {t.qtype.name}: max excess {(err - bound).max()}"
            if t.qtype not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
                assert err.max() > 0  # really quantized


def test_q4_k_m_mix_on_moe(moe_dir: Path, tmp_path: Path) -> None:
    """Hand-checked types for the fixture (3 layers: use_more_bits(i, 3) holds for i = 2 only)."""
    with GGUFFile(convert(moe_dir, tmp_path / "m.gguf", "q4_k_m", progress=False)) as f:
        types = {n: t.qtype.name for n, t in f.tensors.items()}
    assert types["token_embd.weight"] == "Q5_0"  # 64 wide: Q4_K -> Q5_0
    assert types["output.weight"] == "Q8_0"  # Q6_K wanted, 64 % 256 != 0
    assert types["blk.0.ffn_gate_inp.weight"] == "F32"
    assert types["blk.0.ffn_gate_inp_shexp.weight"] == "F32"
    assert types["blk.0.attn_v.weight"] == "Q5_0" and types["blk.2.attn_v.weight"] == "Q8_0"
    assert types["blk.0.ffn_down_exps.weight"] == "Q5_0"  # rows of 96: Q4_K -> Q5_0
    assert types["blk.2.ffn_down_exps.weight"] == "Q8_0"  # Q6_K -> Q8_0
    assert types["blk.2.ffn_down_shexp.weight"] == "Q8_0"  # rows of 128: Q6_K -> Q8_0
    assert types["blk.1.ffn_down.weight"] == "Q5_0"  # the dense layer follows its own layer number


# --- robustness -----------------------------------------------------------------------------------


def test_interrupted_conversion_leaves_no_file(
    dense_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "x.gguf"
    out.write_bytes(b"previous")
    calls = {"n": 0}
    real = pipeline.quant.quantize

    def flaky(x: np.ndarray, qtype: int) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(x, qtype)

    monkeypatch.setattr(pipeline.quant, "quantize", flaky)
    with pytest.raises(KeyboardInterrupt):
        convert(dense_dir, out, "q8_0", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]
    assert out.read_bytes() == b"previous"
    monkeypatch.setattr(pipeline.quant, "quantize", lambda x, q: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        convert(dense_dir, tmp_path / "y.gguf", "q8_0", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]


def test_refuses_to_overwrite_input(dense_dir: Path) -> None:
    before = (dense_dir / "model.safetensors").read_bytes()
    with pytest.raises(QwenliteError, match="refusing"):
        convert(dense_dir, dense_dir / "model.safetensors", "f32", progress=False)
    with pytest.raises(QwenliteError, match="refusing"):
        convert(dense_dir, dense_dir / "config.json", "f32", progress=False)
    with pytest.raises(QwenliteError, match="directory"):
        convert(dense_dir, dense_dir, "f32", progress=False)
    assert (dense_dir / "model.safetensors").read_bytes() == before


def _edit_config(d: Path, **changes: object) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def test_clear_errors(tmp_path: Path) -> None:
    from safetensors.numpy import load_file as load_np
    from safetensors.numpy import save_file as save_np

    d = make_qwen2_checkpoint(tmp_path, num_hidden_layers=1)
    out = tmp_path / "o.gguf"
    original = (d / "config.json").read_text()

    _edit_config(d, architectures=["LlamaForCausalLM"])
    with pytest.raises(QwenliteError, match="unsupported architecture 'LlamaForCausalLM'"):
        convert(d, out, "f32", progress=False)
    (d / "config.json").write_text(original)

    _edit_config(d, intermediate_size=192)
    with pytest.raises(QwenliteError, match=r"mlp.gate_proj.weight' has shape \(160, 96\).*\(192, 96\)"):
        convert(d, out, "f32", progress=False)
    (d / "config.json").write_text(original)

    cfg = json.loads(original)
    _edit_config(d, vocab_size=100)  # checked against the tensors before the tokenizer is padded to it
    with pytest.raises(QwenliteError, match=r"embed_tokens.weight' has shape \(413, 96\), but config.json implies "
                                            r"\(100, 96\)"):
        convert(d, out, "f32", progress=False)
    (d / "config.json").write_text(original)

    with pytest.raises(QwenliteError, match="unknown output type"):
        convert(d, out, "q3_k", progress=False)

    tensors = load_np(d / "model.safetensors")
    kept = {k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.k_proj.bias"}
    save_np(kept, d / "model.safetensors")
    with pytest.raises(QwenliteError, match="missing tensor 'model.layers.0.self_attn.k_proj.bias'"):
        convert(d, out, "f32", progress=False)

    save_np({**tensors, "model.layers.0.self_attn.k_proj.bias": tensors["model.layers.0.self_attn.k_proj.bias"]
             .astype(np.float64)}, d / "model.safetensors")  # fmt: skip
    with pytest.raises(QwenliteError, match="dtype F64"):
        convert(d, out, "f32", progress=False)

    save_np({**tensors, "model.layers.7.mlp.up_proj.weight": np.zeros((2, 2), np.float32)}, d / "model.safetensors")
    with pytest.raises(QwenliteError, match="model.layers.7.mlp.up_proj.weight' does not fit"):
        convert(d, out, "f32", progress=False)
    assert not out.exists() and cfg["vocab_size"] > 100


def test_slow_tokenizer_files_give_the_same_vocab(dense_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "slow"
    shutil.copytree(dense_dir, d)
    tok = json.loads((d / "tokenizer.json").read_text())
    (d / "vocab.json").write_text(json.dumps(tok["model"]["vocab"], ensure_ascii=False))
    merges = "\n".join(" ".join(p) for p in tok["model"]["merges"])
    (d / "merges.txt").write_text("#version: 0.2\n" + merges + "\n")
    (d / "tokenizer.json").unlink()
    with (
        GGUFFile(convert(d, tmp_path / "s.gguf", "f32", progress=False)) as slow,
        GGUFFile(convert(dense_dir, tmp_path / "f.gguf", "f32", progress=False)) as fast,
    ):
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id",
                    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.bos_token_id"):  # fmt: skip
            assert slow.metadata[key] == fast.metadata[key], key
        np.testing.assert_array_equal(
            slow.metadata["tokenizer.ggml.token_type"], fast.metadata["tokenizer.ggml.token_type"]
        )


def test_real_qwen_tokenizer_matches_llama_cpp_file(tmp_path: Path, real_model_path: Path) -> None:
    """With the real Qwen2.5 vocabulary, tokens, types, merges and special ids equal llama.cpp's."""
    real = GGUFFile(real_model_path)
    d = make_qwen2_checkpoint(
        tmp_path, tokenizer_from_gguf=real_model_path, vocab_size=len(real.metadata["tokenizer.ggml.tokens"]),
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        tie_word_embeddings=True,
    )  # fmt: skip
    with GGUFFile(convert(d, tmp_path / "r.gguf", "q8_0", progress=False)) as ours:
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.model", "tokenizer.ggml.pre",
                    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.bos_token_id",
                    "tokenizer.ggml.add_bos_token"):  # fmt: skip
            assert ours.metadata[key] == real.metadata[key], key
        np.testing.assert_array_equal(
            ours.metadata["tokenizer.ggml.token_type"], real.metadata["tokenizer.ggml.token_type"]
        )
    real.close()


def test_progress_reports_on_stderr(dense_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    convert(dense_dir, tmp_path / "p.gguf", "q8_0", progress=True)
    err = capsys.readouterr().err
    assert "blk.0.attn_q.weight Q8_0" in err and "MB/s" in err and "wrote" in err
