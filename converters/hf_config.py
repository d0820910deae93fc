"""Parse and validate a Hugging Face ``config.json`` for Qwen2 / Qwen2-MoE.

Only the fields the GGUF needs are read, each checked for type and range, so a broken config fails
here with the field's name rather than later as a shape mismatch. Both config generations are
accepted: transformers < 5 writes ``rope_theta`` and ``rope_scaling`` at the top level, transformers 5
writes them inside ``rope_parameters``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwenlite.errors import QwenliteError

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen2MoeForCausalLM": "qwen2moe"}


@dataclass(frozen=True)
class RopeScaling:
    """YaRN / linear context extension, as llama.cpp records it."""

    kind: str  # "yarn" or "linear"
    factor: float
    original_context_length: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The hyperparameters of a Qwen2 or Qwen2-MoE checkpoint."""

    arch: str  # GGUF architecture: "qwen2" or "qwen2moe"
    hf_arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    tied_embeddings: bool
    qkv_bias: bool = True
    head_dim_explicit: bool = False
    rope_scaling: RopeScaling | None = None
    # MoE only
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0
    n_ff_shexp: int = 0
    norm_topk_prob: bool = False
    dense_layers: tuple[int, ...] = field(default_factory=tuple)

    def is_sparse(self, layer: int) -> bool:
        return self.arch == "qwen2moe" and layer not in self.dense_layers


def _int(cfg: dict[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    value = cfg.get(key, default)
    if value is None:
        raise QwenliteError(f"config.json: missing {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise QwenliteError(f"config.json: {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise QwenliteError(f"config.json: {key!r} must be a positive number, got {value!r}")
    return float(value)


def _bool(cfg: dict[str, Any], key: str, default: bool) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise QwenliteError(f"config.json: {key!r} must be true or false, got {value!r}")
    return value


def _rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise QwenliteError("config.json: rope_parameters / rope_scaling must be an object")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    theta = _float(theta, "rope_theta")
    kind = params.get("rope_type", params.get("type"))
    if kind in (None, "default"):
        return theta, None
    factor = params.get("factor")
    if kind == "linear" and factor is not None:
        return theta, RopeScaling("linear", _float(factor, "rope factor"))
    if kind == "yarn" and factor is not None:
        orig = params.get("original_max_position_embeddings", cfg.get("original_max_position_embeddings"))
        if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
            raise QwenliteError("config.json: yarn rope scaling needs original_max_position_embeddings")
        return theta, RopeScaling("yarn", _float(factor, "rope factor"), orig)
    raise QwenliteError(f"config.json: unsupported rope scaling {kind!r} (qwenlite handles linear and yarn)")


def parse_config(cfg: dict[str, Any]) -> ModelConfig:
    """Validate a config.json dict and return the hyperparameters."""
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs:
        raise QwenliteError("config.json: no 'architectures' entry")
    hf_arch = archs[0]
    arch = ARCHITECTURES.get(hf_arch)
    if arch is None:
        raise QwenliteError(f"unsupported architecture {hf_arch!r}; qwenlite converts {', '.join(ARCHITECTURES)}")
    n_layer = _int(cfg, "num_hidden_layers")
    n_embd = _int(cfg, "hidden_size")
    n_head = _int(cfg, "num_attention_heads")
    n_head_kv = _int(cfg, "num_key_value_heads", n_head)
    if n_head % n_head_kv:
        raise QwenliteError(f"config.json: {n_head} attention heads are not a multiple of {n_head_kv} kv heads")
    head_dim_explicit = cfg.get("head_dim") is not None
    head_dim = _int(cfg, "head_dim") if head_dim_explicit else n_embd // n_head
    if not head_dim_explicit and n_embd % n_head:
        raise QwenliteError(f"config.json: hidden_size {n_embd} is not a multiple of {n_head} heads")
    if head_dim % 2:
        raise QwenliteError(f"config.json: head dimension {head_dim} must be even for RoPE")
    rope_theta, scaling = _rope(cfg)
    common: dict[str, Any] = dict(
        arch=arch,
        hf_arch=hf_arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=_int(cfg, "intermediate_size"),
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_explicit=head_dim_explicit,
        n_vocab=_int(cfg, "vocab_size"),
        n_ctx=_int(cfg, "max_position_embeddings"),
        rope_theta=rope_theta,
        rms_eps=_float(cfg.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        tied_embeddings=_bool(cfg, "tie_word_embeddings", False),
        qkv_bias=_bool(cfg, "qkv_bias", True) if arch == "qwen2moe" else True,
        rope_scaling=scaling,
    )
    if arch == "qwen2":
        return ModelConfig(**common)

    n_expert = _int(cfg, "num_experts")
    n_used = _int(cfg, "num_experts_per_tok")
    if n_used > n_expert:
        raise QwenliteError(f"config.json: num_experts_per_tok {n_used} exceeds num_experts {n_expert}")
    step = _int(cfg, "decoder_sparse_step", 1)
    mlp_only = cfg.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in mlp_only):
        raise QwenliteError(f"config.json: mlp_only_layers must be a list of layer numbers, got {mlp_only!r}")
    if any(not 0 <= i < n_layer for i in mlp_only):
        raise QwenliteError(f"config.json: mlp_only_layers {mlp_only} names layers outside 0..{n_layer - 1}")
    # transformers' rule (Qwen2MoeDecoderLayer): sparse iff not listed and (i + 1) % step == 0
    dense = tuple(i for i in range(n_layer) if i in mlp_only or (i + 1) % step != 0)
    return ModelConfig(
        **common,
        n_expert=n_expert,
        n_expert_used=n_used,
        n_ff_exp=_int(cfg, "moe_intermediate_size"),
        n_ff_shexp=_int(cfg, "shared_expert_intermediate_size"),
        norm_topk_prob=_bool(cfg, "norm_topk_prob", False),
        dense_layers=dense,
    )


def load_config(model_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """Read ``config.json`` of an HF model directory: the parsed config and the raw dict."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise QwenliteError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise QwenliteError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise QwenliteError(f"{path}: expected a JSON object")
    return parse_config(raw), raw
