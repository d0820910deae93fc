"""Embedding throughput, qwenlite vs llama.cpp: tokens/s of a batch of texts pooled into vectors.

The workload of issue 15: 32 texts of 64 tokens each (pseudo-random ids of ordinary tokens, the same
lists on both sides), mean pooling, on the 0.5B file, the same thread count. The qwenlite side is
``Model.embed`` over ``n_seq`` sequence slots (each slot count is one row); the llama.cpp side is the
peer worker's ``embed_bench`` op (its embedding path: one batch of all texts, ``llama_decode``,
``llama_get_embeddings_seq``). Each side runs in its own process, alternately, ABBA, one warm-up then
``reps`` timed runs per process; model load is not timed. The two sides' first vectors are compared
(cosine) so a fast wrong answer cannot pass unnoticed.

Run from the repository root: ``python3 -m benchmarks.bench_embed [-r 3] [--rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_side_by_side import DEFAULT_MODELS, thread_env
from benchmarks.report import REPO_ROOT, fmt, machine_summary, mean_std, update_section
from tests.peer import peer_available, run_worker


def token_lists(n_texts: int, n_tokens: int) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[int(t) for t in rng.integers(1000, 30000, size=n_tokens)] for _ in range(n_texts)]


def qwenlite_side(path: str, lists: list[list[int]], n_seq: int, threads: int, reps: int) -> dict:
    """One process: load, one warm-up, ``reps`` timed ``embed`` calls."""
    import qwenlite

    m = qwenlite.load(path, n_threads=threads, n_seq=n_seq, n_ctx=max(len(x) for x in lists))
    first = m.embed(lists, pooling="mean")[0]
    n = sum(len(x) for x in lists)
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        m.embed(lists, pooling="mean")
        rates.append(n / (time.perf_counter() - t0))
    return {"tps": rates, "first": first.tolist()}


def _run_qwenlite(path: Path, lists: list[list[int]], n_seq: int, threads: int, reps: int) -> dict:
    req = json.dumps({"path": str(path), "lists": lists, "n_seq": n_seq, "threads": threads, "reps": reps})
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_embed", "--side"], input=req, capture_output=True,
                          text=True, env=thread_env(threads), cwd=REPO_ROOT, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=DEFAULT_MODELS[0])
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-r", "--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds (each runs every side twice)")
    p.add_argument("--texts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--n-seq", default="4,32", help="qwenlite sequence-slot counts to measure")
    p.add_argument("--side", action="store_true", help=argparse.SUPPRESS)  # one qwenlite run, request on stdin
    args = p.parse_args()
    if args.side:
        req = json.loads(sys.stdin.read())
        print(json.dumps(qwenlite_side(req["path"], req["lists"], req["n_seq"], req["threads"], req["reps"])))
        return
    if not peer_available():
        sys.exit("llama.cpp peer not built: run `make peer`")
    from qwenlite.hub import resolve_model

    path = Path(resolve_model(args.model))
    lists = token_lists(args.texts, args.tokens)
    slots = [int(x) for x in args.n_seq.split(",")]
    samples: dict[str, list[float]] = {"llama.cpp": [], **{f"qwenlite n_seq={n}": [] for n in slots}}
    firsts: dict[str, list[float]] = {}

    def peer() -> None:
        r = run_worker({"op": "embed_bench", "model": str(path), "lists": lists, "n_threads": args.threads,
                        "reps": args.reps}, timeout=1800)
        samples["llama.cpp"] += r["tps"]
        firsts["llama.cpp"] = r["first"]

    def ours() -> None:
        for n in slots:
            r = _run_qwenlite(path, lists, n, args.threads, args.reps)
            samples[f"qwenlite n_seq={n}"] += r["tps"]
            firsts[f"qwenlite n_seq={n}"] = r["first"]

    for _ in range(args.rounds):
        for side in (ours, peer, peer, ours):
            side()
    ref = np.asarray(firsts["llama.cpp"], np.float64)
    ref /= np.linalg.norm(ref)
    base = mean_std(samples["llama.cpp"])[0]
    rows = ["| side | tokens/s | ratio to llama.cpp | cosine of text 0 to llama.cpp's |", "|---|---|---|---|"]
    for name, s in samples.items():
        v = np.asarray(firsts[name], np.float64)
        cos = float(v @ ref / np.linalg.norm(v))
        rows.append(f"| {name} | {fmt(s)} | {mean_std(s)[0] / base:.2f}x | {cos:.5f} |")
    body = "\n".join([
        "## Embedding throughput (issue 15)",
        "",
        f"`python3 -m benchmarks.bench_embed -r {args.reps} --rounds {args.rounds}`: {args.texts} texts of "
        f"{args.tokens} tokens, mean pooling, {Path(path).name}, {args.threads} threads; llama.cpp = "
        "llama-cpp-python's embedding context (one batch of all texts, n_ubatch 512, one unified KV "
        "cache; with one KV stream per text it runs ~7% faster but its vectors are wrong: cosine 0.92 "
        "to transformers' against 0.9999 unified). "
        f"{len(samples['llama.cpp'])} timed runs a side, ABBA.",
        "",
        machine_summary(),
        "",
        *rows,
    ])
    update_section("embed", body)
    print(body)


if __name__ == "__main__":
    main()
