"""Model hyperparameters: one definition for both directions.

``ModelConfig.from_gguf`` reads them from GGUF metadata only (never from the file name or tensor
shapes) for the runtime; ``ModelConfig.from_hf_config`` reads them from a Hugging Face
``config.json`` for the converter, which writes them back as the GGUF keys ``from_gguf`` reads (keys
and tensor names: ``qwenlite.gguf.names``).

Both config.json generations are accepted: transformers < 5 writes ``rope_theta`` and
``rope_scaling`` at the top level, transformers 5 writes them inside ``rope_parameters``. Every
config.json field is checked for type and range, so a broken config fails with the field's name
rather than later as a shape mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from qwenlite.errors import GGUFError, QwenliteError, shown
from qwenlite.gguf import names as gn
from qwenlite.gguf.reader import GGUFFile

# Hugging Face ``architectures[0]`` is a trunk name and a task suffix: the trunk gives GGUF's
# ``general.architecture``, the suffix the head (``task``; docs/task-heads.md).
TRUNKS = {"Qwen2": "qwen2", "Qwen2Moe": "qwen2moe"}
CAUSAL_LM = "causal-lm"
TASKS = {"ForCausalLM": CAUSAL_LM, "ForSequenceClassification": "sequence-classification",
         "ForTokenClassification": "token-classification", "ForQuestionAnswering": "question-answering"}
TASK_HEADS = tuple(t for t in TASKS.values() if t != CAUSAL_LM)
ARCHITECTURES = {trunk + suffix: arch for trunk, arch in TRUNKS.items() for suffix in TASKS}
SUPPORTED_ARCHITECTURES = tuple(TRUNKS.values())
# A question-answering head has two outputs, the start and end logits of the answer span.
QA_LABELS = ("start", "end")
MAX_LABELS = 1 << 16
ROPE_SCALINGS = ("none", "linear", "yarn")
# Sanity bounds on sizes, far above any real model (Qwen2-72B: 80 layers, width 29568, 64 heads;
# Qwen2-MoE: 64 experts), so that a hostile value cannot drive unbounded work before a tensor
# shape check would catch it.
MAX_LAYERS = 1024
MAX_WIDTH = 1 << 20
MAX_HEADS = 4096
MAX_EXPERTS = 4096
MAX_VOCAB = 1 << 22
FLOAT32_MAX = 3.4e38


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass and the converter need to know about the network's shape."""

    arch: str  # GGUF architecture: "qwen2" or "qwen2moe"
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rope_base: float
    norm_eps: float
    rope_scaling: str = "none"  # "none", "linear" or "yarn"
    rope_factor: float = 1.0
    rope_orig_ctx: int = 0  # original context length of YaRN; 0 = not recorded
    # Qwen2-MoE only (n_expert == 0 for dense models).
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_expert: int = 0
    n_ff_shared: int = 0
    expert_weights_norm: bool = False
    dense_layers: tuple[int, ...] = ()
    # The checkpoint's layout, which the converter needs; from_gguf derives them from the file.
    hf_arch: str = ""  # Hugging Face architecture name, e.g. "Qwen2ForCausalLM"
    tied_embeddings: bool = False  # no separate output matrix: logits use token_embd
    qkv_bias: bool = True  # attn_q/k/v have biases
    head_dim_explicit: bool = False  # head_dim is given (config.json head_dim, GGUF key_length)
    # The head on the final normed hidden states: the LM head (``output``, or ``token_embd`` when tied),
    # or one of TASK_HEADS (``cls.output``, one row per label; docs/task-heads.md).
    task: str = CAUSAL_LM
    labels: tuple[str, ...] = ()  # the task head's output names (id2label order)

    @property
    def has_lm_head(self) -> bool:
        """A causal LM has one; a task model converted from a ``*For<Task>`` checkpoint has none."""
        return self.task == CAUSAL_LM

    def is_sparse(self, layer: int) -> bool:
        """True when ``layer`` has experts (a qwen2moe layer not listed in ``dense_layers``)."""
        return self.arch == "qwen2moe" and layer not in self.dense_layers

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelConfig:
        """The hyperparameters of a GGUF file, every key read through the reader's typed accessors
        (type, range, finiteness) and checked against the others and the tensor table."""
        arch = f.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{f.path}: architecture {shown(arch)} is not supported "
                            f"(qwenlite runs {', '.join(SUPPORTED_ARCHITECTURES)})")

        def key(template: str) -> str:
            return gn.arch_key(template, arch)

        n_layer = f.meta_int(key(gn.BLOCK_COUNT), lo=1, hi=MAX_LAYERS)
        n_embd = f.meta_int(key(gn.EMBEDDING_LENGTH), lo=1, hi=MAX_WIDTH)
        n_head = f.meta_int(key(gn.HEAD_COUNT), lo=1, hi=MAX_HEADS)
        n_head_kv = f.meta_int(key(gn.HEAD_COUNT_KV), n_head, lo=1, hi=n_head)
        head_dim = f.meta_int(key(gn.KEY_LENGTH), max(1, n_embd // n_head), lo=1, hi=MAX_WIDTH)
        if head_dim % 2 or n_head % n_head_kv:
            raise GGUFError(f"{f.path}: {n_head} heads / {n_head_kv} kv heads of size {head_dim} do not fit d={n_embd}")
        scaling = f.meta_str(key(gn.ROPE_SCALING_TYPE), "none", (*ROPE_SCALINGS, "")) or "none"
        factor = f.meta_float(key(gn.ROPE_SCALING_FACTOR), 1.0, hi=1e6)
        orig_ctx = f.meta_int(key(gn.ROPE_SCALING_ORIG_CTX), 0, lo=0)
        if scaling == "yarn" and orig_ctx <= 0:
            raise GGUFError(f"{f.path}: yarn rope scaling needs {key(gn.ROPE_SCALING_ORIG_CTX)}")
        embd = f.tensors.get(gn.weight(gn.TOKEN_EMBD))
        if embd is None:
            raise GGUFError(f"{f.path}: missing tensor {gn.weight(gn.TOKEN_EMBD)!r}")
        n_vocab = embd.shape[0]
        cfg: dict[str, Any] = dict(
            arch=arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=f.meta_int(key(gn.FEED_FORWARD_LENGTH), 0, lo=0, hi=MAX_WIDTH),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_vocab=n_vocab,
            n_ctx_train=f.meta_int(key(gn.CONTEXT_LENGTH), lo=1),
            rope_base=f.meta_float(key(gn.ROPE_FREQ_BASE), 10000.0, lo=1.0, lo_inclusive=True, hi=1e12),
            norm_eps=f.meta_float(key(gn.RMS_EPS), hi=1.0),
            rope_scaling=scaling,
            rope_factor=factor,
            rope_orig_ctx=orig_ctx,
            tied_embeddings=gn.weight(gn.OUTPUT) not in f.tensors,
            qkv_bias=gn.bias(gn.ATTN_Q, 0) in f.tensors,
            head_dim_explicit=key(gn.KEY_LENGTH) in f.metadata,
            **_gguf_task(f, key),
        )
        cfg["hf_arch"] = _hf_arch(arch, cfg["task"])
        if arch == "qwen2moe":
            n_expert = f.meta_int(key(gn.EXPERT_COUNT), lo=1, hi=MAX_EXPERTS)
            dense = f.meta_ints(key(gn.DENSE_LAYERS), (), lo=0, hi=n_layer - 1)
            if len(set(dense)) != len(dense):
                raise GGUFError(f"{f.path}: {key(gn.DENSE_LAYERS)} names a layer twice")
            cfg.update(
                n_expert=n_expert,
                n_expert_used=f.meta_int(key(gn.EXPERT_USED_COUNT), lo=1, hi=n_expert),
                n_ff_expert=f.meta_int(key(gn.EXPERT_FEED_FORWARD_LENGTH), 0, lo=0, hi=MAX_WIDTH),
                n_ff_shared=f.meta_int(key(gn.EXPERT_SHARED_FEED_FORWARD_LENGTH), 0, lo=0, hi=MAX_WIDTH),
                expert_weights_norm=f.meta_bool(key(gn.EXPERT_WEIGHTS_NORM), False),
                dense_layers=dense,
            )
        return cls(**cfg)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Validate a Hugging Face ``config.json`` dict (Qwen2 / Qwen2-MoE) and return its hyperparameters."""
        archs = cfg.get("architectures")
        if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
            raise QwenliteError("config.json: 'architectures' must be a list of names, e.g. [\"Qwen2ForCausalLM\"]")
        hf_arch = archs[0]
        arch = ARCHITECTURES.get(hf_arch)
        if arch is None:
            raise QwenliteError(f"unsupported architecture {shown(hf_arch)}; qwenlite converts "
                                f"{' and '.join(TRUNKS)} with {', '.join(TASKS)}")
        task = next(t for suffix, t in TASKS.items() if hf_arch.endswith(suffix))
        n_layer = _int(cfg, "num_hidden_layers", maximum=MAX_LAYERS)
        n_embd = _int(cfg, "hidden_size", maximum=MAX_WIDTH)
        n_head = _int(cfg, "num_attention_heads", maximum=MAX_HEADS)
        n_head_kv = _int(cfg, "num_key_value_heads", n_head, maximum=n_head)
        if n_head % n_head_kv:
            raise QwenliteError(f"config.json: {n_head} attention heads are not a multiple of {n_head_kv} kv heads")
        head_dim_explicit = cfg.get("head_dim") is not None
        head_dim = _int(cfg, "head_dim", maximum=MAX_WIDTH) if head_dim_explicit else n_embd // n_head
        if not head_dim_explicit and n_embd % n_head:
            raise QwenliteError(f"config.json: hidden_size {n_embd} is not a multiple of {n_head} heads")
        if head_dim % 2:
            raise QwenliteError(f"config.json: head dimension {head_dim} must be even for RoPE")
        rope_base, scaling, factor, orig_ctx = _rope(cfg)
        common: dict[str, Any] = dict(
            arch=arch,
            hf_arch=hf_arch,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=_int(cfg, "intermediate_size", maximum=MAX_WIDTH),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            head_dim_explicit=head_dim_explicit,
            n_vocab=_int(cfg, "vocab_size", maximum=MAX_VOCAB),
            n_ctx_train=_int(cfg, "max_position_embeddings", maximum=2**31 - 1),
            rope_base=rope_base,
            norm_eps=_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps", maximum=1.0),
            tied_embeddings=_bool(cfg, "tie_word_embeddings", False),
            qkv_bias=_bool(cfg, "qkv_bias", True) if arch == "qwen2moe" else True,
            rope_scaling=scaling,
            rope_factor=factor,
            rope_orig_ctx=orig_ctx,
            task=task,
            labels=_hf_labels(cfg, task),
        )
        if arch == "qwen2":
            return cls(**common)

        n_expert = _int(cfg, "num_experts", maximum=MAX_EXPERTS)
        n_used = _int(cfg, "num_experts_per_tok", maximum=MAX_EXPERTS)
        if n_used > n_expert:
            raise QwenliteError(f"config.json: num_experts_per_tok {n_used} exceeds num_experts {n_expert}")
        step = _int(cfg, "decoder_sparse_step", 1, maximum=MAX_LAYERS)
        mlp_only = cfg.get("mlp_only_layers") or []
        if not isinstance(mlp_only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in mlp_only):
            raise QwenliteError(f"config.json: mlp_only_layers must be a list of layer numbers, got {shown(mlp_only)}")
        if any(not 0 <= i < n_layer for i in mlp_only):
            raise QwenliteError(f"config.json: mlp_only_layers {shown(mlp_only)} names layers outside 0..{n_layer - 1}")
        # transformers' rule (Qwen2MoeDecoderLayer): sparse iff not listed and (i + 1) % step == 0
        dense = tuple(i for i in range(n_layer) if i in mlp_only or (i + 1) % step != 0)
        return cls(
            **common,
            n_expert=n_expert,
            n_expert_used=n_used,
            n_ff_expert=_int(cfg, "moe_intermediate_size", maximum=MAX_WIDTH),
            n_ff_shared=_int(cfg, "shared_expert_intermediate_size", maximum=MAX_WIDTH),
            expert_weights_norm=_bool(cfg, "norm_topk_prob", False),
            dense_layers=dense,
        )


def _hf_arch(arch: str, task: str) -> str:
    trunk = next(t for t, a in TRUNKS.items() if a == arch)
    return trunk + next(suffix for suffix, t in TASKS.items() if t == task)


def _gguf_task(f: GGUFFile, key: Any) -> dict[str, Any]:
    """``task`` and ``labels`` of a file: its ``<arch>.classifier.task`` key, or, without one, a causal
    LM, unless it has llama.cpp's classifier layout (``cls.output`` and pooling type rank), which is a
    sequence classifier. The labels are ``<arch>.classifier.output_labels``, one per ``cls.output`` row
    (llama.cpp names missing ones ``LABEL_<i>``)."""
    head = f.tensors.get(gn.weight(gn.CLS_OUT))
    rank = f.meta_int(key(gn.POOLING_TYPE), 0, lo=0, hi=4) == gn.POOLING_RANK
    default = TASK_HEADS[0] if head is not None and rank else CAUSAL_LM
    task = f.meta_str(key(gn.CLASSIFIER_TASK), default, (CAUSAL_LM, *TASK_HEADS))
    if task == CAUSAL_LM:
        return {"task": task}
    if head is None or len(head.shape) != 2:
        raise GGUFError(f"{f.path}: a {task} model needs a 2-D tensor {gn.weight(gn.CLS_OUT)!r}")
    n = head.shape[0]
    if task == "question-answering" and n != 2:
        raise GGUFError(f"{f.path}: a question-answering head has 2 outputs (start, end), "
                        f"{gn.weight(gn.CLS_OUT)!r} has {n}")
    names = f.metadata.get(key(gn.CLASSIFIER_LABELS))
    if names is None:
        labels = QA_LABELS if task == "question-answering" else tuple(f"LABEL_{i}" for i in range(n))
    elif not isinstance(names, list) or len(names) != n or not all(isinstance(x, str) for x in names):
        raise GGUFError(f"{f.path}: {key(gn.CLASSIFIER_LABELS)} must be {n} label names, one per row of "
                        f"{gn.weight(gn.CLS_OUT)!r}")
    else:
        labels = tuple(names)
    return {"task": task, "labels": labels}


def _hf_labels(cfg: dict[str, Any], task: str) -> tuple[str, ...]:
    """A task head's output names: ``id2label`` in id order (transformers' default: two labels
    ``LABEL_0``, ``LABEL_1``, or ``num_labels`` of them), ``start`` / ``end`` for question answering."""
    if task == CAUSAL_LM:
        return ()
    if task == "question-answering":
        return QA_LABELS
    id2label = cfg.get("id2label")
    if id2label is None:
        return tuple(f"LABEL_{i}" for i in range(_int(cfg, "num_labels", 2, maximum=MAX_LABELS)))
    if not isinstance(id2label, dict) or not 0 < len(id2label) <= MAX_LABELS:
        raise QwenliteError(f"config.json: 'id2label' must be an object of at most {MAX_LABELS} labels")
    ids = sorted(id2label, key=lambda k: int(k) if isinstance(k, str) and k.isdigit() else -1)
    if ids != [str(i) for i in range(len(ids))] or not all(isinstance(v, str) for v in id2label.values()):
        raise QwenliteError("config.json: 'id2label' must map the ids 0..n-1 to label names")
    if "num_labels" in cfg and cfg["num_labels"] != len(ids):
        raise QwenliteError(f"config.json: num_labels {shown(cfg['num_labels'])} but id2label has {len(ids)} labels")
    return tuple(id2label[k] for k in ids)


# --------------------------------------------------------------------------------------------------
# config.json field checks


def _int(cfg: dict[str, Any], key: str, default: int | None = None, minimum: int = 1,
         maximum: int = 2**31 - 1) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise QwenliteError(f"config.json: missing {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise QwenliteError(f"config.json: {key!r} must be an integer in {minimum}..{maximum}, got {shown(value)}")
    return value


def _float(value: Any, key: str, maximum: float = FLOAT32_MAX) -> float:
    """A positive finite number that a GGUF float32 key can hold."""
    if (isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= maximum
            or not math.isfinite(value)):
        raise QwenliteError(f"config.json: {key!r} must be a finite number in (0, {maximum:g}], got {shown(value)}")
    return float(value)


def _bool(cfg: dict[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise QwenliteError(f"config.json: {key!r} must be true or false, got {value!r}")
    return value


def _rope(cfg: dict[str, Any]) -> tuple[float, str, float, int]:
    """(rope base, scaling type, factor, original context length; 0 when not given)."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise QwenliteError("config.json: rope_parameters / rope_scaling must be an object")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    theta = _float(theta, "rope_theta", maximum=1e12)
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return theta, "none", 1.0, 0
    factor = params.get("factor")
    if kind == "linear" and factor is not None:
        return theta, "linear", _float(factor, "rope factor", maximum=1e6), 0
    if kind == "yarn" and factor is not None:
        orig = params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        if isinstance(orig, bool) or not isinstance(orig, int) or not 0 < orig < 2**31:
            raise QwenliteError("config.json: yarn rope scaling needs original_max_position_embeddings")
        return theta, "yarn", _float(factor, "rope factor", maximum=1e6), orig
    raise QwenliteError(f"config.json: unsupported rope scaling {shown(kind)} (qwenlite handles linear and yarn)")
