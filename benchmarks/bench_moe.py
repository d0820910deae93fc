"""Qwen2-MoE speed: qwenlite vs llama.cpp on the same (synthetic, full-size) MoE GGUF files.

MoE decode should read only the routed experts, so the relevant bound is the *active* bytes per token:
every non-expert weight (attention, router, shared expert, norms, output; one embedding row) plus k
experts of every sparse layer. This script

1. measures what a qwenlite decode step actually reads, with ``MoEFFN.bytes_read`` plus the
   non-expert weights, and sets it against that bound and against the file size;
2. runs ``qwenlite bench`` and the llama.cpp peer's ``bench`` op alternately (ABBA, one process per
   repetition; the same functions as ``bench_side_by_side``) for pp and tg tok/s;
3. with ``--quick`` (for files larger than RAM, e.g. Qwen2-57B-A14B) skips the peer and the repeated
   benches: only the in-process load and a few decoded tokens, which are disk-bound.

Results accumulate by file name in ``benchmarks/moe_results.json`` (so files measured in separate runs,
e.g. one too big to keep on disk beside the other, share one table) and replace the ``moe`` section
of BENCHMARKS.md.

    python3 -m qwenlite.converters.synthetic qwen1.5-moe-a2.7b -o qwen1.5-moe-a2.7b-q4_k_m.gguf
    python3 -m benchmarks.bench_moe qwen1.5-moe-a2.7b-q4_k_m.gguf -p 128 -n 32 -r 3
    python3 -m benchmarks.bench_moe --quick qwen2-57b-a14b-q4_k_m.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.bench_side_by_side import llama_rep, qwenlite_rep
from benchmarks.report import fmt, machine_summary, mean_std, update_section
from tests.peer import peer_available

RESULTS = Path(__file__).with_name("moe_results.json")


@dataclass
class MoEResult:
    """Byte accounting and speed of one MoE file."""

    name: str
    file_bytes: int
    n_expert: int
    n_expert_used: int
    bound_bytes: int  # active bytes per decoded token, from tensor sizes
    measured_bytes: int  # what a qwenlite decode step read (bytes_read + non-expert weights)
    samples: dict[str, list[float]] = field(default_factory=dict)
    quick: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    threads: int = 2
    n_prompt: int = 0
    n_gen: int = 0
    reps: int = 0


PROMPT_IDS = [9707, 1879, 13, 576, 3974, 374, 264, 1273]


def measure_bytes(path: Path, n_threads: int, n_decode: int) -> MoEResult:
    """Load the file, prefill PROMPT_IDS, decode ``n_decode`` tokens greedily; the active-bytes bound,
    the bytes the first decode step read, and the wall times."""
    import qwenlite
    from qwenlite.model.ffn import MoEFFN

    t0 = time.perf_counter()
    m = qwenlite.load(path, n_threads=n_threads, n_ctx=64)
    load_s = time.perf_counter() - t0
    cfg, tensors = m.config, m.file.tensors
    embd = tensors["token_embd.weight"]
    embd_read = embd.nbytes if "output.weight" not in tensors else embd.nbytes // embd.shape[0]
    non_expert = sum(t.nbytes for n, t in tensors.items() if not n.endswith("_exps.weight") and n != embd.name)
    per_expert = [
        sum(tensors[f"blk.{i}.ffn_{p}_exps.weight"].nbytes for p in ("gate", "up", "down")) // cfg.n_expert
        for i in range(cfg.n_layer)
        if f"blk.{i}.ffn_gate_exps.weight" in tensors
    ]
    bound = non_expert + embd_read + cfg.n_expert_used * sum(per_expert)
    moe = [b.ffn for b in m.network.blocks if isinstance(b.ffn, MoEFFN)]
    t0 = time.perf_counter()
    logits = m.engine.eval(PROMPT_IDS)
    prefill_s = time.perf_counter() - t0
    steps, measured = [], 0
    for step in range(n_decode):
        if not np.isfinite(logits).all():
            raise SystemExit(f"{path}: non-finite logits")
        tok = int(np.argmax(logits))
        for f in moe:
            f.bytes_read = 0
        t0 = time.perf_counter()
        logits = m.engine.eval([tok])
        steps.append(time.perf_counter() - t0)
        if step == 0:
            measured = non_expert + embd_read + sum(f.bytes_read for f in moe)
        print(f"  decode step {step + 1}: token {tok}, {steps[-1]:.2f} s", flush=True)
    m.close()
    res = MoEResult(path.stem, path.stat().st_size, cfg.n_expert, cfg.n_expert_used, bound, measured)
    res.quick = {
        "load_s": load_s,
        "prefill_s": prefill_s,
        "first_token_s": steps[0],
        "later_tokens_s": float(np.mean(steps[1:])) if len(steps) > 1 else steps[0],
        "n_tokens": float(n_decode),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    return res


def measure_speed(res: MoEResult, path: Path, n_prompt: int, n_gen: int, threads: int, reps: int) -> None:
    """Interleaved ABBA repetitions of both runtimes."""
    sides = {"qwenlite": qwenlite_rep, "llama.cpp": llama_rep}
    for key in ("qwenlite pp", "qwenlite tg", "llama.cpp pp", "llama.cpp tg"):
        res.samples[key] = []
    for rep in range(reps):
        for side in list(sides) if rep % 2 == 0 else list(reversed(sides)):
            try:
                pp, tg = sides[side](path, n_prompt, n_gen, threads)
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                res.errors.append(f"{side}: {exc}")
                continue
            res.samples[f"{side} pp"].append(pp)
            res.samples[f"{side} tg"].append(tg)
            print(f"  rep {rep + 1} {side:9s} pp {pp:7.2f} tok/s  tg {tg:6.2f} tok/s", flush=True)


def _ratio(res: MoEResult, kind: str) -> str:
    a, b = res.samples.get(f"qwenlite {kind}"), res.samples.get(f"llama.cpp {kind}")
    return f"{mean_std(a)[0] / mean_std(b)[0]:.2f}" if a and b else "–"


def _cell(samples: list[float] | None) -> str:
    return fmt(samples, 2) if samples else "–"


def render(results: list[MoEResult]) -> str:
    lines = [
        "## Qwen2-MoE (synthetic full-size files)",
        "",
        machine_summary(),
        "",
        "Files written by `python -m qwenlite.converters.synthetic SHAPE -o FILE` (exact tensor shapes and Q4_K_M "
        "types of the real model, random valid blocks, the real Qwen tokenizer); speed depends only on "
        "shapes and types. Active bytes per token = all non-expert tensors (attention, router, shared "
        "expert, norms, output) + one embedding row + k experts per sparse layer. Measured = what one "
        "qwenlite decode step read: the sum of `MoEFFN.bytes_read` over layers plus the non-expert tensors.",
        "",
        "| file | file MB | experts (k of n) | active MB / token (bound) | measured MB / token | measured / bound |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.file_bytes / 1e6:.0f} | {r.n_expert_used} of {r.n_expert} | {r.bound_bytes / 1e6:.1f} | "
            f"{r.measured_bytes / 1e6:.1f} | {r.measured_bytes / r.bound_bytes:.4f} |"
        )
    timed = [r for r in results if r.samples]
    if timed:
        lines += [
            "",
            "pp (prompt of P tokens) / tg (G decoded tokens) as in the side-by-side section (llama-bench "
            "definitions, interleaved ABBA repetitions, one process each, tok/s mean ± std; "
            "decode GB/s = measured bytes per token x tg). Other users share the 2 cores: repetitions vary by "
            "up to 5x with their load, so read the standard deviations.",
            "",
            "| file | P / G / threads / reps | qwenlite pp | llama.cpp pp | ratio | qwenlite tg | llama.cpp tg | ratio "
            "| qwenlite decode GB/s | llama.cpp decode GB/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in timed:
            s = r.samples
            gbs = [
                f"{r.measured_bytes * mean_std(s[k])[0] / 1e9:.1f}" if s.get(k) else "–"
                for k in ("qwenlite tg", "llama.cpp tg")
            ]
            lines.append(
                f"| {r.name} | {r.n_prompt} / {r.n_gen} / {r.threads} / {r.reps} | {_cell(s.get('qwenlite pp'))} | "
                f"{_cell(s.get('llama.cpp pp'))} | {_ratio(r, 'pp')} | "
                f"{_cell(s.get('qwenlite tg'))} | {_cell(s.get('llama.cpp tg'))} | {_ratio(r, 'tg')} | "
                f"{gbs[0]} | {gbs[1]} |"
            )
    for r in results:
        if r.quick and not r.samples:
            q = r.quick
            lines += [
                "",
                f"{r.name}: larger than this machine's {_ram_gb():.0f} GB of RAM, so qwenlite only, routed experts "
                f"through mmap (only the non-expert matrices are copied, interleaved), {r.threads} threads: "
                f"load {q['load_s']:.1f} s, prefill of "
                f"{len(PROMPT_IDS)} tokens {q['prefill_s']:.1f} s, first decoded token {q['first_token_s']:.1f} s, "
                f"next {int(q['n_tokens']) - 1} tokens {q['later_tokens_s']:.1f} s each "
                f"({1 / q['later_tokens_s']:.2f} tok/s), peak RSS {q['peak_rss_mb']:.0f} MB. Disk-bound: a token "
                f"reads {r.bound_bytes / 1e9:.1f} GB of weights, and the page cache cannot hold the file.",
            ]
    errors = [f"- {r.name}: {e}" for r in results for e in r.errors]
    if errors:
        lines += ["", "Failures:", "", *errors]
    return "\n".join(lines) + "\n"


def _ram_gb() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def load_results(path: Path) -> dict[str, MoEResult]:
    """Earlier results by file name (the section shows files measured in separate runs together)."""
    if not path.exists():
        return {}
    return {name: MoEResult(**d) for name, d in json.loads(path.read_text()).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="qwenlite in-process only, a few tokens (files > RAM)")
    ap.add_argument("--decode", type=int, default=4, help="tokens decoded in-process for the byte count")
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON file the results accumulate in")
    args = ap.parse_args()
    if not args.quick and not peer_available():
        sys.exit("llama.cpp peer missing: run `make peer` first")
    results = load_results(args.results)
    for path in args.files:
        res = measure_bytes(path, args.threads, args.decode)
        res.threads, res.n_prompt, res.n_gen, res.reps = args.threads, args.n_prompt, args.n_gen, args.reps
        print(
            f"{path.name}: active bound {res.bound_bytes / 1e6:.1f} MB/token, measured {res.measured_bytes / 1e6:.1f}"
        )
        if not args.quick:
            measure_speed(res, path, args.n_prompt, args.n_gen, args.threads, args.reps)
        results[res.name] = res
        args.results.write_text(json.dumps({k: asdict(v) for k, v in results.items()}, indent=1))
    text = render(list(results.values()))
    print(text)
    update_section("moe", text)


if __name__ == "__main__":
    main()
