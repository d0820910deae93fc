"""Per-tensor type choice for each output file type, identical to llama.cpp's ``llama-quantize``.

A "file type" (q4_k_m, q8_0, ...) is a mix: most weights get the base type, a few sensitive ones
get more bits, and tensors whose rows do not fit the base type's block fall back to one that does.
Matching llama.cpp exactly (``llama_tensor_get_type`` in src/llama-quant.cpp) means a qwenlite file is
interchangeable with a llama.cpp one of the same name. The rules that matter for Qwen2 / Qwen2-MoE:

* Only weights with at least 2 ggml dimensions are quantized; norms, biases and the MoE router
  ``ffn_gate_inp`` keep their (F32) type. ggml counts dimensions after dropping trailing 1s of ``ne``,
  so the shared-expert gate ``ffn_gate_inp_shexp`` (numpy shape ``(1, n_embd)``) counts as 1-D.
* ``output.weight`` (and ``token_embd.weight`` when there is no ``output.weight``, i.e. tied
  embeddings) gets Q6_K, or Q8_0 when its row length is not a multiple of the base block or the base
  type already is Q8_0.
* Q4_K_M / Q5_K_M: ``attn_v`` and ``ffn_down`` get Q6_K where ``use_more_bits`` holds. For ``attn_v``
  the layer is llama.cpp's running count of attn_v tensors *in file order*; for ``ffn_down`` in a
  dense model it is the running count of ffn_down tensors in file order, in an MoE model the layer
  number parsed from the name (so ``ffn_down_exps``, ``ffn_down_shexp`` and a dense layer's
  ``ffn_down`` all follow their layer). File order matters: llama.cpp-made files list tensors
  alphabetically (blk.0, blk.1, blk.10, ...), which is why the counter is kept rather than the name.
* Exactly 8 experts: ``attn_v`` and ``attn_k`` get Q8_0, and for Q4_K_M ``attn_output`` gets Q5_K.
* Row-length fallbacks: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 when the row is not a multiple of
  256; a 32-block type whose row is not a multiple of 32 -> F16.

Float file types (f32, f16, bf16) store every quantizable weight in that type, as llama.cpp's
converter does, and never fall back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES

from qwenlite.errors import QwenliteError
from qwenlite.gguf import names as gn
from qwenlite.gguf.constants import GGMLType, LlamaFileType


@dataclass(frozen=True)
class FileType:
    """A user-facing output type: its ``general.file_type`` value and the base ggml type of the mix."""

    name: str
    file_type: LlamaFileType
    base: GGMLType

    @property
    def is_float(self) -> bool:
        return self.base in (GGMLType.F32, GGMLType.F16, GGMLType.BF16)


FILE_TYPES: dict[str, FileType] = {
    ft.name: ft
    for ft in (
        FileType("f32", LlamaFileType.ALL_F32, GGMLType.F32),
        FileType("f16", LlamaFileType.MOSTLY_F16, GGMLType.F16),
        FileType("bf16", LlamaFileType.MOSTLY_BF16, GGMLType.BF16),
        FileType("q8_0", LlamaFileType.MOSTLY_Q8_0, GGMLType.Q8_0),
        FileType("q4_0", LlamaFileType.MOSTLY_Q4_0, GGMLType.Q4_0),
        FileType("q5_0", LlamaFileType.MOSTLY_Q5_0, GGMLType.Q5_0),
        FileType("q5_1", LlamaFileType.MOSTLY_Q5_1, GGMLType.Q5_1),
        FileType("q4_k_m", LlamaFileType.MOSTLY_Q4_K_M, GGMLType.Q4_K),
        FileType("q5_k_m", LlamaFileType.MOSTLY_Q5_K_M, GGMLType.Q5_K),
        FileType("q6_k", LlamaFileType.MOSTLY_Q6_K, GGMLType.Q6_K),
    )
}

_FALLBACK = {GGMLType.Q4_K: GGMLType.Q5_0, GGMLType.Q5_K: GGMLType.Q5_1, GGMLType.Q6_K: GGMLType.Q8_0}
_OUTPUT, _TOKEN_EMBD = gn.weight(gn.OUTPUT), gn.weight(gn.TOKEN_EMBD)
_ROUTER = gn.leaf(gn.FFN_GATE_INP) + ".weight"
# llama.cpp's tensor categories, named by the layer-tensor they stand for
_ATTN_V, _ATTN_K, _ATTN_Q, _ATTN_OUT = (gn.leaf(t) for t in (gn.ATTN_V, gn.ATTN_K, gn.ATTN_Q, gn.ATTN_OUT))
_FFN_GATE, _FFN_UP, _FFN_DOWN = (gn.leaf(t) for t in gn.FFN_DENSE)
# (category, substring): the attention ones match the weight only, the ffn ones every variant
# (dense, _exps, _shexp)
_CATEGORIES = (
    *((cat, cat + ".weight") for cat in (_ATTN_V, _ATTN_K, _ATTN_Q, _ATTN_OUT)),
    *((cat, cat) for cat in (_FFN_UP, _FFN_GATE, _FFN_DOWN)),
)


def file_type(name: str) -> FileType:
    """Look up an output type by its user-facing name (``q4_k_m``, ``f16``, ...)."""
    ft = FILE_TYPES.get(name.lower())
    if ft is None:
        raise QwenliteError(f"unknown output type {name!r}; choose one of {', '.join(FILE_TYPES)}")
    return ft


def block_size(qtype: GGMLType) -> int:
    """Values per block of a ggml type (1 for plain floats)."""
    return GGML_QUANT_SIZES[int(qtype)][0]


def ggml_n_dims(shape: Sequence[int]) -> int:
    """ggml's dimension count of a numpy-order shape: trailing 1s of ``ne`` (leading 1s here) don't count."""
    ne = list(shape)[::-1]
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return max(n, 1)


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """llama.cpp's ``tensor_allows_quantization`` for the tensors a Qwen2 / Qwen2-MoE file holds."""
    return (
        ggml_n_dims(shape) >= 2
        and name.endswith("weight")
        and "_norm.weight" not in name
        and _ROUTER not in name
    )


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers llama.cpp gives extra bits: first and last eighth, and every third in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _category(name: str) -> str:
    """llama.cpp's ``tensor_get_category``: first substring match wins, in this order."""
    if name == _OUTPUT:
        return gn.OUTPUT
    if name == _TOKEN_EMBD:
        return gn.TOKEN_EMBD
    for cat, key in _CATEGORIES:
        if key in name:
            return cat
    return "other"


def _fallback(qtype: GGMLType, ncols: int) -> GGMLType:
    """llama.cpp's ``tensor_type_fallback``: a type whose block divides the row length."""
    if ncols % block_size(qtype) == 0:
        return qtype
    out = _FALLBACK.get(qtype, qtype)
    if ncols % block_size(out) != 0:
        out = GGMLType.F16
    return out


def _layer_rank(names: Sequence[str]) -> list[int]:
    """Position of each tensor when sorted by layer number (then name), as llama-quantize walks them."""

    def key(i: int) -> tuple[int, str]:
        bid = gn.block_id(names[i])
        return (-1 if bid is None else bid, names[i])

    rank = [0] * len(names)
    for r, i in enumerate(sorted(range(len(names)), key=key)):
        rank[i] = r
    return rank


def choose_types(
    tensors: Sequence[tuple[str, Sequence[int]]],
    ftype: str | FileType,
    n_layer: int,
    n_expert: int = 0,
    counter_order: str = "layer",
) -> list[GGMLType | None]:
    """The ggml type of each tensor, given in file order as ``(name, numpy shape)``.

    ``None`` means "not quantizable: keep the tensor's own type" (the converter stores those as F32).
    ``n_expert`` is ``<arch>.expert_count`` (0 for dense models), ``n_layer`` the block count.

    llama-quantize counts the attn_v (and dense ffn_down) tensors it has seen to decide which get
    more bits. Current llama.cpp walks the tensors sorted by layer number (``counter_order="layer"``,
    the default); releases before that fix (llama.cpp #9005) walked them in file order, and files such
    as the published Qwen2.5-Coder GGUFs, stored blk.0, blk.1, blk.10, ..., were made that way:
    ``counter_order="file"`` reproduces them.
    """
    if counter_order not in ("layer", "file"):
        raise QwenliteError(f"counter_order must be 'layer' or 'file', not {counter_order!r}")
    ft = ftype if isinstance(ftype, FileType) else file_type(ftype)
    base = ft.base
    names = [name for name, _ in tensors]
    tied = _OUTPUT not in names
    n_attn_v = sum(1 for n in names if _category(n) == _ATTN_V)
    k_mix = ft.name in ("q4_k_m", "q5_k_m")
    walk = _layer_rank(names) if counter_order == "layer" else list(range(len(names)))
    counters = {}
    for cat in (_ATTN_V, _FFN_DOWN):
        seen = sorted((walk[i], i) for i, n in enumerate(names) if _category(n) == cat)
        counters.update({i: c for c, (_, i) in enumerate(seen)})

    out: list[GGMLType | None] = []
    for index, (name, shape) in enumerate(tensors):
        if not allows_quantization(name, shape):
            out.append(None)
            continue
        if ft.is_float:
            out.append(base)
            continue
        ncols = int(shape[-1])
        cat = _category(name)
        qtype = base
        if cat == gn.OUTPUT or (tied and cat == gn.TOKEN_EMBD):
            if ncols % block_size(base) != 0:
                qtype = GGMLType.Q8_0
            elif base != GGMLType.Q8_0:
                qtype = GGMLType.Q6_K
        elif cat == _ATTN_V:
            if k_mix and use_more_bits(counters[index], n_attn_v):
                qtype = GGMLType.Q6_K
            if n_expert == 8:
                qtype = GGMLType.Q8_0
        elif cat == _ATTN_K:
            if n_expert == 8:
                qtype = GGMLType.Q8_0
        elif cat == _FFN_DOWN:
            i_layer = counters[index]
            if max(1, n_expert) > 1:
                bid = gn.block_id(name)
                if bid is None or bid >= n_layer:
                    raise QwenliteError(f"cannot tell the layer of tensor {name!r}")
                i_layer = bid
            if k_mix and use_more_bits(i_layer, n_layer):
                qtype = GGMLType.Q6_K
        elif cat == _ATTN_OUT and n_expert == 8 and ft.name == "q4_k_m":
            qtype = GGMLType.Q5_K
        out.append(_fallback(qtype, ncols))
    return out
