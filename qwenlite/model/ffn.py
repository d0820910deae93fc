"""Feed-forward blocks: the dense SwiGLU MLP and the Qwen2-MoE sparse block with its shared expert.

MoE dispatch respects sparsity: the router picks k experts per token, tokens are grouped by expert and
each selected expert runs once as a matrix product over its own tokens, so an expert nobody picked is
never read. ``bytes_read`` counts the expert weight bytes each call touches, which is how the tests
prove it.
"""

from __future__ import annotations

import numpy as np

from qwenlite.gguf.reader import GGUFFile
from qwenlite.kernels.ops import swiglu
from qwenlite.model.config import ModelConfig
from qwenlite.model.weights import Linear, vector


class DenseFFN:
    """down(silu(gate(x)) * up(x)), with gate and up as one stacked matrix when their type allows."""

    def __init__(self, f: GGUFFile, prefix: str, n_embd: int, n_ff: int, suffix: str = "") -> None:
        names = [f"{prefix}.ffn_gate{suffix}", f"{prefix}.ffn_up{suffix}"]
        self.n_ff = n_ff
        self.gate_up = Linear.load_stacked(f, names, n_embd, n_ff)
        self.gate = self.up = None
        if self.gate_up is None:
            self.gate, self.up = (Linear.load(f, name, n_embd, n_ff) for name in names)
        self.down = Linear.load(f, f"{prefix}.ffn_down{suffix}", n_ff, n_embd)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.gate_up is not None:
            gu = self.gate_up(x)
            g, u = np.ascontiguousarray(gu[:, : self.n_ff]), np.ascontiguousarray(gu[:, self.n_ff :])
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(swiglu(g, u))


def _softmax_rows(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class MoEFFN:
    """Top-k routed experts plus a sigmoid-gated shared expert (field notes section 4)."""

    def __init__(self, f: GGUFFile, prefix: str, cfg: ModelConfig, interleave_experts: bool = True) -> None:
        d, e, ff = cfg.n_embd, cfg.n_expert, cfg.n_ff_expert
        self.k = cfg.n_expert_used
        self.normalize = cfg.expert_weights_norm
        self.router = Linear.load(f, f"{prefix}.ffn_gate_inp", d, e)
        self.gate = Linear.load(f, f"{prefix}.ffn_gate_exps", d, ff, e, interleave=interleave_experts)
        self.up = Linear.load(f, f"{prefix}.ffn_up_exps", d, ff, e, interleave=interleave_experts)
        self.down = Linear.load(f, f"{prefix}.ffn_down_exps", ff, d, e, interleave=interleave_experts)
        self.shared = (
            DenseFFN(f, prefix, d, cfg.n_ff_shared, "_shexp") if f"{prefix}.ffn_up_shexp.weight" in f.tensors else None
        )
        self.shared_gate = (
            vector(f, f"{prefix}.ffn_gate_inp_shexp.weight", d)
            if self.shared is not None and f"{prefix}.ffn_gate_inp_shexp.weight" in f.tensors
            else None
        )
        self.bytes_read = 0

    def route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(expert ids [T, k], weights [T, k]): softmax over all experts, top-k, optional renormalization."""
        probs = _softmax_rows(self.router(x))
        top = np.argsort(-probs, axis=1, kind="stable")[:, : self.k]
        weights = np.take_along_axis(probs, top, axis=1)
        if self.normalize:
            weights = weights / weights.sum(axis=1, keepdims=True)
        return top, weights.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        top, weights = self.route(x)
        flat = top.ravel()
        order = np.argsort(flat, kind="stable")
        experts, starts = np.unique(flat[order], return_index=True)
        starts = np.append(starts, len(order))
        tokens = order // self.k
        xs = np.ascontiguousarray(x[tokens])
        h = swiglu(self.gate.experts(xs, starts, experts), self.up.experts(xs, starts, experts))
        y = self.down.experts(h, starts, experts) * weights.ravel()[order, None]
        # Row i of y belongs to flat slot order[i] = token*k + j: undo the sort and sum each token's k
        # rows (np.add.at did the same scatter 20x slower, 3% of a decode step).
        slots = np.empty_like(y)
        slots[order] = y
        out = slots.reshape(x.shape[0], self.k, -1).sum(axis=1)
        per_expert = sum(lin.w[0].nbytes for lin in (self.gate, self.up, self.down))
        self.bytes_read += per_expert * len(experts)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s *= (1.0 / (1.0 + np.exp(-(x @ self.shared_gate))))[:, None].astype(np.float32)
            out += s
        return out
