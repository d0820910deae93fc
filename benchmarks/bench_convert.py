"""Converter speed: qwenlite ``convert --type q4_k_m`` vs llama.cpp's two-step HF -> F16 -> Q4_K_M.

Both start from the same Hugging Face directory. By default that is the real 0.5B model rebuilt as a
float32 HF checkpoint (``tests.hf_reference.gguf_to_hf``: every tensor dequantized by ``gguf``), so
the weights have a real distribution. llama.cpp's side is its own ``convert_hf_to_gguf.py`` (from the
sdist, with its vendored gguf-py first on PYTHONPATH; it needs torch and transformers, which this
interpreter has) followed by ``llama_model_quantize`` (the function behind ``llama-quantize``) through
the peer. Each side is timed as whole processes, wall clock, including interpreter start-up.

Besides time, the two Q4_K_M files are compared tensor by tensor: same ggml type (the mix rules) and
byte-identical data (the quantizers), which qwenlite can only reach where it also rounds via F16.

Run from the repository root: ``python3 -m benchmarks.bench_convert [--hf-dir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from benchmarks.bench_side_by_side import qwenlite_cmd, run_measured, thread_env
from benchmarks.report import fmt, machine_summary, update_section
from tests.peer import LLAMA_CPP_SRC, PEER_DIR, peer_available, run_worker

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"


def default_hf_dir() -> Path:
    """The 0.5B model ($QWENLITE_TEST_MODEL, else pulled into the qwenlite cache) as an HF checkpoint,
    cached under .peer/ (it takes minutes to build)."""
    from qwenlite.errors import QwenliteError
    from qwenlite.hub import resolve_model
    from tests.hf_reference import gguf_to_hf

    try:
        src = resolve_model(os.environ.get("QWENLITE_TEST_MODEL") or DEFAULT_MODEL)
    except QwenliteError as exc:
        sys.exit(f"no HF directory given and the default model is unavailable: {exc} (or pass --hf-dir)")
    return gguf_to_hf(src, PEER_DIR / "hf" / src.stem)


def time_qwenlite(hf_dir: Path, out: Path, threads: int) -> tuple[float, int]:
    """(seconds, peak RSS) of ``qwenlite convert HF -o out --type q4_k_m``."""
    wall, rss, _ = run_measured(qwenlite_cmd("convert", str(hf_dir), "-o", str(out), "--type", "q4_k_m"),
                                thread_env(threads))
    return wall, rss


def time_llama(hf_dir: Path, f16: Path, out: Path, threads: int) -> tuple[float, float, int]:
    """(convert seconds, quantize seconds, peak RSS of the converter) of llama.cpp's pipeline."""
    env = thread_env(threads)
    env["PYTHONPATH"] = str(LLAMA_CPP_SRC / "gguf-py")
    cmd = [sys.executable, str(LLAMA_CPP_SRC / "convert_hf_to_gguf.py"), str(hf_dir),
           "--outfile", str(f16), "--outtype", "f16"]
    conv, rss, _ = run_measured(cmd, env)
    t0 = time.perf_counter()
    run_worker({"op": "quantize_model", "src": str(f16), "dst": str(out), "ftype": "q4_k_m",
                "n_threads": threads}, timeout=3600)
    return conv, time.perf_counter() - t0, rss


def compare(a: Path, b: Path) -> tuple[int, int, int, list[str]]:
    """(tensors, same ggml type, byte-identical, up to 8 type mismatches) of two GGUFs, by name."""
    ta = {t.name: t for t in GGUFReader(a).tensors}
    tb = {t.name: t for t in GGUFReader(b).tensors}
    names = sorted(ta.keys() & tb.keys())
    same_type = [n for n in names if ta[n].tensor_type == tb[n].tensor_type]
    identical = sum(np.array_equal(ta[n].data, tb[n].data) for n in same_type)
    mismatches = [f"{n}: {ta[n].tensor_type.name} vs {tb[n].tensor_type.name}"
                  for n in names if ta[n].tensor_type != tb[n].tensor_type][:8]
    return len(ta.keys() | tb.keys()), len(same_type), identical, mismatches


def main() -> None:
    """Time both converters ``reps`` times (alternating) and write the BENCHMARKS.md section."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hf-dir", type=Path, default=None, help="HF checkpoint (default: the 0.5B, rebuilt)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=2)
    args = ap.parse_args()
    if not peer_available():
        sys.exit("llama.cpp peer missing: run `make peer` first")
    hf_dir = args.hf_dir or default_hf_dir()
    q_times: list[float] = []
    l_conv: list[float] = []
    l_quant: list[float] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory(dir=PEER_DIR) as tmp:
        q_out, l_f16, l_out = Path(tmp) / "qwenlite.gguf", Path(tmp) / "llama-f16.gguf", Path(tmp) / "llama.gguf"
        try:  # untimed: fills Numba's on-disk cache, which a user's second conversion already has
            time_qwenlite(hf_dir, q_out, args.threads)
        except (RuntimeError, OSError) as exc:
            errors.append(f"qwenlite warm-up: {exc}")
        for rep in range(args.reps if not errors else 0):
            for side in (("qwenlite", "llama.cpp") if rep % 2 == 0 else ("llama.cpp", "qwenlite")):
                try:
                    if side == "qwenlite":
                        wall, q_rss = time_qwenlite(hf_dir, q_out, args.threads)
                        q_times.append(wall)
                    else:
                        conv, quant, l_rss = time_llama(hf_dir, l_f16, l_out, args.threads)
                        l_conv.append(conv)
                        l_quant.append(quant)
                except (RuntimeError, OSError) as exc:
                    errors.append(f"{side}: {exc}")
                print(f"rep {rep + 1} {side} done", flush=True)
            if errors:
                break
        lines = [
            "## Converter speed (HF -> Q4_K_M GGUF)",
            "",
            machine_summary(),
            "",
            f"Input: `{hf_dir}` (float32 safetensors). {args.threads} threads, wall clock of whole processes, "
            f"{len(q_times)} / {len(l_conv)} repetitions, alternating, after one untimed qwenlite run "
            "(Numba compile cache). llama.cpp = `convert_hf_to_gguf.py "
            "--outtype f16` (llama.cpp's usual path) then `llama_model_quantize` Q4_K_M.",
            "",
            "| tool | convert s | quantize s | total s | output MB |",
            "|---|---:|---:|---:|---:|",
        ]
        if q_times:
            lines.append(f"| qwenlite | – | – | {fmt(q_times)} | {q_out.stat().st_size / 1e6:.0f} |")
        if l_conv:
            total = [a + b for a, b in zip(l_conv, l_quant)]
            lines.append(f"| llama.cpp | {fmt(l_conv)} | {fmt(l_quant)} | {fmt(total)} | "
                         f"{l_out.stat().st_size / 1e6:.0f} |")
        if q_times and l_conv:
            ratio = (sum(q_times) / len(q_times)) / (sum(total) / len(total))
            n, same_type, identical, mismatches = compare(q_out, l_out)
            lines += ["", f"Time ratio qwenlite / llama.cpp: **{ratio:.2f}** (below 1 = qwenlite faster).",
                      f"Output agreement: {same_type}/{n} tensors with the same ggml type, {identical} of them "
                      "byte-identical.",
                      f"Peak RSS: qwenlite {q_rss / 1e6:.0f} MB, llama.cpp converter {l_rss / 1e6:.0f} MB."]
            if mismatches:
                lines += ["", "Type mismatches (qwenlite vs llama.cpp), first few:", "",
                          *[f"- {m}" for m in mismatches]]
        if errors:
            lines += ["", "### Failures", "", *[f"- {e}" for e in errors]]
    update_section("convert", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
