"""Throughput measurement against the Engine, in llama-bench's terms.

pp (prompt processing): one ``eval`` of ``n_prompt`` tokens from an empty cache.
tg (text generation): ``n_gen`` single-token ``eval`` calls from an empty cache.
Both are reported as tokens per second, mean and standard deviation over ``reps`` repetitions, after
one untimed warm-up of each (which also absorbs Numba's compile/cache load). Token ids are fixed
pseudo-random ordinary tokens: throughput does not depend on which tokens they are, but a fixed
sequence keeps runs comparable.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from qwenlite.chat.generate import Engine
from qwenlite.errors import QwenliteError


def _tokens(n: int, n_vocab: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, n_vocab, size=n)]


def _rate(samples: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(samples)
    std = statistics.stdev(samples) if len(samples) > 1 else 0.0
    return mean, std


def bench(engine: Engine, n_prompt: int = 128, n_gen: int = 64, reps: int = 3,
          n_vocab: int | None = None, on_rep: Callable[[str, int, float], None] | None = None
          ) -> dict[str, Any]:
    """Measure pp and tg throughput; ``on_rep(kind, rep, tokens_per_s)`` reports each repetition."""
    if n_prompt < 0 or n_gen < 0 or reps < 1 or n_prompt + n_gen == 0:
        raise QwenliteError("bench needs -p >= 0, -n >= 0 (not both 0) and -r >= 1")
    if max(n_prompt, n_gen) > engine.n_ctx:
        raise QwenliteError(f"bench sizes exceed the context of {engine.n_ctx} tokens")
    if n_vocab is None:
        engine.reset()
        n_vocab = int(engine.eval([0]).shape[0])
    # Stay below the special tokens of Qwen vocabularies (151643+) when the vocab is that large.
    n_ordinary = min(n_vocab, 151643)
    prompt = _tokens(n_prompt, n_ordinary, 1)
    gen = _tokens(n_gen, n_ordinary, 2)

    def run_pp() -> float:
        engine.reset()
        t0 = time.perf_counter()
        engine.eval(prompt)
        return n_prompt / (time.perf_counter() - t0)

    def run_tg() -> float:
        engine.reset()
        t0 = time.perf_counter()
        for tok in gen:
            engine.eval([tok])
        return n_gen / (time.perf_counter() - t0)

    result: dict[str, Any] = {"n_prompt": n_prompt, "n_gen": n_gen, "reps": reps}
    for kind, n, fn in (("pp", n_prompt, run_pp), ("tg", n_gen, run_tg)):
        if n == 0:
            continue
        fn()  # warm-up
        samples = []
        for rep in range(reps):
            samples.append(fn())
            if on_rep is not None:
                on_rep(kind, rep, samples[-1])
        mean, std = _rate(samples)
        result[f"{kind}_tps"] = mean
        result[f"{kind}_std"] = std
        result[f"{kind}_samples"] = samples
    engine.reset()
    return result


def bench_batch(runtime: Any, sizes: list[int], n_gen: int = 32, reps: int = 3, n_prompt: int = 16,
                on_rep: Callable[[int, int, float], None] | None = None) -> list[dict[str, Any]]:
    """Aggregate decode throughput of B sequences decoding together, for each B of ``sizes``.

    Each repetition clears the cache, prefills B different ``n_prompt``-token prompts in one batch
    (untimed), then times ``n_gen`` steps that each decode one token of every sequence in one forward
    pass: ``B * n_gen / time`` tokens per second (llama-batched-bench's S_TG).
    """
    if not sizes or min(sizes) < 1 or n_gen < 1 or reps < 1 or n_prompt < 1:
        raise QwenliteError("bench --batch needs sizes >= 1, -n >= 1, -r >= 1")
    if max(sizes) > runtime.n_seq:
        raise QwenliteError(f"batch of {max(sizes)} sequences but the model has {runtime.n_seq} slots")
    if n_prompt + n_gen > runtime.n_ctx:
        raise QwenliteError(f"bench sizes exceed the context of {runtime.n_ctx} tokens")
    n_ordinary = min(runtime.n_vocab, 151643)
    results = []
    for B in sizes:
        prompts = [_tokens(n_prompt, n_ordinary, 10 + s) for s in range(B)]
        steps = [_tokens(B, n_ordinary, 100 + i) for i in range(n_gen)]

        def run(B: int = B, prompts: list[list[int]] = prompts, steps: list[list[int]] = steps) -> float:
            runtime.clear()
            runtime.decode([t for p in prompts for t in p], [s for s in range(B) for _ in range(n_prompt)])
            seqs = list(range(B))
            t0 = time.perf_counter()
            for toks in steps:
                runtime.decode(toks, seqs)
            return B * n_gen / (time.perf_counter() - t0)

        run()  # warm-up
        samples = []
        for rep in range(reps):
            samples.append(run())
            if on_rep is not None:
                on_rep(B, rep, samples[-1])
        mean, std = _rate(samples)
        results.append({"n_seq": B, "tg_tps": mean, "tg_std": std, "tg_samples": samples})
    runtime.clear()
    return results
