"""The Qwen2 / Qwen2-MoE forward pass (field notes section 4) over a batch of tokens from many sequences.

    x = embed(ids)
    for each block:
        h = rms_norm(x);  q, k, v = Wq h + bq, Wk h + bk, Wv h + bv;  rope(q, k at each token's position)
        store k, v at (seq, pos);  x = x + Wo attention(q over its own sequence's keys 0..pos)
        x = x + ffn(rms_norm(x))            # SwiGLU MLP, or the MoE block
    logits = W_out rms_norm(x[rows])        # W_out = token_embd when the embeddings are tied
                                            # (a task model has W_cls instead: runtime.heads)

A batch (llama.cpp's ubatch) is tokens ``[T]``, their positions ``[T]`` and sequences ``[T]``, and the
rows that need logits. Every matrix is read once per batch for all its sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwenlite.backends.base import Backend
from qwenlite.errors import QwenliteError
from qwenlite.gguf import names as gn
from qwenlite.kernels.ops import rope_tables
from qwenlite.model.config import ModelConfig
from qwenlite.model.ffn import DenseFFN, MoEFFN
from qwenlite.model.weights import Linear
from qwenlite.runtime.loader import Loader


@dataclass
class Block:
    """One decoder block's weights: attention with q/k/v bias, then the FFN."""

    attn_norm: np.ndarray
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    ffn_norm: np.ndarray
    ffn: DenseFFN | MoEFFN


def _dense(ld: Loader, i: int, n_embd: int, n_ff: int, names: tuple[str, str, str] = gn.FFN_DENSE) -> DenseFFN:
    gate, up, down = (gn.tensor_base(t, i) for t in names)
    stacked = ld.stacked([gate, up], n_embd, n_ff)
    ffn = DenseFFN(n_ff, ld.linear(down, n_ff, n_embd), gate_up=stacked)
    if stacked is None:
        ffn.gate, ffn.up = ld.linear(gate, n_embd, n_ff), ld.linear(up, n_embd, n_ff)
    return ffn


def _moe(ld: Loader, i: int, cfg: ModelConfig) -> MoEFFN:
    d, e, ff = cfg.n_embd, cfg.n_expert, cfg.n_ff_expert
    gate, up, down = (gn.tensor_base(t, i) for t in gn.FFN_EXPS)
    shared = _dense(ld, i, d, cfg.n_ff_shared, gn.FFN_SHEXP) if ld.has(gn.weight(gn.FFN_UP_SHEXP, i)) else None
    gate_name = gn.weight(gn.FFN_GATE_INP_SHEXP, i)
    shared_gate = Linear.from_rows(ld.vector(gate_name, d)[None]) if shared and ld.has(gate_name) else None
    return MoEFFN(
        k=cfg.n_expert_used,
        normalize=cfg.expert_weights_norm,
        router=ld.linear(gn.tensor_base(gn.FFN_GATE_INP, i), d, e),
        gate=ld.linear(gate, d, ff, e, experts=True),
        up=ld.linear(up, d, ff, e, experts=True),
        down=ld.linear(down, ff, d, e, experts=True),
        shared=shared,
        shared_gate=shared_gate,
    )


def load_block(ld: Loader, i: int, cfg: ModelConfig) -> Block:
    """Block ``i``'s weights, by llama.cpp's tensor names (``gguf.names``)."""
    d = cfg.n_embd
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
    sparse = cfg.n_expert > 0 and ld.has(gn.weight(gn.FFN_GATE_INP, i))
    return Block(
        attn_norm=ld.vector(gn.weight(gn.ATTN_NORM, i), d),
        wq=ld.linear(gn.tensor_base(gn.ATTN_Q, i), d, q, bias=True),
        wk=ld.linear(gn.tensor_base(gn.ATTN_K, i), d, kv, bias=True),
        wv=ld.linear(gn.tensor_base(gn.ATTN_V, i), d, kv, bias=True),
        wo=ld.linear(gn.tensor_base(gn.ATTN_OUT, i), q, d),
        ffn_norm=ld.vector(gn.weight(gn.FFN_NORM, i), d),
        ffn=_moe(ld, i, cfg) if sparse else _dense(ld, i, d, cfg.n_ff),
    )


def no_lm_head(cfg: ModelConfig) -> str:
    """The one error of a generation call on a task model."""
    use = {"sequence-classification": "classify()", "token-classification": "classify_tokens()",
           "question-answering": "answer()"}[cfg.task]
    return (f"this model has no language-model head: it is a {cfg.task} model ({cfg.hf_arch}); "
            f"use {use} or embed(), not generation or chat")


class Qwen2:
    """Weights of a whole model and its forward pass, running on ``backend`` over a ``KVCache``.

    Matrices are interleaved at load time (the loader's policy), except the embedding table when it
    is only looked up, and the routed experts when the policy keeps them in the mapped file (a
    Qwen2-MoE file can be larger than RAM).
    """

    def __init__(self, ld: Loader, cfg: ModelConfig, n_ctx: int, backend: Backend) -> None:
        self.cfg = cfg
        self.backend = backend
        tied = cfg.has_lm_head and not ld.has(gn.weight(gn.OUTPUT))
        self.embed = ld.linear(gn.TOKEN_EMBD, cfg.n_embd, cfg.n_vocab, interleave=tied)
        self.blocks = [load_block(ld, i, cfg) for i in range(cfg.n_layer)]
        self.out_norm = ld.vector(gn.weight(gn.OUTPUT_NORM), cfg.n_embd)
        self.output: Linear | None = None  # the LM head; a task model has none
        self.head: Linear | None = None  # a task model's head, ``cls.output``
        if cfg.has_lm_head:
            self.output = self.embed if tied else ld.linear(gn.OUTPUT, cfg.n_embd, cfg.n_vocab)
        else:
            self.head = ld.linear(gn.CLS_OUT, cfg.n_embd, len(cfg.labels), bias=ld.has(gn.bias(gn.CLS_OUT)))
        self.cos, self.sin = rope_tables(n_ctx, cfg.head_dim, cfg.rope_base, cfg.rope_scaling, cfg.rope_factor,
                                         cfg.rope_orig_ctx)

    def k_bias(self) -> np.ndarray:
        """The key projections' biases ``[n_layer, n_kv*hd]`` (zeros where a layer has none)."""
        n = self.cfg.n_head_kv * self.cfg.head_dim
        return np.stack([b.wk.bias if b.wk.bias is not None else np.zeros(n, np.float32) for b in self.blocks])

    def forward(self, ids: np.ndarray, pos: np.ndarray, seq: np.ndarray, rows: np.ndarray,
                cache: object, hidden: bool = False) -> np.ndarray:
        """Logits ``[len(rows), n_vocab]`` of the tokens ``rows`` of the batch (ids, pos, seq: ``[T]``),
        after storing every token's keys and values in ``cache``; with ``hidden``, their final normed
        hidden states ``[len(rows), n_embd]`` instead (what embeddings pool; no LM head is run)."""
        cfg, be = self.cfg, self.backend
        x = be.embed(self.embed, ids)
        self._check(x, "the embedding rows of this batch (token_embd.weight)")
        for i, b in enumerate(self.blocks):
            h = be.rms_norm(x, b.attn_norm, cfg.norm_eps)
            q, k, v = be.linear(b.wq, h), be.linear(b.wk, h), be.linear(b.wv, h)
            be.rope(q, cfg.n_head, pos, self.cos, self.sin)
            be.rope(k, cfg.n_head_kv, pos, self.cos, self.sin)
            cache.store(i, k, v, seq, pos)
            x += be.linear(b.wo, cache.attend(i, q, seq, pos, cfg.n_head))
            x += b.ffn(be, be.rms_norm(x, b.ffn_norm, cfg.norm_eps))
            self._check(x, f"the output of layer {i} (blk.{i}.*)")
        if rows.shape[0] != x.shape[0]:
            x = np.ascontiguousarray(x[rows])
        normed = be.rms_norm(x, self.out_norm, cfg.norm_eps)
        if hidden:
            return normed
        if self.output is None:
            raise QwenliteError(no_lm_head(cfg))
        logits = be.linear(self.output, normed)
        self._check(logits, "the logits (output_norm / output.weight)")
        return logits

    def _check(self, x: np.ndarray, where: str) -> None:
        """A clear error instead of NaN logits (sampled as garbage) when a file's weights hold NaN or
        inf, or overflow: checked after every layer, so the error names where it first happened."""
        if not self.backend.all_finite(x):
            raise QwenliteError(f"the model produced NaN or infinite values in {where}: its weights are "
                                "broken (NaN / inf, or so large that they overflow)")
