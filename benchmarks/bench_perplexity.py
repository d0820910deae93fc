"""Perplexity throughput, ``qwenlite perplexity`` vs llama.cpp's ``llama-perplexity`` (issue 17).

Same file, same text (CPython's ``pydoc_data.topics``, as in tests/test_perplexity.py), ``-c 512``,
the same chunk count and threads, llama-perplexity's default batch (2048: four chunks per pass) on
both sides. Each side is a whole process, alternately (ABBA). tokens/s = chunks x 512 / the time from
the first chunk's evaluation to the final estimate, model load and tokenization excluded: qwenlite
prints it, for llama-perplexity it is read from the time stamps of its log lines. Both PPL values are
printed beside the speeds.

Run from the repository root after ``make peer-tools``: ``python3 -m benchmarks.bench_perplexity``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from benchmarks.bench_side_by_side import DEFAULT_MODELS, thread_env
from benchmarks.report import REPO_ROOT, fmt, machine_summary, mean_std, update_section

LLAMA_PERPLEXITY = REPO_ROOT / ".peer" / "server-build" / "bin" / "llama-perplexity"


def _text(path: Path) -> Path:
    from pydoc_data.topics import topics

    path.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return path


def run_qwenlite(model: Path, text: Path, chunks: int, threads: int) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-m", "qwenlite", "perplexity", "-m", str(model), "-f", str(text),
                          "--chunks", str(chunks), "-t", str(threads)], capture_output=True, text=True,
                         env=thread_env(threads), check=True).stdout
    tps = float(re.search(r"scored, ([\d.]+) tok/s", out).group(1))
    return tps, float(re.search(r"PPL = ([\d.]+)", out).group(1))


def run_llama(model: Path, text: Path, chunks: int, threads: int) -> tuple[float, float]:
    """llama-perplexity prints the wall-clock offset of every log line: tokens/s = scored span from the
    line that starts the chunks to the final estimate."""
    out = subprocess.run([str(LLAMA_PERPLEXITY), "-m", str(model), "-f", str(text), "--chunks", str(chunks),
                          "-t", str(threads), "-c", "512"], capture_output=True, text=True,
                         env=thread_env(threads), check=True).stderr

    def stamp(pattern: str) -> float:
        # a stamp is "M.SS.mmm.uuu"; without a terminal a continued line ("ETA ...") and the next
        # stamped line share one output line, so the stamp is matched right before the message
        found = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+) I (?:perplexity: )?" + pattern, out)
        m, s, ms, us = (int(v) for v in found.groups())
        return m * 60 + s + ms / 1000 + us / 1e6

    span = stamp("Final estimate") - stamp("calculating perplexity over")
    return chunks * 512 / span, float(re.search(r"PPL = ([\d.]+)", out).group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=DEFAULT_MODELS[0])
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2, help="ABBA rounds")
    args = p.parse_args()
    if not LLAMA_PERPLEXITY.exists():
        sys.exit("llama-perplexity not built: run `make peer-tools`")
    from qwenlite.hub import resolve_model

    model = Path(resolve_model(args.model))
    text = _text(Path("/tmp/qwenlite-bench-perplexity.txt"))
    sides = {"qwenlite": run_qwenlite, "llama.cpp": run_llama}
    speed: dict[str, list[float]] = {k: [] for k in sides}
    ppl: dict[str, float] = {}
    for _ in range(args.rounds):
        for name in ("qwenlite", "llama.cpp", "llama.cpp", "qwenlite"):
            tps, value = sides[name](model, text, args.chunks, args.threads)
            speed[name].append(tps)
            ppl[name] = value
    ratio = mean_std(speed["qwenlite"])[0] / mean_std(speed["llama.cpp"])[0]
    body = "\n".join([
        "## Perplexity throughput (issue 17)",
        "",
        f"`python3 -m benchmarks.bench_perplexity --chunks {args.chunks} --rounds {args.rounds}`: {model.name}, "
        f"CPython's pydoc_data.topics as the text, -c 512, {args.chunks} chunks, batch 2048 (4 chunks a pass), "
        f"{args.threads} threads, {len(speed['qwenlite'])} runs a side, ABBA. tok/s over the chunks' evaluation "
        "and scoring (model load excluded on both sides).",
        "",
        machine_summary(),
        "",
        "| side | tok/s | PPL |",
        "|---|---|---|",
        f"| qwenlite perplexity | {fmt(speed['qwenlite'])} | {ppl['qwenlite']:.4f} |",
        f"| llama-perplexity | {fmt(speed['llama.cpp'])} | {ppl['llama.cpp']:.4f} |",
        "",
        f"Ratio qwenlite / llama.cpp: **{ratio:.2f}x**; PPL differs by "
        f"{(ppl['qwenlite'] / ppl['llama.cpp'] - 1) * 100:+.3f}%.",
    ])
    update_section("perplexity", body)
    print(body)


if __name__ == "__main__":
    main()
