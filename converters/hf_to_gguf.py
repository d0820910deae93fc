"""Convert a Hugging Face Qwen2 / Qwen2-MoE checkpoint directory into a GGUF file.

Metadata follows llama.cpp's ``convert_hf_to_gguf.py`` for the ``qwen2`` / ``qwen2moe``
architectures, so llama.cpp loads the files qwenlite writes. The hyperparameters are the runtime's
own ``ModelConfig`` (``from_hf_config`` here, ``from_gguf`` when the file is loaded), and every key
and tensor name comes from ``qwenlite.gguf.names``. Two keys go beyond it, because
llama.cpp's qwen2moe support falls short there (field notes §4):

* ``qwen2moe.expert_weights_norm`` (bool, from ``norm_topk_prob``): renormalize the top-k routing
  weights. The key name is the one llama.cpp already uses for other MoE architectures. Absent means
  false (llama.cpp's qwen2moe behaviour).
* ``qwen2moe.dense_layers`` (array of u32, ascending): the layers that have a plain SwiGLU MLP
  (``ffn_gate/ffn_up/ffn_down``, width ``feed_forward_length``) instead of experts, from
  ``mlp_only_layers`` and ``decoder_sparse_step``. Written only when some layer is dense; absent means
  every layer is MoE. ``leading_dense_block_count`` would only express a dense prefix, while
  ``mlp_only_layers`` may name any layers.

Task models (``Qwen2ForSequenceClassification``, ``...ForTokenClassification``,
``...ForQuestionAnswering`` and their Qwen2-MoE twins) get their head as ``cls.output`` and the keys of
docs/task-heads.md, and no LM head.

Tensor order is llama.cpp's (``tensor_names.llama_cpp_order``), so the per-layer choices of the
k-quant mixes equal llama-quantize's on the same checkpoint. Memory: tensors are read from
memory-mapped safetensors and written in chunks (``qwenlite.converters.pipeline``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from qwenlite.converters.files import read_json
from qwenlite.converters.hf_tokenizer import HFTokenizer, load_hf_tokenizer
from qwenlite.converters.mixes import FILE_TYPES, FileType, file_type
from qwenlite.converters.pipeline import SourceTensor, resolve_types, write_model
from qwenlite.converters.safetensors_io import Checkpoint
from qwenlite.converters.tensor_names import SourceRef, check_sources, ignored_hf_tensors, llama_cpp_order, tensor_specs
from qwenlite.errors import QwenliteError
from qwenlite.gguf import names as gn
from qwenlite.gguf.constants import GGMLType, GGUFValueType
from qwenlite.gguf.writer import GGUFWriter, check_output
from qwenlite.model.config import TASK_HEADS, ModelConfig
from qwenlite.tokenizer.vocab import read_vocab

QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION


def load_config(model_dir: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """Read ``config.json`` of an HF model directory: the hyperparameters and the raw dict."""
    path = Path(model_dir) / "config.json"
    if not path.exists() and not path.is_symlink():
        raise QwenliteError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise QwenliteError(f"{path}: expected a JSON object")
    return ModelConfig.from_hf_config(raw), raw


def model_metadata(w: GGUFWriter, cfg: ModelConfig, name: str, ftype: FileType) -> None:
    """``general.*`` and ``<arch>.*`` keys, in llama.cpp's order; ``ModelConfig.from_gguf`` reads them back."""
    a = cfg.arch

    def key(template: str) -> str:
        return gn.arch_key(template, a)

    w.add_string(gn.ARCHITECTURE, a)
    w.add_string(gn.TYPE, "model")
    w.add_string(gn.NAME, name)
    w.add_uint32(key(gn.BLOCK_COUNT), cfg.n_layer)
    w.add_uint32(key(gn.CONTEXT_LENGTH), cfg.n_ctx_train)
    w.add_uint32(key(gn.EMBEDDING_LENGTH), cfg.n_embd)
    w.add_uint32(key(gn.FEED_FORWARD_LENGTH), cfg.n_ff)
    w.add_uint32(key(gn.HEAD_COUNT), cfg.n_head)
    w.add_uint32(key(gn.HEAD_COUNT_KV), cfg.n_head_kv)
    if cfg.rope_scaling != "none":
        w.add_string(key(gn.ROPE_SCALING_TYPE), cfg.rope_scaling)
        w.add_float32(key(gn.ROPE_SCALING_FACTOR), cfg.rope_factor)
        if cfg.rope_orig_ctx:
            w.add_uint32(key(gn.ROPE_SCALING_ORIG_CTX), cfg.rope_orig_ctx)
    w.add_float32(key(gn.ROPE_FREQ_BASE), cfg.rope_base)
    w.add_float32(key(gn.RMS_EPS), cfg.norm_eps)
    if a == "qwen2moe":
        w.add_uint32(key(gn.EXPERT_COUNT), cfg.n_expert)
        w.add_uint32(key(gn.EXPERT_USED_COUNT), cfg.n_expert_used)
    if cfg.head_dim_explicit:
        w.add_uint32(key(gn.KEY_LENGTH), cfg.head_dim)
        w.add_uint32(key(gn.VALUE_LENGTH), cfg.head_dim)
    w.add_uint32(gn.FILE_TYPE, int(ftype.file_type))
    if a == "qwen2moe":
        w.add_uint32(key(gn.EXPERT_FEED_FORWARD_LENGTH), cfg.n_ff_expert)
        w.add_uint32(key(gn.EXPERT_SHARED_FEED_FORWARD_LENGTH), cfg.n_ff_shared)
        w.add_bool(key(gn.EXPERT_WEIGHTS_NORM), cfg.expert_weights_norm)
        if cfg.dense_layers:
            w.add_array(key(gn.DENSE_LAYERS), list(cfg.dense_layers), GGUFValueType.UINT32)
    if not cfg.has_lm_head:
        # llama.cpp's classifier keys (pooling type rank: the head on the last token), and ours
        w.add_uint32(key(gn.POOLING_TYPE), gn.POOLING_RANK if cfg.task == TASK_HEADS[0] else 0)
        w.add_array(key(gn.CLASSIFIER_LABELS), list(cfg.labels), GGUFValueType.STRING)
        w.add_string(key(gn.CLASSIFIER_TASK), cfg.task)
    w.add_uint32(gn.QUANTIZATION_VERSION, QUANTIZATION_VERSION)


def tokenizer_metadata(w: GGUFWriter, tok: HFTokenizer) -> None:
    """``tokenizer.*`` keys for a gpt2-style (byte-level BPE) vocab with Qwen2 pre-tokenization."""
    w.add_string(gn.TOKENIZER_MODEL, "gpt2")
    w.add_string(gn.TOKENIZER_PRE, "qwen2")
    w.add_array(gn.TOKENS, tok.tokens, GGUFValueType.STRING)
    w.add_array(gn.TOKEN_TYPE, tok.token_types, GGUFValueType.INT32)
    w.add_array(gn.MERGES, tok.merges, GGUFValueType.STRING)
    for kind, key in gn.SPECIAL_TOKEN_IDS.items():
        if kind in tok.special_ids:
            w.add_uint32(key, tok.special_ids[kind])
    w.add_bool(gn.ADD_BOS, tok.add_bos)
    if tok.add_eos is not None:
        w.add_bool(gn.ADD_EOS, tok.add_eos)
    for name, template in tok.named_chat_templates.items():
        w.add_string(gn.chat_template_key(name), template)
    if tok.named_chat_templates:
        w.add_array(gn.CHAT_TEMPLATE_NAMES, list(tok.named_chat_templates), GGUFValueType.STRING)
    if tok.chat_template is not None:
        w.add_string(gn.CHAT_TEMPLATE, tok.chat_template)


def _refuse_overwriting_input(out: Path, model_dir: Path) -> None:
    if out.is_dir():
        raise QwenliteError(f"output {out} is a directory; give a file name")
    inputs = [p for p in model_dir.iterdir() if p.is_file()] + [model_dir]
    if out.exists() and any(os.path.samefile(out, p) for p in inputs):
        raise QwenliteError(f"refusing to overwrite the input file {out}")
    if out.resolve().parent == model_dir.resolve() and out.suffix in (".safetensors", ".json"):
        raise QwenliteError(f"refusing to write {out.name} into the input checkpoint")


def _part(ckpt: Checkpoint, ref: SourceRef) -> tuple:
    view = ckpt.raw(ref.hf_name)
    if ref.index is not None:
        view = view[ref.index]
    if ref.row_start is not None:
        view = view[ref.row_start : ref.row_stop]
    return view, ckpt.entry(ref.hf_name).dtype


def _sources(ckpt: Checkpoint, cfg: ModelConfig) -> list[SourceTensor]:
    """Validate the checkpoint against the config and list the output tensors in llama.cpp's order."""
    specs = tensor_specs(cfg, ckpt.__contains__)
    check_sources(specs, lambda n: ckpt.entry(n).shape if n in ckpt else None)
    extra = ignored_hf_tensors(specs, ckpt.names(), cfg)
    if extra:
        raise QwenliteError(
            f"checkpoint tensor {extra[0]!r} does not fit the {cfg.hf_arch} layout in config.json"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    return [
        SourceTensor(
            s.name,
            s.shape,
            [_part(ckpt, r) for r in s.sources],
            release=ckpt.release,
        )
        for s in llama_cpp_order(specs, ckpt.names())
    ]


def plan(hf_dir: str | os.PathLike[str], ftype: str) -> list[tuple[str, tuple[int, ...], GGMLType]]:
    """What ``convert`` would write, without writing: ``(name, shape, type)`` in file order."""
    model_dir = Path(hf_dir)
    cfg, _ = load_config(model_dir)
    with Checkpoint(model_dir) as ckpt:
        sources = _sources(ckpt, cfg)
        types = resolve_types(sources, file_type(ftype), cfg.n_layer, cfg.n_expert)
        return [(s.name, s.shape, t) for s, t in zip(sources, types)]


def convert(
    hf_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], ftype: str, progress: bool = True, *,
    parents: bool = False, allow_nonfinite: bool = False,
) -> Path:
    """Convert the checkpoint in ``hf_dir`` to ``out_path`` with output type ``ftype``
    (one of f32, f16, bf16, q8_0, q4_0, q5_0, q5_1, q4_k_m, q5_k_m, q6_k). Returns the written path.

    Order matters for hostile input: the config is bounded, then checked against the checkpoint's
    actual tensor shapes, before anything sized by it (the tokenizer padded to ``vocab_size``) is
    built. ``parents`` creates the output folder; ``allow_nonfinite`` writes weights holding NaN / inf
    with a warning instead of refusing them."""
    model_dir = Path(hf_dir)
    if not model_dir.is_dir():
        raise QwenliteError(f"{model_dir} is not a directory")
    out = Path(out_path)
    ft = file_type(ftype)
    _refuse_overwriting_input(out, model_dir)
    check_output(out, parents)
    cfg, _ = load_config(model_dir)
    with Checkpoint(model_dir) as ckpt:
        sources = _sources(ckpt, cfg)
        tok = load_hf_tokenizer(model_dir, cfg.n_vocab)

        def add_metadata(w: GGUFWriter) -> None:
            model_metadata(w, cfg, model_dir.resolve().name, ft)
            tokenizer_metadata(w, tok)

        check_vocab(tok)
        return write_model(out, add_metadata, sources, ft, cfg.n_layer, cfg.n_expert, progress,
                           parents=parents, allow_nonfinite=allow_nonfinite)


def check_vocab(tok: HFTokenizer) -> None:
    """Refuse a vocabulary the loader would refuse, before writing: the file must load afterwards."""
    md: dict[str, Any] = {gn.TOKENIZER_MODEL: "gpt2", gn.TOKENIZER_PRE: "qwen2", gn.TOKENS: tok.tokens,
                          gn.TOKEN_TYPE: np.asarray(tok.token_types, np.int32), gn.MERGES: tok.merges}
    for kind, key in gn.SPECIAL_TOKEN_IDS.items():
        if kind in tok.special_ids:
            md[key] = tok.special_ids[kind]
    try:
        read_vocab(md)
    except QwenliteError as e:
        raise QwenliteError(f"the checkpoint's tokenizer cannot be used: {e}") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m qwenlite.converters.hf_to_gguf HF_DIR OUT.gguf --type q4_k_m``"""
    p = argparse.ArgumentParser(description="Convert a Hugging Face Qwen2 / Qwen2-MoE checkpoint to GGUF.")
    p.add_argument("hf_dir")
    p.add_argument("out")
    p.add_argument("--type", default="f16", choices=list(FILE_TYPES))
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--mkdir", action="store_true", help="create the output folder when missing")
    p.add_argument("--allow-nonfinite", action="store_true", help="write NaN / inf weights (with a warning)")
    args = p.parse_args(argv)
    try:
        convert(args.hf_dir, args.out, args.type, progress=not args.quiet, parents=args.mkdir,
                allow_nonfinite=args.allow_nonfinite)
    except QwenliteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
