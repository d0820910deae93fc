"""Memory read-bandwidth probe: a parallel sum over a 1 GiB array.

Decode speed of a quantized LLM is bounded by how fast the weights stream from RAM (every weight is
read once per token), so the benchmark report divides bytes-read-per-token x tokens/s by this number.
The sum is vectorized (fastmath) and split over ``threads`` Numba threads, mirroring a matvec's
access pattern: one sequential pass, no writes. The best of ``reps`` passes is reported, as noise on a
shared machine only ever makes a pass slower.
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

CHUNK = 1 << 16


@numba.njit(fastmath=True, cache=True, inline="never")
def _block_sum(b: np.ndarray) -> float:
    """Vectorized sum of one contiguous block.

    A separate function over a slice, not ``a[base + i]`` inside the prange body: Numba cannot
    prove that index non-negative there, keeps the wraparound check and does not vectorize (5x slower).
    """
    acc = np.float32(0.0)
    for i in range(b.size):
        acc += b[i]
    return acc


@numba.njit(parallel=True, cache=True)
def _chunked_sum(a: np.ndarray) -> float:
    """Sum of ``a`` in independent chunks so threads stream disjoint ranges."""
    n_chunks = a.size // CHUNK
    partial = np.zeros(n_chunks, dtype=np.float32)
    for c in numba.prange(n_chunks):
        partial[c] = _block_sum(a[c * CHUNK : (c + 1) * CHUNK])
    return partial.sum()


def read_bandwidth_gbs(gib: float = 1.0, threads: int = 2, reps: int = 5) -> float:
    """Best observed read bandwidth in GB/s (1e9 bytes) over ``reps`` passes."""
    n = int(gib * (1 << 30)) // 4 // CHUNK * CHUNK
    a = np.ones(n, dtype=np.float32)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        _chunked_sum(a[:CHUNK])
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            total = _chunked_sum(a)
            best = min(best, time.perf_counter() - t0)
        if total != n:
            raise RuntimeError(f"bandwidth probe summed {total}, expected {n}")
    finally:
        numba.set_num_threads(previous)
    return a.nbytes / best / 1e9


def main() -> None:
    """Print the probe's result."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=5)
    args = ap.parse_args()
    print(f"read bandwidth: {read_bandwidth_gbs(args.gib, args.threads, args.reps):.1f} GB/s "
          f"({args.threads} threads, {args.gib} GiB)")


if __name__ == "__main__":
    main()
