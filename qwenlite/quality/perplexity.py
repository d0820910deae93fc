"""Perplexity and KL divergence, computed the way llama.cpp's ``llama-perplexity`` computes them.

So that a qwenlite figure can be set beside a published one, every rule is llama-perplexity's
(tools/perplexity/perplexity.cpp, ``perplexity`` and ``kl_divergence``):

* The text is tokenized whole (a BOS first when the vocabulary adds one) and cut into ``n_chunk =
  n_tokens // n_ctx`` chunks of ``n_ctx`` tokens (at most ``--chunks``); at least ``2 * n_ctx`` tokens
  are needed. Each chunk is evaluated in a fresh context, its first token replaced by BOS when the
  vocabulary adds one.
* Only the second half is scored: with ``first = n_ctx // 2``, the logits at positions ``first ..
  n_ctx - 2`` predict tokens ``first + 1 .. n_ctx - 1``, so each chunk adds ``n_ctx - 1 - first``
  negative log-likelihoods. PPL = exp(mean NLL), its uncertainty ``ppl * sqrt(var(NLL) / (count - 1))``.
* The KL-divergence base file (``--kl-divergence-base``) is llama.cpp's: ``"_logits_"``, ``n_ctx``
  (u32), ``n_vocab`` (i32), ``n_chunk`` (i32), the ``n_chunk * n_ctx`` tokens (i32), then for every
  scored position one row of ``nv = 2 * ((n_vocab + 1) // 2) + 4`` uint16: two float32 (the scale and
  the smallest log-probability kept) then each token's log-probability as a 16-bit step above that
  minimum, which is at most 16 below the top. Files written here are read by llama-perplexity and
  the other way round.
* KL divergence statistics: mean KLD and its uncertainty, percentiles, the same top token share, the
  change of the correct token's probability (mean, RMS, percentiles), PPL of both models and their
  ratio with the covariance term, with llama.cpp's formulas and percentile interpolation.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwenlite.errors import QwenliteError
from qwenlite.kernels.logprobs import kld_rows

MAGIC = b"_logits_"
LOG_PROB_RANGE = 16.0  # the base file keeps log-probabilities down to 16 below the best one


def row_width(n_vocab: int) -> int:
    """uint16 entries per scored position in a base file (two float32 header values, then the vocab, even)."""
    return 2 * ((n_vocab + 1) // 2) + 4


def chunks(tokens: Sequence[int], n_ctx: int, n_chunks: int | None = None) -> list[list[int]]:
    """llama-perplexity's chunks of ``tokens``: ``len // n_ctx`` of them (at most ``n_chunks``)."""
    if n_ctx < 4:
        raise QwenliteError(f"the perplexity context must be at least 4 tokens, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise QwenliteError(f"perplexity with a context of {n_ctx} needs at least {2 * n_ctx} tokens; the text has "
                            f"{len(tokens)}")
    n = len(tokens) // n_ctx
    if n_chunks is not None and n_chunks > 0:
        n = min(n, n_chunks)
    return [list(tokens[i * n_ctx : (i + 1) * n_ctx]) for i in range(n)]


def _lse(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the max logit (float32) and log(sum exp(l - max)) (the sum in float64, as llama.cpp)."""
    top = logits.max(axis=1)
    sums = np.exp(logits - top[:, None]).sum(axis=1, dtype=np.float64)
    return top, np.log(sums).astype(np.float32)


def nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood float64 ``[n]`` of ``targets`` under each row of ``logits [n, n_vocab]``."""
    top, lse = _lse(logits)
    picked = logits[np.arange(len(targets)), targets]
    return -(picked.astype(np.float64) - top - lse.astype(np.float64))


def quantize_log_probs(logits: np.ndarray) -> np.ndarray:
    """The base-file rows ``uint16 [n, row_width]`` of ``logits [n, n_vocab]`` (llama.cpp's ``log_softmax``
    with a ``log_prob`` output)."""
    n, n_vocab = logits.shape
    top, lse = _lse(logits)
    low = np.maximum(logits.min(axis=1), top - np.float32(LOG_PROB_RANGE))
    min_log_prob = (low - top - lse).astype(np.float32)
    scale = ((top - low) / np.float32(65535.0)).astype(np.float32)
    out = np.zeros((n, row_width(n_vocab)), np.uint16)
    head = np.stack([scale, min_log_prob], axis=1).astype(np.float32)
    out[:, :4] = head.view(np.uint16)
    with np.errstate(divide="ignore"):
        inv = np.where(scale > 0, np.float32(1.0) / scale, np.float32(0.0)).astype(np.float32)
    # In place on one float32 temporary (an int64 one and np.where copies took 11 s for 1020 rows).
    steps = logits - low[:, None]
    steps *= inv[:, None]
    np.rint(steps, out=steps)
    np.clip(steps, 0, 65535, out=steps)
    steps[logits <= low[:, None]] = 0
    out[:, 4 : 4 + n_vocab] = steps
    return out


@dataclass
class KLDStats:
    """Running sums of llama-perplexity's ``kl_divergence_result``, plus every position's KLD and
    change of the correct token's probability (for the percentiles)."""

    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    n_same_top: int = 0
    count: int = 0
    klds: list[np.ndarray] = field(default_factory=list)
    p_diffs: list[np.ndarray] = field(default_factory=list)

    def add(self, logits: np.ndarray, base_rows: np.ndarray, targets: np.ndarray) -> None:
        """Positions with logits ``[n, n_vocab]`` against the base file's rows for them."""
        n, n_vocab = logits.shape
        head = np.ascontiguousarray(base_rows[:, :4]).view(np.float32)
        kld, nll_q, nll_b = np.empty(n, np.float64), np.empty(n, np.float32), np.empty(n, np.float32)
        same = np.empty(n, np.bool_)
        kld_rows(np.ascontiguousarray(logits, np.float32), base_rows[:, 4 : 4 + n_vocab],
                 np.ascontiguousarray(head[:, 0]), np.ascontiguousarray(head[:, 1]), np.asarray(targets, np.int64),
                 kld, nll_q, nll_b, same)
        p_diff = (np.exp(-nll_q) - np.exp(-nll_b)).astype(np.float32)
        q64, b64, pd = nll_q.astype(np.float64), nll_b.astype(np.float64), p_diff.astype(np.float64)
        self.sum_nll += q64.sum()
        self.sum_nll2 += (q64 * q64).sum()
        self.sum_nll_base += b64.sum()
        self.sum_nll_base2 += (b64 * b64).sum()
        self.sum_nll_nll_base += (q64 * b64).sum()
        self.sum_kld += kld.sum()
        self.sum_kld2 += (kld * kld).sum()
        self.sum_p_diff += pd.sum()
        self.sum_p_diff2 += (pd * pd).sum()
        self.sum_p_diff4 += (pd**4).sum()
        self.n_same_top += int(same.sum())
        self.count += n
        self.klds.append(kld.astype(np.float32))
        self.p_diffs.append(p_diff)

    def report(self) -> dict[str, float]:
        """llama-perplexity's final KL-divergence statistics, by name."""
        c = self.count
        lq, lq_err = mean_and_uncertainty(self.sum_nll, self.sum_nll2, c)
        lb, lb_err = mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, c)
        cov = 0.0 if c < 10 else (self.sum_nll_nll_base / c - (self.sum_nll / c) * (self.sum_nll_base / c)) / (c - 1)
        ppl_q, ppl_b = math.exp(lq), math.exp(lb)
        ratio_log = lq - lb
        ratio_log_err = math.sqrt(max(lq_err**2 + lb_err**2 - 2 * cov, 0.0))
        kld, kld_err = mean_and_uncertainty(self.sum_kld, self.sum_kld2, c)
        pd, pd_err = mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, c)
        mse, mse_err = mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, c)
        rms = math.sqrt(mse)
        same = self.n_same_top / c
        klds = np.sort(np.concatenate(self.klds))
        pds = np.sort(np.concatenate(self.p_diffs))
        out = {
            "ppl": ppl_q, "ppl_err": ppl_q * lq_err, "ppl_base": ppl_b, "ppl_base_err": ppl_b * lb_err,
            "ppl_cor": cov / (lq_err * lb_err) if lq_err and lb_err else 0.0,
            "ln_ppl_ratio": ratio_log, "ln_ppl_ratio_err": ratio_log_err,
            "ppl_ratio": math.exp(ratio_log), "ppl_ratio_err": math.exp(ratio_log) * ratio_log_err,
            "ppl_diff": ppl_q - ppl_b,
            "ppl_diff_err": math.sqrt(max((ppl_q * lq_err) ** 2 + (ppl_b * lb_err) ** 2 - 2 * ppl_q * ppl_b * cov, 0)),
            "kld": kld, "kld_err": kld_err, "kld_max": float(klds[-1]), "kld_median": _median(klds),
            "kld_min": float(klds[0]),
            "p_diff": pd, "p_diff_err": pd_err, "p_diff_max": float(pds[-1]), "p_diff_median": _median(pds),
            "p_diff_min": float(pds[0]), "p_diff_rms": rms, "p_diff_rms_err": 0.5 / rms * mse_err if rms else 0.0,
            "same_top": same, "same_top_err": math.sqrt(same * (1 - same) / (c - 1)) if c > 1 else 0.0,
            "count": c,
        }
        for q in KLD_PERCENTILES:
            out[f"kld_p{q:g}"] = percentile(klds, q / 100)
        for q in P_DIFF_PERCENTILES:
            out[f"p_diff_p{q:g}"] = percentile(pds, q / 100)
        return out


KLD_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 10.0, 5.0, 1.0, 0.1)
P_DIFF_PERCENTILES = (99.9, 99.0, 95.0, 90.0, 75.0, 25.0, 10.0, 5.0, 1.0, 0.1)


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """llama-perplexity's: the mean and the standard error of the mean (0 for 10 values or fewer)."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0


def percentile(values: np.ndarray, fraction: float) -> float:
    """llama-perplexity's linear interpolation between sorted values."""
    if fraction <= 0:
        return float(values[0])
    if fraction >= 1:
        return float(values[-1])
    p = fraction * (len(values) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * values[i] + p * values[min(i + 1, len(values) - 1)])


def _median(values: np.ndarray) -> float:
    n = len(values)
    return float(0.5 * (values[n // 2] + values[n // 2 - 1]) if n % 2 == 0 else values[n // 2])


@dataclass
class PerplexityResult:
    """What a run measured: PPL with its uncertainty, the running estimate after each chunk, and, for
    a KL-divergence run, llama-perplexity's statistics (``kld``)."""

    ppl: float
    ppl_err: float
    n_ctx: int
    n_chunks: int
    count: int  # scored positions
    chunk_ppl: list[float]
    kld: dict[str, float] | None = None
    tokens_per_second: float = 0.0


class BaseFile:
    """A KL-divergence base file being written (atomically: a temporary name renamed at the end)."""

    def __init__(self, path: str | os.PathLike[str], n_ctx: int, n_vocab: int, chunk_list: list[list[int]]) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.incomplete-{os.getpid()}")
        self.f: io.BufferedWriter = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish / abort
        self.f.write(MAGIC)
        self.f.write(np.array([n_ctx], np.uint32).tobytes())
        self.f.write(np.array([n_vocab, len(chunk_list)], np.int32).tobytes())
        self.f.write(np.asarray(chunk_list, np.int32).tobytes())

    def write(self, rows: np.ndarray) -> None:
        self.f.write(rows.tobytes())

    def finish(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def read_base_header(path: str | os.PathLike[str]) -> tuple[int, int, list[list[int]], int]:
    """``(n_ctx, n_vocab, chunks, offset of the first row)`` of a base file, every field checked
    against the file's size."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:8] != MAGIC:
                raise QwenliteError(f"{p}: not a KL-divergence base file (llama-perplexity's \"_logits_\" format)")
            n_ctx = int(np.frombuffer(head, np.uint32, 1, 8)[0])
            n_vocab, n_chunk = (int(x) for x in np.frombuffer(head, np.int32, 2, 12))
            if not (4 <= n_ctx <= 1 << 20 and 0 < n_vocab <= 1 << 22 and 0 < n_chunk <= 1 << 20):
                raise QwenliteError(f"{p}: implausible header (n_ctx {n_ctx}, n_vocab {n_vocab}, {n_chunk} chunks)")
            rows = n_chunk * (n_ctx - 1 - n_ctx // 2)
            need = 20 + 4 * n_chunk * n_ctx + 2 * rows * row_width(n_vocab)
            if size != need:
                raise QwenliteError(f"{p}: {size} bytes, but its header ({n_chunk} chunks of {n_ctx}, vocabulary "
                                    f"{n_vocab}) means {need}: truncated or not a base file")
            toks = np.frombuffer(f.read(4 * n_chunk * n_ctx), np.int32).reshape(n_chunk, n_ctx)
    except OSError as e:
        raise QwenliteError(f"{p}: cannot read the base file: {e.strerror or e}") from None
    if toks.min() < 0 or toks.max() >= n_vocab:
        raise QwenliteError(f"{p}: token ids outside the vocabulary of {n_vocab}")
    return n_ctx, n_vocab, toks.tolist(), 20 + 4 * n_chunk * n_ctx


Evaluate = Callable[[list[list[int]]], list[np.ndarray]]


def run(evaluate: Evaluate, chunk_list: list[list[int]], n_vocab: int, n_seq: int, *, bos: int | None = None,
        save_base: str | os.PathLike[str] | None = None, kld_base: str | os.PathLike[str] | None = None,
        progress: Callable[[int, float, float | None], None] | None = None) -> PerplexityResult:
    """Score ``chunk_list``, ``n_seq`` chunks per call of ``evaluate`` (which returns, per chunk, the
    logits of its positions ``first .. n_ctx - 2``), optionally writing a base file or comparing with
    one. ``progress(chunks_done, running_ppl, running_mean_kld)`` after each chunk (the full report,
    which sorts every position's values for the percentiles, is built once at the end)."""
    n_ctx = len(chunk_list[0])
    first = n_ctx // 2
    n_rows = n_ctx - 1 - first
    width = row_width(n_vocab)
    base_file = BaseFile(save_base, n_ctx, n_vocab, chunk_list) if save_base is not None else None
    stats = KLDStats() if kld_base is not None else None
    base_in = open(kld_base, "rb") if kld_base is not None else None  # noqa: SIM115 - closed below
    if base_in is not None:
        base_in.seek(20 + 4 * len(chunk_list) * n_ctx)
    total = total2 = 0.0
    count = 0
    running: list[float] = []
    t0 = time.perf_counter()
    try:
        for w in range(0, len(chunk_list), n_seq):
            wave = chunk_list[w : w + n_seq]
            inputs = [[bos, *c[1:]] if bos is not None else c for c in wave]
            for c, logits in zip(wave, evaluate(inputs)):
                targets = np.asarray(c[first + 1 :], np.int64)
                if logits.shape != (n_rows, n_vocab):
                    raise QwenliteError(f"internal: {logits.shape} logits for {n_rows} positions")
                v = nll(logits, targets)
                total += float(v.sum())
                total2 += float((v * v).sum())
                count += n_rows
                running.append(math.exp(total / count))
                if base_file is not None:
                    base_file.write(quantize_log_probs(logits))
                if stats is not None and base_in is not None:
                    rows = np.frombuffer(base_in.read(2 * n_rows * width), np.uint16).reshape(n_rows, width)
                    stats.add(logits, rows, targets)
                if progress is not None:
                    progress(len(running), running[-1], stats.sum_kld / stats.count if stats is not None else None)
    except BaseException:
        if base_file is not None:
            base_file.abort()
        raise
    finally:
        if base_in is not None:
            base_in.close()
    if base_file is not None:
        base_file.finish()
    mean = total / count
    var = total2 / count - mean * mean
    err = math.sqrt(var / (count - 1)) if var > 0 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * err, n_ctx, len(chunk_list), count, running,
                            stats.report() if stats is not None else None,
                            len(chunk_list) * n_ctx / (time.perf_counter() - t0))
