"""Qwen2-MoE inference against transformers on tiny random checkpoints (tests/hf_fixtures.py).

Each config is built with ``transformers``, converted by qwenlite's converter and run by qwenlite. The
configs cover renormalized and raw top-k weights, expert widths that are not multiples of 256 (96, 160:
the k-quant fallbacks), widths of 256 (true Q4_K / Q6_K expert blocks), dense layers among sparse ones
(``mlp_only_layers`` and ``decoder_sparse_step``), many more experts than top-k, the shared expert.

Oracles, all transformers:

* F32 files: qwenlite runs float weights on float activations, so its logits must equal transformers'
  up to float32 rounding (the bound is relative to the logit scale).
* Quantized files against transformers on *the same weights* (the GGUF dequantized by gguf-py): only
  qwenlite's 8-bit activation quantization separates the two. Until the first position where that
  noise flips a router choice the logits must stay close, and that first flip must be a near-tie of
  transformers' router (after a flip the two runs legitimately diverge through the KV cache).
* Quantized files against transformers on the original float weights: the end-to-end top-1
  agreement, printed. On random Gaussian weights it is limited by the weight quantization itself,
  not by qwenlite: Q4_K's ~8% weight noise against logits whose top-2 margin is ~0.2 standard
  deviations (trained models are far more peaked), which is why its floor is modest and why the
  same-weights oracle is the precise one.
* Sparsity: one decode step reads exactly the k routed experts of every sparse layer (``bytes_read``),
  the experts transformers' router picks; a prefill runs each expert at most once per layer, over
  exactly the tokens routed to it.

The lm_head is scaled up (``LOGIT_GAIN``) so logits span a realistic range (max |logit| ~10).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hf_fixtures import make_qwen2moe_checkpoint
from safetensors.torch import load_file, save_file

from qwenlite.converters.hf_to_gguf import convert
from qwenlite.gguf.reader import GGUFFile
from qwenlite.model.ffn import DenseFFN, MoEFFN
from tests.peer import llama_logits, requires_peer

LOGIT_GAIN = 4.0
N_POSITIONS = 24  # tokens per prompt: enough positions for a rate, cheap on 2 cores
SEEDS = (11, 12)  # prompts per config

# name -> overrides of make_qwen2moe_checkpoint's defaults (hidden 64, 3 layers, layer 1 dense, 6 experts
# top-2, norm_topk_prob, expert ffn 96, shared 128, dense ffn 160).
CONFIGS: dict[str, dict[str, Any]] = {
    # 16 experts top-2, raw top-k weights (Qwen1.5-MoE / Qwen2-57B), hidden 256 so gate/up are Q4_K,
    # expert down rows of 96 fall back (Q5_0 / Q8_0), a dense layer in the middle.
    "e16k2-raw-h256": dict(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=2, num_experts=16, num_experts_per_tok=2,
        norm_topk_prob=False, moe_intermediate_size=96, shared_expert_intermediate_size=256,
        intermediate_size=512, mlp_only_layers=[1], num_hidden_layers=3,
    ),
    # 8 experts top-4, renormalized, expert ffn 160, sparse only every second layer (0, 2 dense).
    "e8k4-norm-step2": dict(
        num_experts=8, num_experts_per_tok=4, norm_topk_prob=True, moe_intermediate_size=160,
        decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=4,
    ),
    # Everything a multiple of 256: every expert matrix is a true k-quant; all layers sparse.
    "e8k2-norm-all256": dict(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, moe_intermediate_size=256, shared_expert_intermediate_size=512,
        mlp_only_layers=[], num_hidden_layers=2,
    ),
}  # fmt: skip

QUANTIZED = ("q8_0", "q4_k_m")
# Minimum top-1 agreement over all configs and prompts, against transformers on the file's own
# (dequantized) weights and on the original float weights (see the module docstring).
TOP1_FLOOR_SAME_WEIGHTS = {"q8_0": 0.95, "q4_k_m": 0.9}
TOP1_FLOOR_ORIGINAL = {"q8_0": 0.9, "q4_k_m": 0.6}
# Relative L2 logit error against the same weights before any router flip (activation noise only).
SAME_WEIGHTS_REL_L2 = 0.04
# A router flip caused by activation noise: transformers' router logits of the swapped experts lie
# this close (router logits have a standard deviation of ~0.4-0.8 here).
ROUTER_TIE = 0.05


@dataclass
class Case:
    """One config: its checkpoint, transformers model and converted files."""

    name: str
    hf_dir: Path
    hf: Any
    ggufs: dict[str, Path]
    prompts: list[list[int]]
    same_weights: dict[str, Any]  # ftype -> transformers on that file's dequantized weights

    @property
    def k(self) -> int:
        return int(self.hf.config.num_experts_per_tok)


def _sharpen_lm_head(hf_dir: Path) -> None:
    """Multiply lm_head by LOGIT_GAIN in the saved checkpoint (see the module docstring)."""
    for f in sorted(hf_dir.glob("*.safetensors")):
        tensors = load_file(f)
        if "lm_head.weight" in tensors:
            tensors["lm_head.weight"] = tensors["lm_head.weight"] * LOGIT_GAIN
            save_file(tensors, str(f), metadata={"format": "pt"})


_HF_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
}
_HF_EXPERTS = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
_HF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}  # fmt: skip


def _dequantized_checkpoint(hf_dir: Path, gguf_path: Path, out: Path) -> Path:
    """``hf_dir`` with every weight replaced by the GGUF's, dequantized by gguf-py (not by qwenlite).

    transformers on this checkpoint computes with exactly the weights qwenlite reads, so what remains
    between the two is qwenlite's activation quantization (and any kernel bug)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ref = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        ref.update(load_file(f))
    state: dict[str, torch.Tensor] = {}
    for t in GGUFReader(gguf_path).tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        values = values.reshape(tuple(int(d) for d in reversed(t.shape)))
        if t.name in _HF_GLOBAL:
            state[_HF_GLOBAL[t.name]] = torch.from_numpy(values)
            continue
        _, layer, rest = t.name.split(".", 2)
        p = f"model.layers.{layer}."
        if rest in _HF_EXPERTS:
            for e, w in enumerate(values):
                state[f"{p}mlp.experts.{e}.{_HF_EXPERTS[rest]}.weight"] = torch.from_numpy(np.ascontiguousarray(w))
        else:
            state[p + _HF_NAMES[rest]] = torch.from_numpy(values)
    assert set(state) == set(ref)
    out.mkdir()
    for name, tensor in state.items():
        state[name] = tensor.reshape(ref[name].shape).contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in hf_dir.glob("*.json"):
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _load_hf(hf_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()


def _build(name: str, tmp: Path) -> Case:
    hf_dir = make_qwen2moe_checkpoint(tmp, name=name, seed=len(name), **CONFIGS[name])
    _sharpen_lm_head(hf_dir)
    ggufs = {t: convert(hf_dir, tmp / f"{name}-{t}.gguf", t, progress=False) for t in ("f32", *QUANTIZED)}
    n_vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    prompts = [np.random.default_rng(s).integers(0, n_vocab - 8, N_POSITIONS).tolist() for s in SEEDS]
    same = {t: _load_hf(_dequantized_checkpoint(hf_dir, ggufs[t], tmp / f"hf-{t}")) for t in QUANTIZED}
    return Case(name, hf_dir, _load_hf(hf_dir), ggufs, prompts, same)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    return {name: _build(name, tmp_path_factory.mktemp(name)) for name in CONFIGS}


@pytest.fixture(params=list(CONFIGS))
def case(request: pytest.FixtureRequest, cases: dict[str, Case]) -> Case:
    return cases[request.param]


def _load(path: Path) -> Any:
    import qwenlite

    return qwenlite.load(path, n_threads=2, n_ctx=64, kv_type="f32")  # exact math; cache types tested apart


def _hf_logits(hf: Any, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().numpy()


def _hf_routes(hf: Any, ids: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """layer -> (router logits [T, n_expert], expert ids [T, k]) of transformers' run over ``ids``."""
    routes: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        if hasattr(layer.mlp, "experts"):

            def grab(_m: Any, _inp: Any, out: Any, i: int = i) -> None:
                routes[i] = (out[0].numpy(), out[2].numpy())

            hooks.append(layer.mlp.gate.register_forward_hook(grab))
    try:
        with torch.no_grad():
            hf(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return routes


def _sparse_layers(hf: Any) -> list[int]:
    return [i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "experts")]


def _rel_l2(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)


class _BackendSpy:
    """Stands in for the model's backend and logs (layer, expert, n_tokens) per segment that a MoE
    layer's gate projection runs."""

    def __init__(self, be: Any, gates: dict[int, int], log: Any) -> None:
        self.be, self.gates, self.log = be, gates, log

    def linear_experts(self, w: Any, x: np.ndarray, starts: np.ndarray, experts: np.ndarray) -> np.ndarray:
        layer = self.gates.get(id(w))
        if layer is not None:
            for j, e in enumerate(experts):
                self.log(layer, int(e), int(starts[j + 1] - starts[j]))
        return self.be.linear_experts(w, x, starts, experts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.be, name)


class _Recorder:
    """Wraps every MoE block of a loaded model to record the routes it takes and the experts it runs."""

    def __init__(self, model: Any) -> None:
        self.calls: list[tuple[int, int, int]] = []  # (layer, expert, n_tokens)
        self.routes: dict[int, np.ndarray] = {}  # layer -> expert ids [T, k] of the last call
        self.moe = {i: b.ffn for i, b in enumerate(model.network.blocks) if isinstance(b.ffn, MoEFFN)}
        for i, ffn in self.moe.items():
            route = ffn.route

            def take_route(be: Any, x: np.ndarray, i: int = i, route: Any = route) -> tuple[np.ndarray, np.ndarray]:
                top, weights = route(be, x)
                self.routes[i] = top
                return top, weights

            ffn.route = take_route
        gates = {id(ffn.gate): i for i, ffn in self.moe.items()}
        model.network.backend = _BackendSpy(model.network.backend, gates, lambda i, e, n: self.calls.append((i, e, n)))

    def reset(self) -> None:
        self.calls.clear()
        for ffn in self.moe.values():
            ffn.bytes_read = 0

    def bytes_read(self) -> int:
        return sum(ffn.bytes_read for ffn in self.moe.values())


def _expert_bytes(ffn: MoEFFN) -> int:
    """Bytes of one expert's gate, up and down matrices in the file (all experts of a layer are alike)."""
    return sum(lin.w[0].nbytes for lin in (ffn.gate, ffn.up, ffn.down))


def test_layer_kinds_follow_the_checkpoint(case: Case) -> None:
    """A layer is sparse in qwenlite exactly where transformers built a sparse block."""
    with _load(case.ggufs["f32"]) as m:
        kinds = [isinstance(b.ffn, MoEFFN) for b in m.network.blocks]
        assert all(isinstance(b.ffn, MoEFFN | DenseFFN) for b in m.network.blocks)
        assert [i for i, s in enumerate(kinds) if s] == _sparse_layers(case.hf)
        assert m.config.expert_weights_norm == bool(case.hf.config.norm_topk_prob)


def test_f32_logits_equal_transformers(case: Case) -> None:
    with _load(case.ggufs["f32"]) as m:
        for ids in case.prompts:
            ours, ref = m.logits(ids), _hf_logits(case.hf, ids)
            scale = float(np.abs(ref).max())
            err = float(np.abs(ours - ref).max())
            print(f"{case.name} f32: max |logit| {scale:.2f}, max |diff| {err:.2e} ({err / scale:.1e} relative)")
            assert ours.shape == ref.shape
            assert err <= 1e-5 * scale, f"{case.name}: f32 logits differ by {err:.2e} (scale {scale:.2f})"
            assert (ours.argmax(1) == ref.argmax(1)).all()


def test_f32_decode_equals_prefill(case: Case) -> None:
    """Token-by-token decode (one token per MoE call) gives the prefill's logits."""
    ids = case.prompts[0][:10]
    with _load(case.ggufs["f32"]) as m:
        full = m.logits(ids)
        eng = m.engine
        eng.reset()
        eng.eval(ids[:6])
        steps = np.stack([eng.eval([t]) for t in ids[6:]])
    np.testing.assert_allclose(steps, full[6:], rtol=0, atol=1e-5 * float(np.abs(full).max()))


def _first_flip(ours: dict[int, np.ndarray], ref: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[int, float]:
    """(position, router-logit margin) of the first (position, layer) where qwenlite routes a token to
    other experts than transformers; (T, 0.0) when none does. The margin is how much transformers'
    router preferred its choice over ours: near 0 for a flip caused by rounding."""
    n_pos = next(iter(ref.values()))[1].shape[0]
    for p in range(n_pos):
        for layer in sorted(ref):
            logits, top = ref[layer]
            theirs, mine = set(top[p].tolist()), set(ours[layer][p].tolist())
            if theirs != mine:
                return p, float(logits[p, sorted(theirs - mine)].min() - logits[p, sorted(mine - theirs)].max())
    return n_pos, 0.0


@pytest.mark.parametrize("ftype", QUANTIZED)
def test_quantized_matches_transformers_on_the_same_weights(case: Case, ftype: str) -> None:
    """A wrong block layout, expert stride, routing or gate would show up here as a gross error."""
    with _load(case.ggufs[ftype]) as m:
        rec = _Recorder(m)
        for ids in case.prompts:
            ours, ref = m.logits(ids), _hf_logits(case.same_weights[ftype], ids)
            flip, margin = _first_flip(rec.routes, _hf_routes(case.same_weights[ftype], ids))
            rel = _rel_l2(ours, ref)
            clean = rel[:flip]
            print(
                f"{case.name} {ftype} vs transformers on the same weights: {flip}/{len(ids)} positions before "
                f"the first router flip, rel L2 there max {clean.max(initial=0):.4f}; flip margin {margin:.4f}; "
                f"rel L2 overall mean {rel.mean():.4f}"
            )
            assert clean.max(initial=0.0) < SAME_WEIGHTS_REL_L2, f"{case.name} {ftype}: rel L2 {clean.max():.4f}"
            assert 0.0 <= margin < ROUTER_TIE, f"{case.name} {ftype}: router flip at position {flip}, margin {margin}"


@pytest.mark.parametrize("ftype", QUANTIZED)
def test_quantized_top1_agreement(cases: dict[str, Case], ftype: str) -> None:
    """Top-1 agreement over all configs, against both oracles; the figures are printed."""
    same = [0, 0]
    orig = [0, 0]
    for case in cases.values():
        with _load(case.ggufs[ftype]) as m:
            for ids in case.prompts:
                top = m.logits(ids).argmax(1)
                a = int((top == _hf_logits(case.same_weights[ftype], ids).argmax(1)).sum())
                b = int((top == _hf_logits(case.hf, ids).argmax(1)).sum())
                print(f"{case.name} {ftype}: top-1 agree {a}/{len(ids)} (same weights), {b}/{len(ids)} (original)")
                same = [same[0] + a, same[1] + len(ids)]
                orig = [orig[0] + b, orig[1] + len(ids)]
    print(
        f"MoE {ftype} top-1 agreement with transformers: same weights {same[0]}/{same[1]} = "
        f"{same[0] / same[1]:.1%} (floor {TOP1_FLOOR_SAME_WEIGHTS[ftype]:.0%}), original float weights "
        f"{orig[0]}/{orig[1]} = {orig[0] / orig[1]:.1%} (floor {TOP1_FLOOR_ORIGINAL[ftype]:.0%})"
    )
    assert same[0] / same[1] >= TOP1_FLOOR_SAME_WEIGHTS[ftype]
    assert orig[0] / orig[1] >= TOP1_FLOOR_ORIGINAL[ftype]


@pytest.mark.parametrize("ftype", ["f32", "q4_k_m"])
def test_decode_reads_only_the_routed_experts(case: Case, ftype: str) -> None:
    ids = case.prompts[1][:9]
    ref = _hf_routes(case.hf if ftype == "f32" else case.same_weights[ftype], ids)
    with _load(case.ggufs[ftype]) as m:
        rec = _Recorder(m)
        m.engine.reset()
        m.engine.eval(ids[:-1])
        prefill_routes = dict(rec.routes)
        rec.reset()
        m.engine.eval(ids[-1:])
        assert sorted(rec.moe) == sorted(ref)
        per_layer = {i: _expert_bytes(ffn) for i, ffn in rec.moe.items()}
        total = sum(ffn.gate.w.nbytes + ffn.up.w.nbytes + ffn.down.w.nbytes for ffn in rec.moe.values())
        print(
            f"{case.name} {ftype}: one decode step read {rec.bytes_read()} of {total} expert bytes "
            f"({case.k} of {m.config.n_expert} experts per sparse layer, expert bytes by layer {per_layer})"
        )
        assert rec.bytes_read() == sum(case.k * b for b in per_layer.values())
        routes = {i: np.concatenate([prefill_routes[i], rec.routes[i]]) for i in rec.moe}
        for layer in rec.moe:
            ran = [(e, n) for i, e, n in rec.calls if i == layer]
            assert sorted(ran) == [(e, 1) for e in sorted(rec.routes[layer][0].tolist())], f"layer {layer}"
        # Same experts as transformers' router, unless activation rounding flipped a near-tie first.
        flip, margin = _first_flip(routes, ref)
        assert flip == len(ids) or (ftype != "f32" and margin < ROUTER_TIE), f"router flip at {flip} ({margin})"


def test_prefill_runs_each_expert_once_over_its_tokens(case: Case) -> None:
    ids = case.prompts[0]
    ref = _hf_routes(case.hf, ids)
    with _load(case.ggufs["f32"]) as m:
        rec = _Recorder(m)
        m.engine.reset()
        rec.reset()
        m.engine.eval(ids)
        want_bytes = 0
        for layer, ffn in rec.moe.items():
            calls = sorted((e, n) for i, e, n in rec.calls if i == layer)
            assert len(calls) == len({e for e, _ in calls}), f"layer {layer}: an expert ran twice"
            picked, counts = np.unique(ref[layer][1], return_counts=True)
            assert calls == list(zip(picked.tolist(), counts.tolist())), f"layer {layer}"
            want_bytes += len(picked) * _expert_bytes(ffn)
        assert rec.bytes_read() == want_bytes


# Synthetic full-size files (converters/synthetic.py) at a tiny shape: the real Qwen vocabulary, the
# Q4_K_M mix's types, random valid blocks. Expert ffn 384 is not a multiple of 256 (like A2.7B's 1408).
TINY_SHAPE = dict(
    n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_expert=8, n_expert_used=2, n_ff_expert=384,
    n_ff_shared=512, n_ff=512, n_ctx=128,
)  # fmt: skip


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory: pytest.TempPathFactory, real_model_path: Path) -> Path:
    from qwenlite.converters.synthetic import MoEShape, write_synthetic

    out = tmp_path_factory.mktemp("synthetic") / "tiny-moe-q4_k_m.gguf"
    return write_synthetic(MoEShape(**TINY_SHAPE), out, "q4_k_m", vocab_from=real_model_path, progress=False)


def test_synthetic_file_has_the_mix_types_and_sane_weights(synthetic_file: Path, real_model_path: Path) -> None:
    """Types follow the converter's Q4_K_M rules; gguf-py dequantizes every block to finite weights of
    the intended std (so the scale-field offsets are right for each type); the vocabulary is the source's."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from qwenlite.converters.mixes import choose_types
    from qwenlite.converters.synthetic import MoEShape, tensor_shapes, weight_std

    shape = MoEShape(**TINY_SHAPE)
    reader = GGUFReader(synthetic_file)
    found = {t.name: t for t in reader.tensors}
    want = tensor_shapes(shape)
    assert list(found) == [n for n, _ in want]
    kinds = set()
    for (name, shp), qt in zip(want, choose_types(want, "q4_k_m", shape.n_layer, shape.n_expert)):
        t = found[name]
        assert t.tensor_type.name == (qt.name if qt is not None else "F32"), name
        assert tuple(int(d) for d in reversed(t.shape)) == shp, name
        if qt is not None:
            w = dequantize(t.data, t.tensor_type)
            assert np.isfinite(w).all(), name
            std = weight_std(name, shape.n_layer)
            assert 0.6 * std < float(w.std()) < 1.5 * std and abs(float(w.mean())) < 0.25 * std, (name, w.std())
            kinds.add(t.tensor_type.name)
    assert {"Q4_K", "Q6_K", "Q5_0"} <= kinds  # true k-quants and the fallback of the 384-wide expert down
    with GGUFFile(synthetic_file) as f, GGUFFile(real_model_path) as src:
        assert f.metadata["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]
        assert f.metadata["qwen2moe.expert_used_count"] == shape.n_expert_used


def test_synthetic_file_runs_sparsely(synthetic_file: Path) -> None:
    """It loads, gives finite logits, and the router spreads tokens over the experts."""
    with _load(synthetic_file) as m:
        rec = _Recorder(m)
        ids = m.tokenize("def fibonacci(n):\n    if n < 2:\n        return n\n")
        logits = m.engine.eval(ids)
        assert np.isfinite(logits).all()
        for layer, top in rec.routes.items():
            assert len(np.unique(top)) >= TINY_SHAPE["n_expert"] // 2, f"layer {layer} routes to {np.unique(top)}"
        rec.reset()
        m.engine.eval([int(np.argmax(logits))])
        assert rec.bytes_read() == sum(TINY_SHAPE["n_expert_used"] * _expert_bytes(f) for f in rec.moe.values())


@pytest.mark.peer
@requires_peer
def test_synthetic_file_matches_llama_cpp(synthetic_file: Path) -> None:
    """llama.cpp computes the same logits from the same file (both quantize activations like ggml)."""
    ids = [9707, 1879, 13, 576, 3974, 374, 264, 1273]
    ref = llama_logits(synthetic_file, ids)
    with _load(synthetic_file) as m:
        ours = m.logits(ids)
    rel = _rel_l2(ours, ref)
    agree = int((ours.argmax(1) == ref.argmax(1)).sum())
    print(f"synthetic tiny MoE vs llama.cpp: rel L2 max {rel.max():.4f}, top-1 agree {agree}/{len(ids)}")
    assert rel.max() < SAME_WEIGHTS_REL_L2


@pytest.mark.parametrize("ftype", ["f32", "q8_0"])
def test_batched_moe_logits_are_bitwise_equal_to_alone(case: Case, ftype: str) -> None:
    """Routing, grouped experts and the combine are row-wise: a sequence's logits do not change by a
    bit when other sequences share its forward passes (different experts are then picked together),
    on any thread count."""
    import numba

    with _load(case.ggufs[ftype]) as m:
        alone = [m.logits(ids) for ids in case.prompts]
        for a, b in zip(alone, m.logits_batch(case.prompts)):
            np.testing.assert_array_equal(a, b)
        before = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            np.testing.assert_array_equal(m.logits(case.prompts[0]), alone[0])
        finally:
            numba.set_num_threads(before)
