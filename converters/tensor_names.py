"""Which GGUF tensors a Qwen2 / Qwen2-MoE model has, their shapes, and the HF tensors they come from.

GGUF names are the templates of ``qwenlite.gguf.names`` (llama.cpp's: ``token_embd``, ``blk.N.attn_q``,
...), the ones the loader reads. Shapes are numpy order, i.e. the HF ``nn.Linear`` weight shape
``(n_out, n_in)`` unchanged (GGUF stores ``ne`` reversed). MoE experts are stacked into one
``(n_expert, n_out, n_in)`` tensor per projection, from either checkpoint layout: one 2-D tensor per
expert (``mlp.experts.E.gate_proj.weight``, what transformers saves) or fused 3-D tensors
(``mlp.experts.gate_up_proj`` with gate rows first, ``mlp.experts.down_proj``).

``tensor_specs`` lists tensors layer by layer; ``llama_cpp_order`` reorders them the way llama.cpp's
converter emits them (see there), which is what llama-quantize's per-layer counters depend on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from qwenlite.errors import QwenliteError
from qwenlite.gguf import names as gn
from qwenlite.model.config import ModelConfig


@dataclass(frozen=True)
class SourceRef:
    """A 2-D (or 1-D) piece of an HF tensor: ``hf_name[index][row_start:row_stop]``."""

    hf_name: str
    hf_shape: tuple[int, ...]  # the shape the whole HF tensor must have
    index: int | None = None
    row_start: int | None = None
    row_stop: int | None = None


@dataclass(frozen=True)
class TensorSpec:
    """One GGUF tensor; its data is its sources concatenated along rows (stacking experts)."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[SourceRef, ...]


def _linear(gguf: str, hf: str, n_out: int, n_in: int) -> TensorSpec:
    """A matrix ``gguf`` (a full tensor name) from the HF ``nn.Linear`` weight ``hf.weight``."""
    return TensorSpec(gguf, (n_out, n_in), (SourceRef(f"{hf}.weight", (n_out, n_in)),))


def _vector(gguf: str, hf: str, n: int) -> TensorSpec:
    return TensorSpec(gguf, (n,), (SourceRef(hf, (n,)),))


def _experts(has: Callable[[str], bool], cfg: ModelConfig, i: int, hf: str) -> list[TensorSpec]:
    """gate/up/down expert stacks of layer ``i``, from per-expert or fused checkpoint tensors."""
    n_e, d, f = cfg.n_expert, cfg.n_embd, cfg.n_ff_expert
    fused_gu, fused_down = f"{hf}.experts.gate_up_proj", f"{hf}.experts.down_proj"
    if has(fused_gu) or has(fused_gu + ".weight"):
        gu = fused_gu if has(fused_gu) else fused_gu + ".weight"
        down = fused_down if has(fused_down) else fused_down + ".weight"
        gate = tuple(SourceRef(gu, (n_e, 2 * f, d), e, 0, f) for e in range(n_e))
        up = tuple(SourceRef(gu, (n_e, 2 * f, d), e, f, 2 * f) for e in range(n_e))
        dn = tuple(SourceRef(down, (n_e, d, f), e) for e in range(n_e))
    else:

        def per(proj: str, shape: tuple[int, int]) -> tuple[SourceRef, ...]:
            return tuple(SourceRef(f"{hf}.experts.{e}.{proj}.weight", shape) for e in range(n_e))

        gate, up, dn = per("gate_proj", (f, d)), per("up_proj", (f, d)), per("down_proj", (d, f))
    return [
        TensorSpec(gn.weight(gn.FFN_GATE_EXPS, i), (n_e, f, d), gate),
        TensorSpec(gn.weight(gn.FFN_UP_EXPS, i), (n_e, f, d), up),
        TensorSpec(gn.weight(gn.FFN_DOWN_EXPS, i), (n_e, d, f), dn),
    ]


def tensor_specs(cfg: ModelConfig, has: Callable[[str], bool]) -> list[TensorSpec]:
    """All GGUF tensors of the model in file order. ``has(hf_name)`` tells which checkpoint tensors
    exist (only consulted for the expert layout)."""
    d, hd = cfg.n_embd, cfg.head_dim
    q_out, kv_out = cfg.n_head * hd, cfg.n_head_kv * hd
    trunk = trunk_prefix(has)
    specs = [_linear(gn.weight(gn.TOKEN_EMBD), f"{trunk}.embed_tokens", cfg.n_vocab, d)]
    for i in range(cfg.n_layer):
        hf = f"{trunk}.layers.{i}"
        specs.append(_vector(gn.weight(gn.ATTN_NORM, i), f"{hf}.input_layernorm.weight", d))
        qkv = ((gn.ATTN_Q, "q_proj", q_out), (gn.ATTN_K, "k_proj", kv_out), (gn.ATTN_V, "v_proj", kv_out))
        for name, proj, n_out in qkv:
            specs.append(_linear(gn.weight(name, i), f"{hf}.self_attn.{proj}", n_out, d))
            if cfg.qkv_bias:
                specs.append(_vector(gn.bias(name, i), f"{hf}.self_attn.{proj}.bias", n_out))
        specs.append(_linear(gn.weight(gn.ATTN_OUT, i), f"{hf}.self_attn.o_proj", d, q_out))
        specs.append(_vector(gn.weight(gn.FFN_NORM, i), f"{hf}.post_attention_layernorm.weight", d))
        mlp = f"{hf}.mlp"
        if not cfg.is_sparse(i):
            gate, up, down = (gn.weight(t, i) for t in gn.FFN_DENSE)
            specs.append(_linear(gate, f"{mlp}.gate_proj", cfg.n_ff, d))
            specs.append(_linear(up, f"{mlp}.up_proj", cfg.n_ff, d))
            specs.append(_linear(down, f"{mlp}.down_proj", d, cfg.n_ff))
            continue
        specs.append(_linear(gn.weight(gn.FFN_GATE_INP, i), f"{mlp}.gate", cfg.n_expert, d))
        specs.extend(_experts(has, cfg, i, mlp))
        # (1, n_embd) like llama.cpp's converter: ggml sees a 1-D tensor, so it stays F32
        specs.append(_linear(gn.weight(gn.FFN_GATE_INP_SHEXP, i), f"{mlp}.shared_expert_gate", 1, d))
        sh = cfg.n_ff_shared
        gate, up, down = (gn.weight(t, i) for t in gn.FFN_SHEXP)
        specs.append(_linear(gate, f"{mlp}.shared_expert.gate_proj", sh, d))
        specs.append(_linear(up, f"{mlp}.shared_expert.up_proj", sh, d))
        specs.append(_linear(down, f"{mlp}.shared_expert.down_proj", d, sh))
    specs.append(_vector(gn.weight(gn.OUTPUT_NORM), f"{trunk}.norm.weight", d))
    if cfg.has_lm_head and not cfg.tied_embeddings:
        specs.append(_linear(gn.weight(gn.OUTPUT), "lm_head", cfg.n_vocab, d))
    if not cfg.has_lm_head:
        hf = HEADS[cfg.task]
        specs.append(_linear(gn.weight(gn.CLS_OUT), hf, len(cfg.labels), d))
        if has(f"{hf}.bias"):
            specs.append(_vector(gn.bias(gn.CLS_OUT), f"{hf}.bias", len(cfg.labels)))
    return specs


# The HF module of each task head (transformers' Generic*For* classes): ``score`` (sequence
# classification has no bias, token classification has one), ``qa_outputs`` (start and end rows).
HEADS = {"sequence-classification": "score", "token-classification": "score", "question-answering": "qa_outputs"}


def trunk_prefix(has: Callable[[str], bool]) -> str:
    """Where the decoder's tensors are: ``model.`` in every Qwen2 class but Qwen2ForQuestionAnswering,
    which keeps transformers' old name ``transformer.``."""
    return "transformer" if has("transformer.embed_tokens.weight") else "model"


def llama_cpp_order(specs: list[TensorSpec], hf_order: list[str]) -> list[TensorSpec]:
    """The specs in the order llama.cpp's converter writes them: it walks the checkpoint's tensors in
    ``hf_order`` (shards sorted, names sorted within a shard: blk 0, 1, 10, 11, ..., 2, 20, ...) and
    emits each GGUF tensor when its last source arrives (a stacked expert tensor after its last
    expert). llama-quantize counts ``attn_v`` (and a dense model's ``ffn_down``) in file order, so this
    order is what makes a qwenlite Q4_K_M choose the same per-layer types as a llama.cpp one."""
    position = {name: i for i, name in enumerate(hf_order)}
    return sorted(specs, key=lambda s: max(position[r.hf_name] for r in s.sources))


def check_sources(specs: list[TensorSpec], shape_of: Callable[[str], tuple[int, ...] | None]) -> None:
    """Every HF tensor a spec needs exists with the shape the config implies."""
    for spec in specs:
        for ref in spec.sources:
            shape = shape_of(ref.hf_name)
            if shape is None:
                raise QwenliteError(f"checkpoint is missing tensor {ref.hf_name!r} (needed for {spec.name})")
            if tuple(shape) != ref.hf_shape:
                raise QwenliteError(
                    f"tensor {ref.hf_name!r} has shape {tuple(shape)}, but config.json implies {ref.hf_shape}"
                )


def ignored_hf_tensors(specs: list[TensorSpec], names: list[str], cfg: ModelConfig) -> list[str]:
    """Checkpoint tensors no spec uses (a tied ``lm_head.weight`` and rotary caches are expected)."""
    used = {ref.hf_name for spec in specs for ref in spec.sources}
    harmless = {"lm_head.weight"} if cfg.tied_embeddings and cfg.has_lm_head else set()
    return [n for n in names if n not in used and n not in harmless and not n.endswith("rotary_emb.inv_freq")]
