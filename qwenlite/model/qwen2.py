"""The Qwen2 / Qwen2-MoE forward pass (field notes section 4), one decoder block after another.

    x = embed(ids)
    for each block:
        h = rms_norm(x);  q, k, v = Wq h + bq, Wk h + bk, Wv h + bv;  rope(q, k)
        x = x + Wo attention(q, K_cache, V_cache)
        x = x + ffn(rms_norm(x))            # SwiGLU MLP, or the MoE block
    logits = W_out rms_norm(x)              # W_out = token_embd when the embeddings are tied
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from qwenlite.gguf.reader import GGUFFile
from qwenlite.kernels.ops import attention, rms_norm, rope_neox, rope_tables, store_kv
from qwenlite.model.config import ModelConfig
from qwenlite.model.ffn import DenseFFN, MoEFFN
from qwenlite.model.weights import Linear, vector


@dataclass
class KVCache:
    """Keys and values of every layer, ``[n_layer, n_kv, n_ctx, head_dim]`` float32."""

    k: np.ndarray
    v: np.ndarray

    @classmethod
    def empty(cls, cfg: ModelConfig, n_ctx: int) -> KVCache:
        """Zeroed caches in anonymous mappings of 4 KiB pages, which become resident as positions
        fill. (numpy's allocator asks for 2 MiB huge pages on large arrays: the first token of each
        layer and head would make 2 MiB resident, 224 MB for the 1.5B model at 4096 positions.)"""
        shape = (cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim)
        nbytes = int(np.prod(shape)) * 4
        return cls(*(np.frombuffer(mmap.mmap(-1, nbytes), np.float32).reshape(shape) for _ in range(2)))


class Block:
    """One decoder block: attention with q/k/v bias, then the FFN."""

    def __init__(self, f: GGUFFile, i: int, cfg: ModelConfig, interleave_experts: bool = True) -> None:
        p, d = f"blk.{i}", cfg.n_embd
        q, kv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
        self.attn_norm = vector(f, f"{p}.attn_norm.weight", d)
        self.wq = Linear.load(f, f"{p}.attn_q", d, q, bias=True)
        self.wk = Linear.load(f, f"{p}.attn_k", d, kv, bias=True)
        self.wv = Linear.load(f, f"{p}.attn_v", d, kv, bias=True)
        self.wo = Linear.load(f, f"{p}.attn_output", q, d)
        self.ffn_norm = vector(f, f"{p}.ffn_norm.weight", d)
        sparse = cfg.n_expert > 0 and f"{p}.ffn_gate_inp.weight" in f.tensors
        self.ffn = MoEFFN(f, p, cfg, interleave_experts) if sparse else DenseFFN(f, p, d, cfg.n_ff)


class Qwen2:
    """Weights of a whole model and its forward pass over a KV cache.

    Matrices are interleaved at load time (``Linear.load``), except the embedding table when it is
    only looked up, and the routed experts when ``interleave_experts`` is False: a Qwen2-MoE file
    can be larger than RAM and then runs straight from the mapped file.
    """

    def __init__(self, f: GGUFFile, cfg: ModelConfig, n_ctx: int, interleave_experts: bool = True) -> None:
        self.cfg = cfg
        tied = "output.weight" not in f.tensors
        self.embed = Linear.load(f, "token_embd", cfg.n_embd, cfg.n_vocab, interleave=tied)
        self.blocks = [Block(f, i, cfg, interleave_experts) for i in range(cfg.n_layer)]
        self.out_norm = vector(f, "output_norm.weight", cfg.n_embd)
        self.output = self.embed if tied else Linear.load(f, "output", cfg.n_embd, cfg.n_vocab)
        self.cos, self.sin = rope_tables(n_ctx, cfg.head_dim, cfg.rope_base, cfg.rope_scaling, cfg.rope_factor,
                                         cfg.rope_orig_ctx)

    def forward(self, ids: np.ndarray, cache: KVCache, pos0: int, all_logits: bool = False) -> np.ndarray:
        """Logits ``[T, n_vocab]`` (or ``[1, n_vocab]`` for the last token) of ``ids`` at positions pos0.."""
        cfg = self.cfg
        x = self.embed.rows(ids)
        for i, b in enumerate(self.blocks):
            h = rms_norm(x, b.attn_norm, cfg.norm_eps)
            q, k, v = b.wq(h), b.wk(h), b.wv(h)
            rope_neox(q, cfg.n_head, pos0, self.cos, self.sin)
            rope_neox(k, cfg.n_head_kv, pos0, self.cos, self.sin)
            store_kv(cache.k[i], k, pos0)
            store_kv(cache.v[i], v, pos0)
            x += b.wo(attention(q, cache.k[i], cache.v[i], pos0, cfg.n_head))
            x += b.ffn(rms_norm(x, b.ffn_norm, cfg.norm_eps))
        if not all_logits:
            x = x[-1:]
        return self.output(rms_norm(np.ascontiguousarray(x), self.out_norm, cfg.norm_eps))
