"""Batched decode, qwenlite vs llama.cpp: aggregate tok/s of B sequences decoding together.

Each side prefills B short distinct prompts (one sequence each), then runs decode steps that each
evaluate one batch of B tokens, the next token of every sequence, and picks every sequence's next
token greedily. Aggregate speed = B x n_gen / decode time (prefill excluded). This is the S_TG figure
of llama.cpp's ``llama-batched-bench``; the llama.cpp side is the peer worker's ``batched_bench`` op
(llama-cpp-python's batch API, see ``peer_worker.py``), the qwenlite side is
``qwenlite bench --batch 1,2,4,8 --json``. Both sides run alternately, one repetition per process,
ABBA order (as in ``bench_side_by_side``), so load from other users of the machine hits both alike.

Run from the repository root: ``python3 -m benchmarks.bench_batch [extra.gguf ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench_side_by_side import DEFAULT_MODELS, qwenlite_cmd, qwenlite_exe, resolve, run_measured, thread_env
from benchmarks.report import REPO_ROOT, fmt, machine_summary, mean_std, update_section
from tests.peer import peer_available, run_worker

SIDES = ("qwenlite", "llama.cpp")


@dataclass
class BatchResult:
    """Aggregate decode samples per side and batch size for one GGUF file."""

    name: str
    path: Path
    samples: dict[str, dict[int, list[float]]] = field(default_factory=lambda: {s: {} for s in SIDES})
    errors: list[str] = field(default_factory=list)


def qwenlite_has_batch() -> bool:
    """Whether the ``qwenlite bench`` in use knows ``--batch``."""
    proc = subprocess.run(qwenlite_cmd("bench", "--help"), capture_output=True, text=True,
                          env=thread_env(1), errors="replace")
    return proc.returncode == 0 and "--batch" in proc.stdout


def qwenlite_rep(path: Path, sizes: list[int], args: argparse.Namespace) -> dict[int, float]:
    """One ``qwenlite bench --batch`` process, one repetition: {B: aggregate tok/s}."""
    cmd = qwenlite_cmd("bench", "-m", str(path), "-n", str(args.n_gen), "-t", str(args.threads), "-r", "1",
                       "--batch", ",".join(map(str, sizes)), "--json")
    _, _, stdout = run_measured(cmd, thread_env(args.threads))
    res = json.loads(stdout)
    out = {}
    for row in res["batch"]:
        samples = row.get("tg_samples") or [row["tg_tps"]]
        out[int(row["n_seq"])] = float(samples[0])
    return out


def llama_rep(path: Path, sizes: list[int], args: argparse.Namespace) -> dict[int, float]:
    """One peer-worker process, one repetition of ``batched_bench``: {B: aggregate tok/s}."""
    res = run_worker({"op": "batched_bench", "model": str(path), "batch_sizes": sizes, "n_prompt": args.n_prompt,
                      "n_gen": args.n_gen, "n_threads": args.threads, "reps": 1, "flash_attn": args.flash_attn,
                      "kv_unified": args.kv_unified})
    return {int(row["n_seq"]): float(row["tg_tps"][0]) for row in res["batch"]}


def measure(res: BatchResult, sizes: list[int], sides: list[str], args: argparse.Namespace) -> None:
    """``args.reps`` interleaved repetitions of every side, ABBA order; a failing side drops out."""
    runners = {"qwenlite": qwenlite_rep, "llama.cpp": llama_rep}
    failed: set[str] = set()
    for rep in range(args.reps):
        for side in sides if rep % 2 == 0 else sides[::-1]:
            if side in failed:
                continue
            try:
                rates = runners[side](res.path, sizes, args)
            except (RuntimeError, OSError, ValueError, KeyError, TypeError) as exc:
                failed.add(side)
                res.errors.append(f"{side}: {str(exc)[-1500:]}")
                print(f"  rep {rep + 1} {side}: FAILED {str(exc)[-300:]}", flush=True)
                continue
            for n_seq, tps in rates.items():
                res.samples[side].setdefault(n_seq, []).append(tps)
            cells = "  ".join(f"B={b} {tps:7.2f}" for b, tps in sorted(rates.items()))
            print(f"  rep {rep + 1} {side:9s} {cells} tok/s", flush=True)


def cell(samples: list[float] | None) -> str:
    """``mean ± std (best)``, or a dash without samples."""
    return f"{fmt(samples)} ({max(samples):.1f})" if samples else "–"


def speedup(samples: dict[int, list[float]], n_seq: int) -> str:
    """Mean aggregate tok/s at B = ``n_seq`` over the same side's B = 1."""
    if n_seq not in samples or 1 not in samples:
        return "–"
    return f"{mean_std(samples[n_seq])[0] / mean_std(samples[1])[0]:.2f}x"


def render(results: list[BatchResult], sizes: list[int], args: argparse.Namespace) -> str:
    """The "Batched decode" section of BENCHMARKS.md."""
    lines = [
        "## Batched decode",
        "",
        machine_summary(),
        "",
        f"B sequences decode together: after a prefill of {args.n_prompt} distinct pseudo-random tokens per "
        f"sequence (all B prompts in one batch, untimed), {args.n_gen} steps each evaluate one batch holding the "
        f"next token of all B sequences. Aggregate tok/s = B x {args.n_gen} / decode time "
        f"(llama-batched-bench's S_TG). {args.threads} threads on both sides, {args.reps} repetitions, "
        "interleaved ABBA, one process per repetition (all B in it), each with its own untimed warm-up; model "
        "loading is not timed. qwenlite: `qwenlite bench --batch "
        f"{','.join(map(str, sizes))} -n {args.n_gen} -t {args.threads} -r 1 --json` "
        f"(`{qwenlite_exe() or sys.executable + ' -m qwenlite.cli'}`; it feeds fixed pseudo-random tokens at "
        "each step). llama.cpp: llama-cpp-python 0.3.36's batch API (`llama_batch_init` / `llama_decode` / "
        f"`llama_get_logits_ith`, one context per B with n_seq_max = B, kv_unified "
        f"{'on' if args.kv_unified else 'off'}, flash attention {args.flash_attn}; `peer_worker.py` op "
        "`batched_bench`; each step's tokens are the greedy picks from the previous step's logits, argmax "
        "included in the time), not the llama-batched-bench binary. tok/s as mean ± standard deviation (best "
        "repetition): other users share the cores and only ever slow a repetition down, so the bests and their "
        "ratio are the steadier figures; "
        "speed-up = a side's aggregate tok/s at B over its own at B = 1. "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}.",
        "",
        "| model | B | qwenlite agg tok/s | llama.cpp agg tok/s | ratio | ratio of bests | "
        "qwenlite speed-up vs B=1 | llama.cpp speed-up vs B=1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        q, lc = r.samples["qwenlite"], r.samples["llama.cpp"]
        for b in sizes:
            both = b in q and b in lc
            ratio = f"{mean_std(q[b])[0] / mean_std(lc[b])[0]:.2f}" if both else "–"
            best = f"{max(q[b]) / max(lc[b]):.2f}" if both else "–"
            lines.append(f"| {r.name} | {b} | {cell(q.get(b))} | {cell(lc.get(b))} | {ratio} | {best} | "
                         f"{speedup(q, b)} | {speedup(lc, b)} |")
    errors = [f"- {r.name}: {e}" for r in results for e in r.errors]
    if errors:
        lines += ["", "Failures:", "", *errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Measure both sides for every model and rewrite the "Batched decode" section of BENCHMARKS.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="extra GGUF files")
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS, help="known model names to pull and run")
    ap.add_argument("-b", "--batch", default="1,2,4,8", help="comma-separated batch sizes (sequences)")
    ap.add_argument("-p", "--n-prompt", type=int, default=16,
                    help="prompt tokens per sequence, llama.cpp side (qwenlite bench --batch uses 16)")
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp flash attention (llama-batched-bench's default: auto)")
    ap.add_argument("--kv-unified", action="store_true", help="llama.cpp: one KV buffer for all sequences")
    ap.add_argument("--sides", default=",".join(SIDES), help="which sides to run (qwenlite,llama.cpp)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    sizes = [int(b) for b in args.batch.split(",")]
    sides = [s for s in SIDES if s in args.sides.split(",")]
    if "llama.cpp" in sides and not peer_available():
        sys.exit("llama.cpp peer missing: run `make peer` first")
    if "qwenlite" in sides and not qwenlite_has_batch():
        print("qwenlite bench has no --batch yet: llama.cpp side only", flush=True)
        sides.remove("qwenlite")
    results, text = [], ""
    for name, path in resolve(args.models, args.files):
        print(f"{name}: {path}", flush=True)
        res = BatchResult(name, path)
        measure(res, sizes, sides, args)
        results.append(res)
        text = render(results, sizes, args)
        if not args.no_write:
            update_section("batch", text)
    print(text)
    if not args.no_write:
        print(f"wrote {REPO_ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
