"""Token sampling with llama.cpp's semantics and order.

The chain is: logit bias -> repetition penalty -> presence / frequency penalties -> top-k -> top-p ->
min-p -> temperature -> draw. Like llama.cpp,
the truncation filters look at the *untempered* distribution and temperature only reshapes what
survives, so changing the temperature never changes which tokens are allowed. Temperature <= 0 means
greedy: the argmax of the penalized logits, with no randomness at all.

Draws come from a ``numpy.random.Generator`` seeded once, so a given seed reproduces a whole
generation exactly.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qwenlite.errors import QwenliteError


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling parameters; 0 (or 1.0 for the penalty / top-p) disables a filter."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    # OpenAI's penalties, over the same window of recent tokens as the repetition penalty (llama.cpp's
    # penalty_last_n): logit -= presence * [seen] + frequency * count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs added to the logits first; -inf bans a token (``ignore_eos`` uses that).
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature):
            raise QwenliteError(f"temperature must be a finite number, got {self.temperature}")
        if self.top_k < 0:
            raise QwenliteError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise QwenliteError(f"top-p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise QwenliteError(f"min-p must be in [0, 1], got {self.min_p}")
        if not self.repeat_penalty > 0.0:
            raise QwenliteError(f"repeat penalty must be > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise QwenliteError(f"repeat-last-n must be >= 0, got {self.repeat_last_n}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise QwenliteError(f"{name.replace('_', ' ')} must be in [-2, 2], got {value}")
        for tok, bias in self.logit_bias:
            if tok < 0:
                raise QwenliteError(f"logit bias: token id {tok} is negative")
            if np.isnan(bias):
                raise QwenliteError(f"logit bias for token {tok} is NaN")


def apply_repeat_penalty(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp's repetition penalty on a copy: positive logits of seen ids / penalty, others * penalty.

    Dividing a positive logit and multiplying a negative one both push the token down, which a plain
    division would not do for negative logits. Each id is penalized once however often it occurred.
    """
    out = np.array(logits, dtype=np.float32, copy=True)
    if penalty == 1.0 or len(recent) == 0:
        return out
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < out.shape[0])]
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


class Sampler:
    """Picks the next token from a logits vector; stateful only through its random generator."""

    def __init__(self, config: SamplerConfig | None = None) -> None:
        self.config = config or SamplerConfig()
        # No seed, or a negative one (llama.cpp's -1), means random: a fresh seed is drawn and kept in
        # ``seed`` so that the CLI can print it and the run can be repeated.
        seed = self.config.seed
        self.seed = int(seed) if seed is not None and seed >= 0 else secrets.randbits(32)
        self.rng = np.random.default_rng(self.seed)

    @property
    def greedy(self) -> bool:
        return self.config.temperature <= 0.0

    def _penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        cfg = self.config
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 1 or logits.shape[0] == 0:
            raise QwenliteError(f"logits must be a non-empty 1-D vector, got shape {logits.shape}")
        if cfg.logit_bias:
            logits = logits.copy()
            for tok, bias in cfg.logit_bias:
                if tok >= logits.shape[0]:
                    raise QwenliteError(f"logit bias: token id {tok} out of range 0..{logits.shape[0] - 1}")
                logits[tok] += bias
        recent = history[-cfg.repeat_last_n:] if cfg.repeat_last_n > 0 else ()
        out = apply_repeat_penalty(logits, recent, cfg.repeat_penalty)
        if (cfg.presence_penalty or cfg.frequency_penalty) and len(recent):
            ids, counts = np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)
            keep = (ids >= 0) & (ids < out.shape[0])
            ids, counts = ids[keep], counts[keep]
            out[ids] -= np.float32(cfg.presence_penalty) + np.float32(cfg.frequency_penalty) * counts.astype(np.float32)
        return out

    def distribution(self, logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The candidates and their probabilities after the whole chain (float64, sums to 1).

        Exposed so that tests can check the filters exactly, not only through random draws.
        """
        cfg = self.config
        x = self._penalized(logits, history).astype(np.float64)
        if self.greedy:
            return np.array([int(np.argmax(x))]), np.ones(1)
        n = x.shape[0]
        k = cfg.top_k if 0 < cfg.top_k < n else n
        cand = np.sort(np.argpartition(-x, k - 1)[:k]) if k < n else np.arange(n)
        # Stable sort by descending logit: ties keep the lower id first, deterministically.
        cand = cand[np.argsort(-x[cand], kind="stable")]
        z = x[cand]
        p = np.exp(z - z[0])
        p /= p.sum()
        keep = len(cand)
        if cfg.top_p < 1.0:
            # Smallest prefix whose mass reaches top_p (the token crossing the threshold stays).
            keep = min(keep, int(np.searchsorted(np.cumsum(p), cfg.top_p)) + 1)
        if cfg.min_p > 0.0:
            keep = min(keep, max(1, int(np.count_nonzero(p >= cfg.min_p * p[0]))))
        cand, z = cand[:keep], z[:keep]
        q = np.exp((z - z[0]) / cfg.temperature)
        return cand, q / q.sum()

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        """Draw the next token id. ``history`` is the token sequence so far (for the penalty)."""
        cand, probs = self.distribution(logits, history)
        if len(cand) == 1:
            return int(cand[0])
        u = self.rng.random()
        idx = int(np.searchsorted(np.cumsum(probs), u, side="right"))
        return int(cand[min(idx, len(cand) - 1)])
