"""KV cache memory: peak RSS of one long-context process per KV element type, qwenlite vs llama.cpp.

For each type (f32, f16, q8_0) a fresh process loads the model with a context of ``--n-ctx`` tokens
(default 32768, the trained context of Qwen2.5-Coder) and that KV type, evaluates a prompt of
``--n-prompt`` pseudo-random ordinary tokens (default 2048) and decodes ``--n-decode`` greedy tokens.
The parent reads the child's peak RSS from ``os.wait4``'s rusage (``ru_maxrss``); the child also
reports its own VmHWM, which cannot include anything of the parent's. KV bytes per token = 2 (K and
V) x layers x KV heads x head size x bytes per element (f32 4, f16 2, q8_0 34 per 32 values), the
model's ``kv_bytes_per_token`` when it has one.

qwenlite side: ``qwenlite.load(path, n_ctx=N, kv_type=T, n_threads=...)`` then ``generate``, run by the
interpreter of ``$QWENLITE_BENCH_EXE``'s environment when set (``make bench-kv`` points it at the
README-installed venv), else this one. llama.cpp side: the peer worker's ``kv_memory`` op
(``Llama(n_ctx=N, type_k=T, type_v=T)``; GGML type ids 0 f32, 1 f16, 8 q8_0).

Run from the repository root: ``python3 -m benchmarks.kv_memory [--model NAME_OR_GGUF]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KV_TYPES = {"f32": (0, 4.0), "f16": (1, 2.0), "q8_0": (8, 34 / 32)}  # GGML type id, bytes per element
DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct-q4_k_m"
SIDES = ("qwenlite", "llama.cpp")


def prompt_ids(n: int, seed: int = 7) -> list[int]:
    """``n`` fixed pseudo-random ids below Qwen's special tokens (memory does not depend on which)."""
    rng = random.Random(seed)
    return [rng.randrange(0, 151643) for _ in range(n)]


def vm_hwm() -> int:
    """This process's peak resident set in bytes (VmHWM), 0 where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def child_main(spec_path: str) -> None:
    """The qwenlite child: load, prompt, decode, print one JSON line."""
    import inspect

    import qwenlite

    spec = json.loads(Path(spec_path).read_text())
    params = inspect.signature(qwenlite.load).parameters
    if "kv_type" not in params:
        raise SystemExit("qwenlite.load has no kv_type argument yet")
    # One sequence slot, as the llama.cpp side has, where the loader can hold several.
    extra = {"n_seq": 1} if "n_seq" in params else {}
    t0 = time.perf_counter()
    m = qwenlite.load(spec["model"], n_ctx=spec["n_ctx"], kv_type=spec["kv_type"], n_threads=spec["n_threads"],
                      **extra)
    t1 = time.perf_counter()
    text = m.generate(spec["ids"], max_tokens=spec["n_decode"], temperature=0.0)
    t2 = time.perf_counter()
    cfg = m.config
    per_token = getattr(m, "kv_bytes_per_token", None)
    source = "model"
    if per_token is None:
        per_token = round(2 * cfg.n_layer * cfg.n_head_kv * cfg.head_dim * KV_TYPES[spec["kv_type"]][1])
        source = "formula"
    print(json.dumps({"load_s": t1 - t0, "generate_s": t2 - t1, "n_chars": len(text), "vm_hwm": vm_hwm(),
                      "kv_bytes_per_token": int(per_token), "kv_source": source,
                      "shape": [cfg.n_layer, cfg.n_head_kv, cfg.head_dim]}))


def run_child(cmd: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """(peak RSS bytes from the child's rusage, stdout, stderr); raises on a failing child."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}): {stderr.strip()[-1500:]}")
    return usage.ru_maxrss * 1024, stdout, stderr


def qwenlite_python() -> str:
    """The interpreter of ``$QWENLITE_BENCH_EXE``'s environment when set, else this one."""
    exe = os.environ.get("QWENLITE_BENCH_EXE")
    if exe and (Path(exe).parent / "python").exists():
        return str(Path(exe).parent / "python")
    return sys.executable


def env_for(threads: int) -> dict[str, str]:
    """Environment pinning the child's thread pools to ``threads`` and finding this repository."""
    from benchmarks.report import REPO_ROOT

    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    return env


def measure_qwenlite(path: Path, kind: str, ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"model": str(path), "n_ctx": args.n_ctx, "kv_type": kind, "ids": ids,
                                    "n_decode": args.n_decode, "n_threads": args.threads}))
        rss, stdout, _ = run_child([qwenlite_python(), "-m", "benchmarks.kv_memory", "--child", str(spec)],
                                   env_for(args.threads))
    res = json.loads(stdout.strip().splitlines()[-1])
    res["rss"] = rss
    return res


def measure_llama(path: Path, kind: str, ids: list[int], args: argparse.Namespace) -> dict[str, Any]:
    from tests.peer import PEER_PYTHON, PEER_WORKER

    type_id = KV_TYPES[kind][0]
    flash = args.flash_attn == "on" or (args.flash_attn == "needed" and kind not in ("f32", "f16"))
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "request.json"
        req.write_text(json.dumps({"op": "kv_memory", "model": str(path), "n_ctx": args.n_ctx, "ids": ids,
                                   "type_k": type_id, "type_v": type_id, "flash_attn": flash,
                                   "n_decode": args.n_decode, "n_threads": args.threads, "out": tmp}))
        rss, _, _ = run_child([str(PEER_PYTHON), str(PEER_WORKER), str(req)], env_for(args.threads))
        res = json.loads((Path(tmp) / "result.json").read_text())
    res["rss"], res["flash_attn"] = rss, flash
    return res


def render(name: str, shape: tuple[int, int, int], file_mb: float, rows: dict[str, dict[str, Any]],
           errors: list[str], args: argparse.Namespace) -> str:
    from benchmarks.report import machine_summary

    n_layer, n_kv, head_dim = shape
    lines = [
        "## KV cache memory",
        "",
        machine_summary(),
        "",
        f"{name} ({file_mb:.0f} MB file; {n_layer} layers x {n_kv} KV heads x head size {head_dim}), context "
        f"n_ctx = {args.n_ctx}, one fresh process per row (qwenlite's after an untimed small run of the same type, "
        f"which leaves the Numba cache current): load, a prompt of {args.n_prompt} "
        f"pseudo-random tokens, {args.n_decode} greedy decode steps, {args.threads} threads. Peak RSS = the "
        "child's `ru_maxrss` (`os.wait4`); VmHWM = the child's own high-water mark (they agree unless the "
        "parent was larger). KV bytes / token = 2 x layers x KV heads x head size x bytes per element "
        "(q8_0: 34 bytes per 32 values); full-context KV = that x n_ctx. qwenlite: "
        f"`qwenlite.load(path, n_ctx={args.n_ctx}, kv_type=T, n_seq=1)` + `generate`, run by `{qwenlite_python()}`. "
        f"llama.cpp: llama-cpp-python 0.3.36 `Llama(n_ctx={args.n_ctx}, type_k=T, type_v=T, n_batch=512)` "
        "(flash attention as listed; a quantized V cache needs it).",
        "",
        "Full-context KV = what a cache for all n_ctx positions takes; KV written = the positions this run "
        "filled (prompt + decoded tokens). A cache allocated with zeroed pages that are never touched "
        "(qwenlite's `np.zeros`, one contiguous run of positions per layer and head) only becomes resident as "
        "positions are written; llama.cpp clears its whole buffer when it creates the context.",
        "",
        "| KV type | KV bytes / token | full-context KV MB | KV written MB | qwenlite peak RSS MB | "
        "qwenlite VmHWM MB | qwenlite load s | qwenlite prompt+decode s | llama.cpp peak RSS MB | "
        "llama.cpp flash attn | llama.cpp prompt+decode s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    n_written = args.n_prompt + args.n_decode
    for kind, row in rows.items():
        q, lc = row.get("qwenlite"), row.get("llama.cpp")
        per_token = q["kv_bytes_per_token"] if q else round(2 * n_layer * n_kv * head_dim * KV_TYPES[kind][1])
        cells = [kind, f"{per_token}", f"{per_token * args.n_ctx / 1e6:.0f}", f"{per_token * n_written / 1e6:.0f}"]
        cells += ([f"{q['rss'] / 1e6:.0f}", f"{q['vm_hwm'] / 1e6:.0f}", f"{q['load_s']:.1f}", f"{q['generate_s']:.1f}"]
                  if q else ["–"] * 4)
        cells += ([f"{lc['rss'] / 1e6:.0f}", "on" if lc["flash_attn"] else "off",
                   f"{lc['prefill_s'] + lc['decode_s']:.1f}"] if lc else ["–"] * 3)
        lines.append("| " + " | ".join(cells) + " |")
    sources = {row["qwenlite"]["kv_source"] for row in rows.values() if row.get("qwenlite")}
    if sources:
        lines += ["", "qwenlite's KV bytes / token: " + ("`Model.kv_bytes_per_token`." if sources == {"model"}
                                                     else "the formula (the model has no `kv_bytes_per_token`).")]
    if errors:
        lines += ["", "Failures:", "", *[f"- {e}" for e in errors]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="known model name or GGUF path")
    ap.add_argument("--types", default="f32,f16,q8_0")
    ap.add_argument("-c", "--n-ctx", type=int, default=32768)
    ap.add_argument("-p", "--n-prompt", type=int, default=2048)
    ap.add_argument("-n", "--n-decode", type=int, default=4)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--flash-attn", choices=("needed", "on", "off"), default="on",
                    help="llama.cpp flash attention: on, off, or only where the cache type needs it")
    ap.add_argument("--sides", default=",".join(SIDES))
    ap.add_argument("--no-warmup", action="store_true", help="skip the small qwenlite run before each type")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.child:
        child_main(args.child)
        return
    from benchmarks.report import REPO_ROOT, update_section

    path = Path(args.model)
    if not path.exists():
        from qwenlite.hub import resolve_model

        path = Path(resolve_model(args.model))
    from gguf import GGUFReader

    fields = GGUFReader(path).fields

    def meta(key: str) -> int:
        f = fields[f"qwen2.{key}"]
        return int(f.parts[f.data[0]][0])

    n_head = meta("attention.head_count")
    shape = (meta("block_count"), meta("attention.head_count_kv"), meta("embedding_length") // n_head)
    ids = prompt_ids(args.n_prompt)
    sides = [s for s in SIDES if s in args.sides.split(",")]
    measurers = {"qwenlite": measure_qwenlite, "llama.cpp": measure_llama}
    rows: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    for kind in args.types.split(","):
        rows[kind] = {}
        if "qwenlite" in sides and not args.no_warmup:
            # A small untimed run first, so a stale Numba cache is rebuilt there: compiling in the measured
            # process adds hundreds of MB of LLVM memory to its peak.
            small = argparse.Namespace(**{**vars(args), "n_ctx": 512, "n_decode": 2})
            try:
                measure_qwenlite(path, kind, ids[:300], small)
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                print(f"{kind:5s} qwenlite  warm-up failed: {str(exc)[-300:]}", flush=True)
        for side in sides:
            try:
                rows[kind][side] = res = measurers[side](path, kind, ids, args)
                print(f"{kind:5s} {side:9s} peak RSS {res['rss'] / 1e6:7.0f} MB  VmHWM {res['vm_hwm'] / 1e6:7.0f} MB",
                      flush=True)
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                errors.append(f"{kind} {side}: {str(exc)[-600:]}")
                print(f"{kind:5s} {side:9s} FAILED {str(exc)[-300:]}", flush=True)
    text = render(path.stem, shape, path.stat().st_size / 1e6, rows, errors, args)
    print(text)
    if not args.no_write:
        update_section("kv-memory", text)
        print(f"wrote {REPO_ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
