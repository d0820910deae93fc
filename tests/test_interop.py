"""The converter against llama.cpp itself: its converter, its quantizer and its runtime (the peer).

Tiny random checkpoints (tests/hf_fixtures.py) with widths of 256 so the k-quants are real 256-value
super-blocks: a dense Qwen2 with 8 layers (llama-quantize's ``use_more_bits`` gives layers 0, 3, 6, 7
more bits), a Qwen2-MoE whose shared-expert down projection (rows of 384) exercises the per-tensor
fallback, a tied-embedding model for the rule that gives ``token_embd`` the output type, and a
12-layer model for the layer counter of the mixes (from 11 layers on, file order and layer order
differ: blk.0, blk.1, blk.10, ...).

The MoE checkpoint uses ``norm_topk_prob=False`` and no ``mlp_only_layers``: llama.cpp's converter
cannot write dense layers in a qwen2moe file, and its qwen2moe graph never renormalizes the top-k
weights (its files carry no ``expert_weights_norm`` key), so this is the configuration both sides
represent the same way.

llama.cpp's files are made the way its users make them: ``convert_hf_to_gguf.py`` (from the
vendored sources, with its own gguf-py first on ``PYTHONPATH``) writes f32 / f16 / bf16 / q8_0, and
the other types are ``llama_model_quantize`` (the function behind ``llama-quantize``; the peer build
has no tool binaries) applied to its f32 file. The converter runs under this interpreter, which has
the torch and transformers it imports; the peer venv has neither. One thing is patched in it: it
identifies a BPE pre-tokenizer by hashing the tokenization of a fixed text, and the fixtures' small
vocabulary (Qwen2's pre-tokenizer, 400 trained tokens) has no registered hash, so the wrapper names
the pre-tokenizer ``qwen2``, which is what it is.

Checks:

1. llama.cpp loads every file qwenlite writes, and decodes the same greedy tokens from it as from its
   own file of the same checkpoint and type (and computes bit-identical prompt logits).
2. Every tensor of qwenlite's file has llama.cpp's type and byte-identical data; the k-quant mixes
   choose llama-quantize's type for every tensor (MoE expert and shared-expert tensors included);
   the metadata equals llama.cpp's key for key.
3. llama.cpp-made files (f32, q8_0) run in qwenlite with transformers' logits.

On Q8_0 / legacy-quant files qwenlite and llama.cpp agree per matmul to ~2e-4 (qwenlite keeps the
activation block scale in float32 where ggml rounds it to f16), but through a deep stack of 8-bit
activation roundings that tiny difference decorrelates the rounding noise, so at the logits the two
are as far apart as either is from unquantized activations (~3%). The k-quant paths (Q8_K
activations) agree to float32 rounding. Hence the q8_0 check against llama.cpp uses the same bound as
against transformers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from hf_fixtures import make_qwen2_checkpoint, make_qwen2moe_checkpoint
from hf_reference import hf_name

from qwenlite.converters.hf_to_gguf import convert, plan
from tests.peer import LLAMA_CPP_SRC, llama_greedy, llama_logits, requires_peer, run_worker

CONVERT_SCRIPT = LLAMA_CPP_SRC / "convert_hf_to_gguf.py"

pytestmark = [
    pytest.mark.peer,
    requires_peer,
    pytest.mark.skipif(not CONVERT_SCRIPT.exists(), reason=f"{CONVERT_SCRIPT} missing (run `make peer`)"),
]

FTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # convert_hf_to_gguf.py --outtype; the rest: llama-quantize
MIXES = ("q4_k_m", "q5_k_m")

MODELS: dict[str, tuple[Any, dict[str, Any]]] = {
    "dense": (make_qwen2_checkpoint, dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2,
    )),
    "moe": (make_qwen2moe_checkpoint, dict(
        hidden_size=256, intermediate_size=512, moe_intermediate_size=256, shared_expert_intermediate_size=384,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
        num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[],
    )),
    "tied": (make_qwen2_checkpoint, dict(
        hidden_size=256, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=True,
    )),
    "deep": (make_qwen2_checkpoint, dict(
        hidden_size=256, intermediate_size=256, num_hidden_layers=12, num_attention_heads=2,
        num_key_value_heads=1,
    )),
}  # fmt: skip
RUN_MODELS = ("dense", "moe")  # decoded and compared; "tied" and "deep" only feed the mix check

# Metadata that legitimately differs: llama.cpp derives a display name and size label from the
# directory, and qwenlite writes the top-k renormalization flag llama.cpp's qwen2moe lacks.
OWN_KEYS = {"general.name", "general.size_label", "qwen2moe.expert_weights_norm"}

N_GREEDY = 16
N_PROMPT = 12
# qwenlite on a q8_0 file against transformers on the same (dequantized) weights: only qwenlite's 8-bit
# activation quantization separates them (tests/test_moe.py measures the same bound). Also the bound
# against llama.cpp on that file (see the module docstring).
SAME_WEIGHTS_REL_L2 = 0.04

# Runs llama.cpp's converter with the pre-tokenizer named (see the module docstring).
_CONVERTER_WRAPPER = """
import runpy, sys
src = sys.argv[1]
sys.path.insert(0, src)
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [src + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_convert(hf_dir: Path, out: Path, outtype: str) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py HF --outtype T --outfile out``."""
    env = dict(os.environ, PYTHONPATH=str(LLAMA_CPP_SRC / "gguf-py"))
    cmd = [sys.executable, "-c", _CONVERTER_WRAPPER, str(LLAMA_CPP_SRC), str(hf_dir),
           "--outfile", str(out), "--outtype", outtype]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"convert_hf_to_gguf.py failed: {proc.stderr[-3000:]}"
    return out


def llama_quantize(src: Path, dst: Path, ftype: str) -> Path:
    """``llama-quantize src dst FTYPE 2`` (default parameters: no imatrix, no overrides)."""
    run_worker({"op": "quantize_model", "src": str(src), "dst": str(dst), "ftype": ftype, "n_threads": 2})
    return dst


@dataclass
class Model:
    """One checkpoint and its GGUF files from both tools, made on first use and kept for the module."""

    name: str
    hf_dir: Path
    tmp: Path
    _ours: dict[str, Path] = field(default_factory=dict)
    _theirs: dict[str, Path] = field(default_factory=dict)

    @property
    def n_vocab(self) -> int:
        return int(json.loads((self.hf_dir / "config.json").read_text())["vocab_size"])

    def ours(self, ftype: str) -> Path:
        if ftype not in self._ours:
            self._ours[ftype] = convert(self.hf_dir, self.tmp / f"qwenlite-{ftype}.gguf", ftype, progress=False)
        return self._ours[ftype]

    def theirs(self, ftype: str) -> Path:
        if ftype not in self._theirs:
            out = self.tmp / f"llama-{ftype}.gguf"
            if ftype in CONVERTER_TYPES:
                self._theirs[ftype] = llama_convert(self.hf_dir, out, ftype)
            else:
                self._theirs[ftype] = llama_quantize(self.theirs("f32"), out, ftype)
        return self._theirs[ftype]

    def prompt(self, seed: int = 7) -> list[int]:
        return np.random.default_rng(seed).integers(0, self.n_vocab - 8, N_PROMPT).tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Model]:
    out = {}
    for name, (make, overrides) in MODELS.items():
        tmp = tmp_path_factory.mktemp(f"interop-{name}")
        out[name] = Model(name, make(tmp, name=f"tiny-{name}", seed=3, **overrides), tmp)
    return out


def _tensors(path: Path) -> dict[str, ReaderTensor]:
    return {t.name: t for t in GGUFReader(path).tensors}


def _ne(t: ReaderTensor) -> tuple[int, ...]:
    """ggml's ne padded to 4 dims: llama-quantize writes ``ggml_n_dims`` dims, which drops trailing
    1s (``ffn_gate_inp_shexp`` ne [n_embd, 1] becomes [n_embd]); the converters keep them."""
    ne = [int(d) for d in t.shape]
    return tuple(ne + [1] * (4 - len(ne)))


def _fields(path: Path) -> dict[str, tuple[tuple[str, ...], Any]]:
    """Every metadata key with its value types and value, as gguf-py (not qwenlite) reads them."""
    return {
        k: (tuple(t.name for t in f.types), f.contents())
        for k, f in GGUFReader(path).fields.items()
        if not k.startswith("GGUF.")
    }


# --------------------------------------------------------------------------------------------------
# 1. llama.cpp runs qwenlite's files


@pytest.mark.parametrize("ftype", FTYPES)
@pytest.mark.parametrize("name", RUN_MODELS)
def test_llama_cpp_decodes_our_file_like_its_own(models: dict[str, Model], name: str, ftype: str) -> None:
    m = models[name]
    prompt = m.prompt()
    assert llama_greedy(m.ours(ftype), prompt, N_GREEDY) == llama_greedy(m.theirs(ftype), prompt, N_GREEDY)
    np.testing.assert_array_equal(llama_logits(m.ours(ftype), prompt), llama_logits(m.theirs(ftype), prompt))


# --------------------------------------------------------------------------------------------------
# 2. the same bytes, the same mix, the same metadata


@pytest.mark.parametrize("ftype", FTYPES)
@pytest.mark.parametrize("name", RUN_MODELS)
def test_every_tensor_equals_llama_cpp(models: dict[str, Model], name: str, ftype: str) -> None:
    """Same tensor names, ggml types, shapes (ne) and raw bytes, matched by name."""
    m = models[name]
    ours, theirs = _tensors(m.ours(ftype)), _tensors(m.theirs(ftype))
    assert sorted(ours) == sorted(theirs)
    wrong = [
        f"{n}: {ours[n].tensor_type.name} {_ne(ours[n])} vs {theirs[n].tensor_type.name} {_ne(theirs[n])}"
        for n in ours
        if (ours[n].tensor_type, _ne(ours[n])) != (theirs[n].tensor_type, _ne(theirs[n]))
    ]
    assert not wrong, "\n".join(wrong)
    differ = [n for n in ours if ours[n].data.tobytes() != theirs[n].data.tobytes()]
    assert not differ, f"{len(differ)}/{len(ours)} tensors differ in bytes: {differ[:10]}"


@pytest.mark.parametrize("ftype", MIXES)
@pytest.mark.parametrize("name", list(MODELS))
def test_mix_chooses_llama_quantize_types(models: dict[str, Model], name: str, ftype: str) -> None:
    """``plan`` (what convert would write) against llama-quantize's file, tensor by tensor."""
    m = models[name]
    theirs = {t.name: t.tensor_type.name for t in GGUFReader(m.theirs(ftype)).tensors}
    ours = {n: t.name for n, _, t in plan(m.hf_dir, ftype)}
    assert ours == theirs
    base, more = ("Q4_K", "Q6_K") if ftype == "q4_k_m" else ("Q5_K", "Q6_K")
    assert {base, more} <= set(ours.values())  # a real mix, not one type everywhere
    if name == "moe":
        assert {ours[f"blk.{i}.ffn_down_exps.weight"] for i in range(4)} == {base, more}
        assert ours["blk.0.ffn_down_shexp.weight"] == ("Q5_0" if ftype == "q4_k_m" else "Q5_1")  # rows of 384
    if name == "tied":
        assert "output.weight" not in ours and ours["token_embd.weight"] == more


@pytest.mark.parametrize("ftype", ["f32", "q4_k_m"])
@pytest.mark.parametrize("name", RUN_MODELS)
def test_metadata_equals_llama_cpp(models: dict[str, Model], name: str, ftype: str) -> None:
    """Every key llama.cpp writes, with the same value and value type (tokenizer arrays included)."""
    m = models[name]
    ours, theirs = _fields(m.ours(ftype)), _fields(m.theirs(ftype))
    assert set(ours) - OWN_KEYS == set(theirs) - OWN_KEYS
    wrong = [k for k in theirs if k not in OWN_KEYS and ours[k] != theirs[k]]
    assert not wrong, [(k, ours[k][0], theirs[k][0]) for k in wrong]
    if name == "moe":
        assert ours["qwen2moe.expert_weights_norm"] == (("BOOL",), False)


# --------------------------------------------------------------------------------------------------
# 3. qwenlite runs llama.cpp's files


def _load_hf(hf_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def _hf_logits(hf: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


_MOE_NAMES = {
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
_EXPERTS = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj", "ffn_down_exps.weight": "down_proj"}


def _dequantized_checkpoint(hf_dir: Path, gguf_path: Path, out: Path) -> Path:
    """``hf_dir`` with every tensor replaced by the GGUF's, dequantized by gguf-py, saved under the
    checkpoint's own names (per-expert MoE tensors), so transformers loads it however it lays out
    experts in memory."""
    from safetensors.numpy import load_file, save_file

    ref: dict[str, np.ndarray] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        ref.update(load_file(f))
    state: dict[str, np.ndarray] = {}
    for t in GGUFReader(gguf_path).tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
        _, layer, rest = t.name.split(".", 2) if t.name.startswith("blk.") else ("", "", "")
        if rest in _EXPERTS:
            names = [f"model.layers.{layer}.mlp.experts.{e}.{_EXPERTS[rest]}.weight" for e in range(int(t.shape[-1]))]
        elif rest in _MOE_NAMES:
            names = [f"model.layers.{layer}.{_MOE_NAMES[rest]}"]
        else:
            names = [hf_name(t.name)]
        for n, chunk in zip(names, np.split(values, len(names))):
            state[n] = chunk.reshape(ref[n].shape)
    assert set(state) == set(ref), sorted(set(state) ^ set(ref))
    out.mkdir()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in hf_dir.glob("*.json"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _rel_l2(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)


def _qwenlite_logits(path: Path, ids: list[int]) -> np.ndarray:
    import qwenlite

    # f32 cache: these tests bound the weight and activation arithmetic to 1e-5; the cache types'
    # own rounding is tested in test_ops / test_model_vs_hf.
    with qwenlite.load(path, n_threads=2, n_ctx=64, kv_type="f32") as q:
        return q.logits(ids)


@pytest.mark.parametrize("name", RUN_MODELS)
def test_qwenlite_runs_llama_cpp_f32_file(models: dict[str, Model], name: str) -> None:
    m = models[name]
    ids = m.prompt(11) + m.prompt(12)
    ref = _hf_logits(_load_hf(m.hf_dir), ids)
    ours = _qwenlite_logits(m.theirs("f32"), ids)
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    print(f"{name}: llama.cpp f32 file in qwenlite vs transformers: max |diff| {err:.2e}, scale {scale:.2f}")
    assert ours.shape == ref.shape
    assert err <= 1e-5 * scale
    assert (ours.argmax(1) == ref.argmax(1)).all()


@pytest.mark.parametrize("name", RUN_MODELS)
def test_qwenlite_runs_llama_cpp_q8_0_file(models: dict[str, Model], name: str) -> None:
    """Against transformers on the file's own weights and against llama.cpp on the same file; only
    8-bit activation rounding separates any two of them (see the module docstring)."""
    m = models[name]
    ids = m.prompt(11) + m.prompt(12)
    path = m.theirs("q8_0")
    ref = _hf_logits(_load_hf(_dequantized_checkpoint(m.hf_dir, path, m.tmp / "hf-llama-q8_0")), ids)
    peer = llama_logits(path, ids)
    ours = _qwenlite_logits(path, ids)
    vs_hf, vs_peer, peer_hf = _rel_l2(ours, ref), _rel_l2(ours, peer), _rel_l2(peer, ref)
    print(f"{name}: llama.cpp q8_0 file, rel L2 per position (median / max): qwenlite vs transformers on the "
          f"same weights {np.median(vs_hf):.4f} / {vs_hf.max():.4f}, qwenlite vs llama.cpp "
          f"{np.median(vs_peer):.4f} / {vs_peer.max():.4f}, llama.cpp vs transformers "
          f"{np.median(peer_hf):.4f} / {peer_hf.max():.4f}")
    assert vs_hf.max() < SAME_WEIGHTS_REL_L2
    # A router near-tie can flip in either runtime at single positions (on the MoE, llama.cpp does at
    # one position against transformers), so against llama.cpp the typical position must agree.
    assert np.median(vs_peer) < SAME_WEIGHTS_REL_L2
