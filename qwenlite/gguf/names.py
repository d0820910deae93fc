"""GGUF metadata keys and tensor names of qwen2 / qwen2moe files, spelled once.

Both directions use this module: the reader (``qwenlite.model.config``, the tokenizer, the weight
loader) looks keys and tensors up with it, and the converters write them with it, so a name cannot
drift between what qwenlite writes and what it reads. Spellings are llama.cpp's (``gguf-py``
``Keys`` / ``TENSOR_NAMES``), typos included (``seperator_token_id``).

Metadata keys that depend on the architecture are templates with an ``{arch}`` field; fill them with
``arch_key(BLOCK_COUNT, "qwen2") == "qwen2.block_count"``. Tensor names are templates of the base
name (without ``.weight`` / ``.bias``); per-layer ones have a ``{bid}`` field:
``weight(ATTN_Q, 3) == "blk.3.attn_q.weight"``, ``bias(ATTN_Q, 3) == "blk.3.attn_q.bias"``,
``weight(OUTPUT) == "output.weight"``.

This module imports nothing from qwenlite, so any module (the GGUF reader and writer included) can
use it.
"""

from __future__ import annotations

import re

# --------------------------------------------------------------------------------------------------
# general.*

ARCHITECTURE = "general.architecture"
TYPE = "general.type"
NAME = "general.name"
ALIGNMENT = "general.alignment"
FILE_TYPE = "general.file_type"
QUANTIZATION_VERSION = "general.quantization_version"

# --------------------------------------------------------------------------------------------------
# {arch}.* (fill with arch_key)

BLOCK_COUNT = "{arch}.block_count"
CONTEXT_LENGTH = "{arch}.context_length"
EMBEDDING_LENGTH = "{arch}.embedding_length"
FEED_FORWARD_LENGTH = "{arch}.feed_forward_length"
HEAD_COUNT = "{arch}.attention.head_count"
HEAD_COUNT_KV = "{arch}.attention.head_count_kv"
KEY_LENGTH = "{arch}.attention.key_length"
VALUE_LENGTH = "{arch}.attention.value_length"
RMS_EPS = "{arch}.attention.layer_norm_rms_epsilon"
ROPE_FREQ_BASE = "{arch}.rope.freq_base"
ROPE_SCALING_TYPE = "{arch}.rope.scaling.type"
ROPE_SCALING_FACTOR = "{arch}.rope.scaling.factor"
ROPE_SCALING_ORIG_CTX = "{arch}.rope.scaling.original_context_length"
# Qwen2-MoE
EXPERT_COUNT = "{arch}.expert_count"
EXPERT_USED_COUNT = "{arch}.expert_used_count"
EXPERT_FEED_FORWARD_LENGTH = "{arch}.expert_feed_forward_length"
EXPERT_SHARED_FEED_FORWARD_LENGTH = "{arch}.expert_shared_feed_forward_length"
# The two keys qwenlite adds for qwen2moe (see qwenlite.converters.hf_to_gguf): renormalized top-k
# routing weights, and the layers with a plain SwiGLU MLP instead of experts.
EXPERT_WEIGHTS_NORM = "{arch}.expert_weights_norm"
POOLING_TYPE = "{arch}.pooling_type"  # llama.cpp: 0 none, 1 mean, 2 cls, 3 last, 4 rank
DENSE_LAYERS = "{arch}.dense_layers"
# Task heads (docs/task-heads.md). llama.cpp's: the label names of a classifier's outputs (``cls.output``
# rows). qwenlite's: which head ``cls.output`` is, one of TASK_HEADS; a file without the key is a
# causal LM, or, with pooling type 4 (rank) and ``cls.output``, llama.cpp's sequence classifier.
CLASSIFIER_LABELS = "{arch}.classifier.output_labels"
CLASSIFIER_TASK = "{arch}.classifier.task"
POOLING_RANK = 4


def arch_key(template: str, arch: str) -> str:
    """An ``{arch}.*`` key for one architecture: ``arch_key(BLOCK_COUNT, "qwen2") == "qwen2.block_count"``."""
    return template.format(arch=arch)


# --------------------------------------------------------------------------------------------------
# tokenizer.*

TOKENIZER_PREFIX = "tokenizer."
TOKENIZER_MODEL = "tokenizer.ggml.model"
TOKENIZER_PRE = "tokenizer.ggml.pre"
TOKENS = "tokenizer.ggml.tokens"
TOKEN_TYPE = "tokenizer.ggml.token_type"
MERGES = "tokenizer.ggml.merges"
BOS_ID = "tokenizer.ggml.bos_token_id"
EOS_ID = "tokenizer.ggml.eos_token_id"
EOT_ID = "tokenizer.ggml.eot_token_id"
UNK_ID = "tokenizer.ggml.unknown_token_id"
SEP_ID = "tokenizer.ggml.seperator_token_id"  # sic: llama.cpp's spelling
PAD_ID = "tokenizer.ggml.padding_token_id"
ADD_BOS = "tokenizer.ggml.add_bos_token"
ADD_EOS = "tokenizer.ggml.add_eos_token"
CHAT_TEMPLATE = "tokenizer.chat_template"
CHAT_TEMPLATE_NAMED = "tokenizer.chat_template.{name}"
CHAT_TEMPLATE_NAMES = "tokenizer.chat_templates"

# Special-token id keys by the short names tokenizers use (HF's ``bos_token`` -> "bos"), in the order
# llama.cpp writes them.
SPECIAL_TOKEN_IDS = {"bos": BOS_ID, "eos": EOS_ID, "unk": UNK_ID, "sep": SEP_ID, "pad": PAD_ID}


def chat_template_key(name: str) -> str:
    """The key of a named chat template: ``chat_template_key("tool_use")``."""
    return CHAT_TEMPLATE_NAMED.format(name=name)


# --------------------------------------------------------------------------------------------------
# Tensors (base names; weight() / bias() add the suffix)

TOKEN_EMBD = "token_embd"
OUTPUT_NORM = "output_norm"
OUTPUT = "output"
CLS_OUT = "cls.output"  # a task head [n_labels, n_embd] (+ bias), llama.cpp's name

ATTN_NORM = "blk.{bid}.attn_norm"
ATTN_Q = "blk.{bid}.attn_q"
ATTN_K = "blk.{bid}.attn_k"
ATTN_V = "blk.{bid}.attn_v"
ATTN_OUT = "blk.{bid}.attn_output"
FFN_NORM = "blk.{bid}.ffn_norm"
# dense SwiGLU MLP
FFN_GATE = "blk.{bid}.ffn_gate"
FFN_UP = "blk.{bid}.ffn_up"
FFN_DOWN = "blk.{bid}.ffn_down"
# MoE: router, expert stacks (n_expert, n_out, n_in), shared expert and its scalar gate
FFN_GATE_INP = "blk.{bid}.ffn_gate_inp"
FFN_GATE_EXPS = "blk.{bid}.ffn_gate_exps"
FFN_UP_EXPS = "blk.{bid}.ffn_up_exps"
FFN_DOWN_EXPS = "blk.{bid}.ffn_down_exps"
FFN_GATE_INP_SHEXP = "blk.{bid}.ffn_gate_inp_shexp"
FFN_GATE_SHEXP = "blk.{bid}.ffn_gate_shexp"
FFN_UP_SHEXP = "blk.{bid}.ffn_up_shexp"
FFN_DOWN_SHEXP = "blk.{bid}.ffn_down_shexp"

# (gate, up, down) of each kind of SwiGLU block
FFN_DENSE = (FFN_GATE, FFN_UP, FFN_DOWN)
FFN_EXPS = (FFN_GATE_EXPS, FFN_UP_EXPS, FFN_DOWN_EXPS)
FFN_SHEXP = (FFN_GATE_SHEXP, FFN_UP_SHEXP, FFN_DOWN_SHEXP)

_BLOCK_RE = re.compile(r"blk\.(\d+)\.")


def tensor_base(template: str, bid: int | None = None) -> str:
    """A tensor's base name: ``tensor_base(ATTN_Q, 3) == "blk.3.attn_q"``; ``bid`` is required exactly
    for the per-layer templates."""
    per_layer = "{bid}" in template
    if per_layer != (bid is not None):
        raise ValueError(f"tensor {template!r} {'needs' if per_layer else 'takes no'} layer number")
    return template.format(bid=bid) if per_layer else template


def weight(template: str, bid: int | None = None) -> str:
    """``weight(FFN_UP, 0) == "blk.0.ffn_up.weight"``, ``weight(TOKEN_EMBD) == "token_embd.weight"``."""
    return tensor_base(template, bid) + ".weight"


def bias(template: str, bid: int | None = None) -> str:
    """``bias(ATTN_K, 0) == "blk.0.attn_k.bias"``."""
    return tensor_base(template, bid) + ".bias"


def leaf(template: str) -> str:
    """The part of a template after the layer prefix: ``leaf(ATTN_V) == "attn_v"``."""
    return template.removeprefix("blk.{bid}.")


def block_id(name: str) -> int | None:
    """The layer number of a per-layer tensor name (``"blk.12.attn_q.weight"`` -> 12), else None."""
    m = _BLOCK_RE.match(name)
    return int(m.group(1)) if m else None
