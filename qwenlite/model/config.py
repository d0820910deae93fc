"""Model hyperparameters, read from GGUF metadata only (never from the file name or tensor shapes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwenlite.errors import GGUFError
from qwenlite.gguf.reader import GGUFFile

SUPPORTED_ARCHITECTURES = ("qwen2", "qwen2moe")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the forward pass needs to know about the network's shape."""

    arch: str
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
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_orig_ctx: int = 0
    # Qwen2-MoE only (n_expert == 0 for dense models).
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_expert: int = 0
    n_ff_shared: int = 0
    expert_weights_norm: bool = False
    dense_layers: tuple[int, ...] = ()

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelConfig:
        arch = f.architecture
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(
                f"{f.path}: architecture {arch!r} is not supported (qwenlite runs {', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def need_int(key: str) -> int:
            value = f.require(f"{arch}.{key}", (int, np.integer))
            if value <= 0:
                raise GGUFError(f"{f.path}: {arch}.{key} = {value} must be positive")
            return int(value)

        n_embd = need_int("embedding_length")
        n_head = need_int("attention.head_count")
        n_head_kv = int(f.get(f"{arch}.attention.head_count_kv", n_head))
        head_dim = int(f.get(f"{arch}.attention.key_length", n_embd // n_head))
        if head_dim <= 0 or head_dim % 2 or n_head_kv <= 0 or n_head % n_head_kv:
            raise GGUFError(f"{f.path}: {n_head} heads / {n_head_kv} kv heads of size {head_dim} do not fit d={n_embd}")
        scaling = f.get(f"{arch}.rope.scaling.type", "none") or "none"
        if scaling not in ("none", "linear", "yarn"):
            raise GGUFError(f"{f.path}: rope scaling {scaling!r} is not supported (none, linear, yarn)")
        factor = float(f.get(f"{arch}.rope.scaling.factor", 1.0))
        orig_ctx = int(f.get(f"{arch}.rope.scaling.original_context_length", 0))
        if scaling != "none" and (factor <= 0 or (scaling == "yarn" and orig_ctx <= 0)):
            raise GGUFError(f"{f.path}: rope scaling {scaling} needs a positive factor and original context length")
        tokens = f.get("tokenizer.ggml.tokens")
        embd = f.tensors.get("token_embd.weight")
        n_vocab = embd.shape[0] if embd is not None else len(tokens or [])
        cfg = dict(
            arch=arch,
            n_layer=need_int("block_count"),
            n_embd=n_embd,
            n_ff=int(f.get(f"{arch}.feed_forward_length", 0)),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_vocab=n_vocab,
            n_ctx_train=need_int("context_length"),
            rope_base=float(f.get(f"{arch}.rope.freq_base", 10000.0)),
            norm_eps=float(f.require(f"{arch}.attention.layer_norm_rms_epsilon", (float, int))),
            rope_scaling=scaling,
            rope_factor=factor,
            rope_orig_ctx=orig_ctx,
        )
        if arch == "qwen2moe":
            n_expert = need_int("expert_count")
            n_used = need_int("expert_used_count")
            if n_used > n_expert:
                raise GGUFError(f"{f.path}: {n_used} experts used per token but only {n_expert} exist")
            dense = f.get(f"{arch}.dense_layers")
            cfg.update(
                n_expert=n_expert,
                n_expert_used=n_used,
                n_ff_expert=int(f.get(f"{arch}.expert_feed_forward_length", 0)),
                n_ff_shared=int(f.get(f"{arch}.expert_shared_feed_forward_length", 0)),
                expert_weights_norm=bool(f.get(f"{arch}.expert_weights_norm", False)),
                dense_layers=tuple(int(i) for i in dense) if dense is not None else (),
            )
        return cls(**cfg)
