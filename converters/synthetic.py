"""Synthetic full-size Qwen2-MoE GGUF files for speed work.

No real Qwen2-MoE weights can be downloaded here, yet MoE speed depends only on shapes and types. This
writes a file with the exact tensor shapes of Qwen1.5-MoE-A2.7B or Qwen2-57B-A14B, the per-tensor types
of the chosen mix (same rules as the converter), the real Qwen tokenizer copied from another GGUF, and
random but valid blocks: every scale field holds a small finite f16, so activations stay finite and the
router still spreads tokens over many experts. Random bytes are written directly instead of quantizing
random floats, which turns a job of hours into one bounded by disk speed.

    python -m qwenlite.converters.synthetic qwen1.5-moe-a2.7b -o moe-a2.7b-q4_k_m.gguf [--vocab-from MODEL.gguf]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qwenlite import quant
from qwenlite.converters.mixes import choose_types, file_type
from qwenlite.converters.progress import Progress
from qwenlite.errors import QwenliteError
from qwenlite.gguf import names as gn
from qwenlite.gguf.constants import GGMLType, GGUFValueType
from qwenlite.gguf.reader import GGUFFile
from qwenlite.gguf.writer import GGUFWriter


@dataclass(frozen=True)
class MoEShape:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_expert: int
    n_expert_used: int
    n_ff_expert: int
    n_ff_shared: int
    n_ff: int
    n_ctx: int
    n_vocab: int = 151936


SHAPES = {
    "qwen1.5-moe-a2.7b": MoEShape(24, 2048, 16, 16, 60, 4, 1408, 5632, 5632, 8192),
    "qwen2-57b-a14b": MoEShape(28, 3584, 28, 4, 64, 8, 2560, 20480, 18944, 32768),
}

# Byte offsets of the f16 scale fields in each block, and the scale that gives weights of std ~0.02
# (``random_data`` multiplies them by the tensor's own std / 0.02).
_SCALE_FIELDS: dict[GGMLType, tuple[tuple[int, float], ...]] = {
    GGMLType.Q4_0: ((0, 0.02 / 4.6),),
    GGMLType.Q5_0: ((0, 0.02 / 9.2),),
    GGMLType.Q5_1: ((0, 0.02 / 9.2), (2, -0.02 * 15.5 / 9.2)),
    GGMLType.Q8_0: ((0, 0.02 / 74.0),),
    GGMLType.Q4_K: ((0, 0.02 / 250.0), (2, 0.02 * 7.5 / 250.0)),
    GGMLType.Q5_K: ((0, 0.02 / 500.0), (2, 0.02 * 15.5 / 500.0)),
    GGMLType.Q6_K: ((208, 0.02 / 1350.0),),
}


def tensor_shapes(s: MoEShape) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the model in llama.cpp's order, numpy shapes."""
    d, kv = s.n_embd, s.n_head_kv * (s.n_embd // s.n_head)
    w, b = gn.weight, gn.bias
    out: list[tuple[str, tuple[int, ...]]] = [(w(gn.TOKEN_EMBD), (s.n_vocab, d))]
    for i in range(s.n_layer):
        out += [
            (w(gn.ATTN_NORM, i), (d,)),
            (w(gn.ATTN_Q, i), (d, d)),
            (b(gn.ATTN_Q, i), (d,)),
            (w(gn.ATTN_K, i), (kv, d)),
            (b(gn.ATTN_K, i), (kv,)),
            (w(gn.ATTN_V, i), (kv, d)),
            (b(gn.ATTN_V, i), (kv,)),
            (w(gn.ATTN_OUT, i), (d, d)),
            (w(gn.FFN_NORM, i), (d,)),
            (w(gn.FFN_GATE_INP, i), (s.n_expert, d)),
            (w(gn.FFN_GATE_EXPS, i), (s.n_expert, s.n_ff_expert, d)),
            (w(gn.FFN_UP_EXPS, i), (s.n_expert, s.n_ff_expert, d)),
            (w(gn.FFN_DOWN_EXPS, i), (s.n_expert, d, s.n_ff_expert)),
            (w(gn.FFN_GATE_INP_SHEXP, i), (1, d)),  # as HF's shared_expert_gate [1, d], like the converter
            (w(gn.FFN_GATE_SHEXP, i), (s.n_ff_shared, d)),
            (w(gn.FFN_UP_SHEXP, i), (s.n_ff_shared, d)),
            (w(gn.FFN_DOWN_SHEXP, i), (d, s.n_ff_shared)),
        ]
    return out + [(w(gn.OUTPUT_NORM), (d,)), (w(gn.OUTPUT), (s.n_vocab, d))]


# Projections that write into the residual stream (see weight_std), as name endings.
_RESIDUAL_WRITERS = tuple(
    gn.leaf(t) + ".weight" for t in (gn.ATTN_OUT, gn.FFN_DOWN, gn.FFN_DOWN_EXPS, gn.FFN_DOWN_SHEXP)
)


def weight_std(name: str, n_layer: int) -> float:
    """Standard deviation of a weight tensor's values.

    With every weight at 0.02 the residual stream of a random model fills up with the attention
    branch's running average, which is nearly the same at every position, and the router then sends
    all tokens to the same few experts, unlike a real model (and unfair to a prefill benchmark). So
    the embedding is larger and the projections that write into the residual stream are scaled down
    by sqrt(2 n_layer) (GPT-2's init): each token's own embedding keeps steering its routing.
    """
    if name == gn.weight(gn.TOKEN_EMBD):
        return 0.1
    if name.endswith(_RESIDUAL_WRITERS):
        return 0.02 / float(np.sqrt(2 * n_layer))
    return 0.02


def random_data(
    name: str, shape: tuple[int, ...], qtype: GGMLType, rng: np.random.Generator, std: float = 0.02
) -> np.ndarray:
    """Valid random data for one tensor (norms 1, biases 0, weights of mean 0 and std ``std``)."""
    n = int(np.prod(shape))
    if qtype == GGMLType.F32:
        if name.endswith("_norm.weight"):
            return np.ones(n, np.float32)
        if name.endswith(".bias"):
            return np.zeros(n, np.float32)
        return (rng.standard_normal(n, dtype=np.float32) * np.float32(std)).astype(np.float32)
    if qtype in (GGMLType.F16, GGMLType.BF16):
        x = rng.standard_normal((n // shape[-1], shape[-1]), dtype=np.float32) * np.float32(std)
        return quant.quantize(x, qtype)
    fmt = quant.FORMATS[qtype]
    blocks = np.frombuffer(rng.bytes(n // fmt.BLOCK_SIZE * fmt.TYPE_SIZE), np.uint8).reshape(-1, fmt.TYPE_SIZE)
    blocks = blocks.copy()
    for offset, scale in _SCALE_FIELDS[qtype]:
        blocks[:, offset : offset + 2] = np.frombuffer(np.float16(scale * std / 0.02).tobytes(), np.uint8)
    return blocks


def write_synthetic(
    shape_name: str | MoEShape,
    out: Path,
    ftype: str = "q4_k_m",
    vocab_from: Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write the synthetic model ``shape_name`` (a name in SHAPES, or a shape) to ``out``; the tokenizer
    comes from ``vocab_from``."""
    if isinstance(shape_name, MoEShape):
        s, shape_name = shape_name, "custom"
    elif shape_name in SHAPES:
        s = SHAPES[shape_name]
    else:
        raise QwenliteError(f"unknown shape {shape_name!r}; choose one of {', '.join(SHAPES)}")
    ft = file_type(ftype)
    if vocab_from is None:
        from qwenlite import hub

        vocab_from = hub.resolve_model(None, progress=progress)
    rng = np.random.default_rng(seed)
    a = "qwen2moe"
    with GGUFFile(vocab_from) as src, GGUFWriter(out) as w:
        tokens = src.get(gn.TOKENS)
        if not tokens:
            raise QwenliteError(f"{vocab_from} has no tokenizer to copy")
        s = replace(s, n_vocab=len(tokens))  # the embedding rows follow the vocabulary actually copied
        tensors = tensor_shapes(s)
        types = [t or GGMLType.F32 for t in choose_types(tensors, ft, s.n_layer, s.n_expert)]
        w.add_string(gn.ARCHITECTURE, a)
        w.add_string(gn.NAME, f"synthetic {shape_name} (random weights)")
        for key, value in {
            gn.BLOCK_COUNT: s.n_layer,
            gn.CONTEXT_LENGTH: s.n_ctx,
            gn.EMBEDDING_LENGTH: s.n_embd,
            gn.FEED_FORWARD_LENGTH: s.n_ff,
            gn.HEAD_COUNT: s.n_head,
            gn.HEAD_COUNT_KV: s.n_head_kv,
            gn.EXPERT_COUNT: s.n_expert,
            gn.EXPERT_USED_COUNT: s.n_expert_used,
            gn.EXPERT_FEED_FORWARD_LENGTH: s.n_ff_expert,
            gn.EXPERT_SHARED_FEED_FORWARD_LENGTH: s.n_ff_shared,
        }.items():
            w.add_uint32(gn.arch_key(key, a), value)
        w.add_float32(gn.arch_key(gn.ROPE_FREQ_BASE, a), 1e6)
        w.add_float32(gn.arch_key(gn.RMS_EPS, a), 1e-6)
        w.add_uint32(gn.FILE_TYPE, int(ft.file_type))
        w.add_uint32(gn.QUANTIZATION_VERSION, 2)
        for key, value in src.metadata.items():
            if key.startswith(gn.TOKENIZER_PREFIX):
                _copy_key(w, key, value)
        for (name, shp), qt in zip(tensors, types):
            w.add_tensor_info(name, shp, qt, quant.row_nbytes(qt, shp[-1]) * int(np.prod(shp[:-1])))
        bar = Progress(
            sum(quant.row_nbytes(qt, shp[-1]) * int(np.prod(shp[:-1])) for (_, shp), qt in zip(tensors, types)),
            len(tensors),
            enabled=progress,
        )
        w.begin_data()
        for (name, shp), qt in zip(tensors, types):
            bar.begin_tensor(name, qt.name)
            data = random_data(name, shp, qt, rng, weight_std(name, s.n_layer))
            w.write_tensor(name, [data])
            bar.advance(data.nbytes)
            bar.end_tensor()
        bar.finish(str(out))
    return out


def _copy_key(w: GGUFWriter, key: str, value: object) -> None:
    if isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, list):
        w.add_array(key, value, GGUFValueType.STRING)
    elif isinstance(value, np.ndarray):
        w.add_array(key, value, GGUFValueType.INT32 if value.dtype.kind == "i" else GGUFValueType.UINT32)
    else:
        raise QwenliteError(f"cannot copy tokenizer key {key!r} of type {type(value).__name__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwenlite.converters.synthetic", description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("-o", "--output", required=True, type=Path)
    ap.add_argument("--type", default="q4_k_m")
    ap.add_argument("--vocab-from", type=Path, default=None, help="GGUF to copy the tokenizer from")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        write_synthetic(args.shape, args.output, args.type, args.vocab_from, args.seed, progress=sys.stderr.isatty())
    except QwenliteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
