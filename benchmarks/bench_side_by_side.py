"""qwenlite vs llama.cpp on the same GGUF files, same thread count, interleaved repetitions.

For every model: ``qwenlite bench -r 1 --json`` and the llama.cpp peer's ``bench`` op (llama-bench's
definitions of pp and tg, see ``peer_worker.py``) run alternately, one repetition per process and in
ABBA order, so load spikes from the other users of a shared machine land on both sides alike. Then
the time to first token of ``qwenlite run -n 1`` from process start (warm page cache) and the peak
RSS of that process against the file size. Decode bandwidth (bytes read per token x tg tok/s) is set
against the machine's measured read bandwidth, the ceiling for decoding.

Run from the repository root: ``python3 -m benchmarks.bench_side_by_side [extra.gguf ...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFReader

from benchmarks.membw import read_bandwidth_gbs
from benchmarks.report import REPO_ROOT, fmt, machine_summary, mean_std, update_section
from tests.peer import PEER_PYTHON, PEER_WORKER, peer_available, run_worker

DEFAULT_MODELS = ["qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m"]
TTFT_PROMPT = "Write a haiku about the sea."
GNU_TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


@dataclass
class ModelResult:
    """Everything measured for one GGUF file."""

    name: str
    path: Path
    file_bytes: int
    bytes_per_token: int
    samples: dict[str, list[float]] = field(default_factory=dict)
    ttft: dict[str, list[float]] = field(default_factory=dict)
    rss: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def bytes_read_per_token(path: Path) -> tuple[int, int]:
    """(bytes of all tensors, bytes a decode step reads).

    A decode step reads every weight once, except the token embedding, of which it reads one row,
    unless the model ties its output projection to it (no ``output.weight``).
    """
    tensors = GGUFReader(path).tensors
    total = sum(int(t.n_bytes) for t in tensors)
    tied = not any(t.name == "output.weight" for t in tensors)
    embd = sum(int(t.n_bytes) for t in tensors if t.name == "token_embd.weight")
    return total, total if tied else total - embd


def qwenlite_exe() -> str | None:
    """The ``qwenlite`` console script the benchmarks run: ``$QWENLITE_BENCH_EXE`` (``make bench`` points
    it at a virtual environment made by the README's install command, so start-up is measured with
    the package's own dependencies: a development environment with SciPy installed makes Numba's
    first call import it, +0.3 s), else the one on PATH."""
    return os.environ.get("QWENLITE_BENCH_EXE") or shutil.which("qwenlite")


def qwenlite_cmd(*args: str) -> list[str]:
    """The ``qwenlite`` console script, or the same entry point through this interpreter."""
    exe = qwenlite_exe()
    return [exe, *args] if exe else [sys.executable, "-m", "qwenlite.cli", *args]


def thread_env(threads: int) -> dict[str, str]:
    """Environment pinning both runtimes' thread pools to ``threads`` (and finding the repo)."""
    env = dict(os.environ)
    env.update(NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """(wall seconds from spawn to exit, peak RSS bytes, stdout) of one child process.

    The RSS comes from GNU time, not from ``os.wait4`` here: Python spawns children with vfork, and
    Linux carries the pre-exec high-water mark (this benchmark process's own RSS) into the child's
    ``ru_maxrss``. GNU time's own child starts from a tiny process, so its number is the command's.
    """
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = Path(tmp) / "maxrss"
        full = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *cmd] if GNU_TIME else cmd
        t0 = time.perf_counter()
        proc = subprocess.run(full, env=env, capture_output=True, text=True, errors="replace")
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[-1500:]}")
        rss = int(rss_file.read_text().split()[-1]) * 1024 if GNU_TIME else 0
    return wall, rss, proc.stdout


def qwenlite_rep(path: Path, n_prompt: int, n_gen: int, threads: int) -> tuple[float, float]:
    """One repetition of ``qwenlite bench`` (its own warm-up excluded): (pp tok/s, tg tok/s)."""
    cmd = qwenlite_cmd("bench", "-m", str(path), "-p", str(n_prompt), "-n", str(n_gen),
                       "-t", str(threads), "-r", "1", "--json")
    _, _, stdout = run_measured(cmd, thread_env(threads))
    res = json.loads(stdout)
    return float(res["pp_samples"][0]), float(res["tg_samples"][0])


def llama_rep(path: Path, n_prompt: int, n_gen: int, threads: int) -> tuple[float, float]:
    """One repetition of the llama.cpp peer's bench: (pp tok/s, tg tok/s)."""
    res = run_worker({"op": "bench", "model": str(path), "n_prompt": n_prompt, "n_gen": n_gen,
                      "n_threads": threads, "reps": 1})
    return float(res["pp_tps"][0]), float(res["tg_tps"][0])


def llama_ttft_cmd(path: Path, threads: int, workdir: Path) -> list[str]:
    """A peer-worker process that loads the model and produces one token (the llama.cpp TTFT)."""
    req = {"op": "greedy", "model": str(path), "ids": [9707, 1879, 13], "n": 1, "n_threads": threads,
           "out": str(workdir)}
    req_path = workdir / "request.json"
    req_path.write_text(json.dumps(req))
    return [str(PEER_PYTHON), str(PEER_WORKER), str(req_path)]


def measure_ttft(res: ModelResult, threads: int, reps: int) -> None:
    """Process start to exit for one generated token, after one untimed warm-up run of each."""
    env = thread_env(threads)
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {
            "qwenlite": qwenlite_cmd("run", "-m", str(res.path), "-p", TTFT_PROMPT, "-n", "1",
                                     "-t", str(threads), "--temp", "0"),
            "llama.cpp": llama_ttft_cmd(res.path, threads, Path(tmp)),
        }
        for side, cmd in cmds.items():
            try:
                run_measured(cmd, env)
                walls, peak = [], 0
                for _ in range(reps):
                    wall, rss, _ = run_measured(cmd, env)
                    walls.append(wall)
                    peak = max(peak, rss)
                res.ttft[side], res.rss[side] = walls, peak
            except (RuntimeError, OSError) as exc:
                res.errors.append(f"{side} TTFT: {exc}")


def measure_model(res: ModelResult, n_prompt: int, n_gen: int, threads: int, reps: int) -> None:
    """Interleaved pp/tg repetitions of both runtimes, ABBA order."""
    sides = {"qwenlite": qwenlite_rep, "llama.cpp": llama_rep}
    for key in ("qwenlite pp", "qwenlite tg", "llama.cpp pp", "llama.cpp tg"):
        res.samples[key] = []
    failed: set[str] = set()
    for rep in range(reps):
        order = list(sides) if rep % 2 == 0 else list(reversed(sides))
        for side in order:
            if side in failed:
                continue
            try:
                pp, tg = sides[side](res.path, n_prompt, n_gen, threads)
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                failed.add(side)
                res.errors.append(f"{side} bench: {exc}")
                continue
            res.samples[f"{side} pp"].append(pp)
            res.samples[f"{side} tg"].append(tg)
            print(f"  rep {rep + 1} {side:9s} pp {pp:8.2f} tok/s  tg {tg:7.2f} tok/s", flush=True)


def ratio(res: ModelResult, kind: str) -> str:
    """qwenlite / llama.cpp mean throughput, or a dash when a side has no samples."""
    a, b = res.samples.get(f"qwenlite {kind}"), res.samples.get(f"llama.cpp {kind}")
    return f"{mean_std(a)[0] / mean_std(b)[0]:.2f}" if a and b else "–"


def cell(samples: list[float] | None, digits: int = 1) -> str:
    """``mean ± std`` or a dash."""
    return fmt(samples, digits) if samples else "–"


def render(results: list[ModelResult], bw: float, args: argparse.Namespace) -> str:
    """The side-by-side section of BENCHMARKS.md."""
    lines = [
        "## qwenlite vs llama.cpp (side by side)",
        "",
        machine_summary(),
        f"Measured read bandwidth (Numba parallel sum over 1 GiB, {args.threads} threads, best of 5): "
        f"**{bw:.1f} GB/s**.",
        "",
        f"pp{args.n_prompt} = one evaluation of {args.n_prompt} tokens into an empty cache; tg{args.n_gen} = "
        f"{args.n_gen} single-token decodes from an empty cache (llama-bench's definitions). "
        f"{args.threads} threads on both sides, {args.reps} repetitions each, interleaved ABBA, one "
        "process per repetition, each with its own untimed warm-up; model loading is not timed. "
        "llama.cpp is llama-cpp-python 0.3.36 (vendored llama.cpp, built with GGML_NATIVE=ON). "
        "tok/s as mean ± standard deviation. "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} (both runtimes use OpenMP threads; "
        "`passive` stops idle threads spinning, which matters when the cores are oversubscribed).",
        "",
        f"| model | file MB | qwenlite pp{args.n_prompt} | llama.cpp pp{args.n_prompt} | ratio | "
        f"qwenlite tg{args.n_gen} | llama.cpp tg{args.n_gen} | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r.samples
        lines.append(
            f"| {r.name} | {r.file_bytes / 1e6:.0f} | {cell(s.get('qwenlite pp'))} | {cell(s.get('llama.cpp pp'))} | "
            f"{ratio(r, 'pp')} | {cell(s.get('qwenlite tg'))} | {cell(s.get('llama.cpp tg'))} | {ratio(r, 'tg')} |"
        )
    lines += [
        "",
        "### Decode bandwidth",
        "",
        "Bytes read per decoded token (all weights; the token embedding counts only when it is also the "
        "output projection) x tg tok/s, against the measured read bandwidth.",
        "",
        "| model | MB read / token | qwenlite GB/s | % of probe | llama.cpp GB/s | % of probe |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cells = []
        for side in ("qwenlite", "llama.cpp"):
            tg = r.samples.get(f"{side} tg")
            if tg:
                gbs = r.bytes_per_token * mean_std(tg)[0] / 1e9
                cells += [f"{gbs:.1f}", f"{100 * gbs / bw:.0f}%"]
            else:
                cells += ["–", "–"]
        lines.append(f"| {r.name} | {r.bytes_per_token / 1e6:.0f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Start-up and memory",
        "",
        f"Wall time from process start to exit of `qwenlite run -n 1` (prompt {TTFT_PROMPT!r}, "
        "warm page cache and Numba cache, after one untimed run), and of a llama-cpp-python process "
        "doing the same (load + one token), with the peak RSS of each process. "
        f"qwenlite ran as `{qwenlite_exe() or sys.executable + ' -m qwenlite.cli'}`.",
        "",
        "| model | file MB | qwenlite TTFT s | qwenlite peak RSS MB | llama.cpp TTFT s | llama.cpp peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        q, lc = r.ttft.get("qwenlite"), r.ttft.get("llama.cpp")
        q_rss = f"{r.rss['qwenlite'] / 1e6:.0f}" if "qwenlite" in r.rss else "–"
        l_rss = f"{r.rss['llama.cpp'] / 1e6:.0f}" if "llama.cpp" in r.rss else "–"
        lines.append(f"| {r.name} | {r.file_bytes / 1e6:.0f} | {cell(q, 2)} | {q_rss} | {cell(lc, 2)} | {l_rss} |")
    errors = [f"- {r.name}: {e}" for r in results for e in r.errors]
    if errors:
        lines += ["", "### Failures", "", *errors]
    return "\n".join(lines) + "\n"


def resolve(names: list[str], files: list[str]) -> list[tuple[str, Path]]:
    """Known model names through the hub (pulled on first use), plus explicit GGUF paths."""
    from qwenlite.hub import resolve_model

    out = [(name, Path(resolve_model(name))) for name in names]
    return out + [(Path(f).stem, Path(f)) for f in files]


def main() -> None:
    """Measure everything and rewrite the side-by-side section of BENCHMARKS.md."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", help="extra GGUF files (e.g. a synthetic MoE model)")
    ap.add_argument("--models", nargs="*", default=DEFAULT_MODELS, help="known model names to pull and run")
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=4)
    ap.add_argument("--ttft-reps", type=int, default=3)
    args = ap.parse_args()
    if not peer_available():
        sys.exit("llama.cpp peer missing: run `make peer` first")
    bw = read_bandwidth_gbs(threads=args.threads)
    print(f"read bandwidth {bw:.1f} GB/s", flush=True)
    results = []
    for name, path in resolve(args.models, args.files):
        total, per_token = bytes_read_per_token(path)
        res = ModelResult(name, path, path.stat().st_size, per_token)
        print(f"{name}: {path} ({total / 1e6:.0f} MB of tensors)", flush=True)
        measure_model(res, args.n_prompt, args.n_gen, args.threads, args.reps)
        measure_ttft(res, args.threads, args.ttft_reps)
        results.append(res)
        update_section("side-by-side", render(results, bw, args))
    print(f"wrote {REPO_ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
