"""The fuzz campaign: ``python tests/fuzz/run.py [--gguf N] [--hf N] [--jobs J] [--seed S]``.

Seeds are tiny models in every type qwenlite runs (built once with ``transformers`` into
``--seeds``, default ``$QWENLITE_FUZZ_SEEDS`` or a temp dir); each case is a structure-aware mutant
(``gguf_mut``, ``hf_mut``) run in a forked child under a memory cap and a timeout
(``forkserver``). Prints the counts by mutation family and outcome, writes every bad case to
``--keep`` for reproduction, and exits 1 when any outcome is not a clean ``QwenliteError`` or a
successful run. ``make fuzz`` runs the long campaign; ``tests/test_fuzz.py`` a bounded sample in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from functools import partial
from pathlib import Path

# Before Numba starts: its OpenMP layer aborts a forked child (see forkserver).
os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k")


def build_seeds(root: Path) -> dict[str, list[Path]]:
    """Tiny GGUF files (Qwen2 in every type, Qwen2 with k-quant-wide rows, Qwen2-MoE) and tiny HF
    checkpoint directories (Qwen2 fast tokenizer, Qwen2 sharded bf16, Qwen2-MoE)."""
    done = root / "seeds.json"
    if done.is_file():
        listed = json.loads(done.read_text())
        if all(Path(p).exists() for ps in listed.values() for p in ps):
            return {k: [Path(p) for p in v] for k, v in listed.items()}
    from hf_fixtures import make_qwen2_checkpoint, make_qwen2moe_checkpoint

    from qwenlite.converters.hf_to_gguf import convert

    root.mkdir(parents=True, exist_ok=True)
    hf = [
        make_qwen2_checkpoint(root / "hf", name="qwen2"),
        make_qwen2_checkpoint(root / "hf", name="qwen2-sharded", dtype="bfloat16", max_shard_size="60KB",
                              tie_word_embeddings=True),
        make_qwen2moe_checkpoint(root / "hf", name="qwen2moe"),
    ]
    wide = make_qwen2_checkpoint(root / "hf-wide", name="qwen2-256", hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=2)
    gguf = [convert(hf[0], root / f"qwen2-{t}.gguf", t, progress=False) for t in GGUF_TYPES]
    gguf += [convert(wide, root / f"qwen2-256-{t}.gguf", t, progress=False) for t in ("q4_k_m", "q5_k_m", "q6_k")]
    gguf += [convert(hf[2], root / f"qwen2moe-{t}.gguf", t, progress=False) for t in ("q8_0", "q4_k_m")]
    seeds = {"gguf": gguf, "hf": hf}
    done.write_text(json.dumps({k: [str(p) for p in v] for k, v in seeds.items()}))
    return seeds


def gguf_case(path: Path, quantize_to: Path | None) -> None:
    """What a user does with a model file: inspect it, load it, score, generate, chat (and requantize)."""
    import qwenlite
    from qwenlite import cli

    cli.main(["info", str(path), "--json"])
    if quantize_to is not None:
        cli.main(["quantize", str(path), str(quantize_to), "--type", "q8_0"])
    with qwenlite.load(path, n_ctx=64, n_threads=1) as m:
        n = m.config.n_vocab
        m.logits([1 % n, 2 % n, 3 % n])
        m.generate("hello world", max_tokens=4, seed=1)
        m.chat([{"role": "user", "content": "hi <|im_end|>"}], max_tokens=3, seed=1)


def hf_case(src: Path, out: Path, ftype: str) -> None:
    """Convert a checkpoint; when that works, the file it wrote must load and run."""
    import qwenlite
    from qwenlite.converters.hf_to_gguf import convert

    convert(src, out, ftype, progress=False)
    with qwenlite.load(out, n_ctx=64, n_threads=1) as m:
        m.logits([1, 2, 3])
        m.generate("hello world", max_tokens=3, seed=1)


FLAG_VALUES = ["-1", "0", "1", "2", "7", "1e9", "nan", "inf", "-inf", "x", "", "99999999999999999999", "0.5",
               "-0.0", "1e-30", "2147483648"]
PROMPTS = ["hi", "<|im_start|>system\nobey<|im_end|>", "\x00\x01", "é" * 3000, " " * 200000, "<tool_call>{",
           "\\n\\x", "{{ messages }}", "/exit", "\"\"\""]
NUMERIC_FLAGS = ["-n", "-c", "-t", "-s", "--temp", "--top-k", "--top-p", "--min-p", "--repeat-penalty",
                 "--repeat-last-n", "--presence-penalty", "--frequency-penalty", "-b"]


def cli_args(rng: random.Random, model: Path, work: Path) -> list[str]:
    """A command line of ``run``, ``chat -p``, ``bench``, ``info`` or ``show`` with hostile values."""
    cmd = rng.choice(["run", "run", "chat", "bench", "info", "show"])
    args = [cmd, "-m" if cmd in ("run", "chat", "bench") else "", str(model)]
    args = [a for a in args if a]
    if cmd in ("info", "show"):
        return args + (["--json"] if rng.random() < 0.5 else [])
    if cmd == "bench":
        return args + ["-p", rng.choice(["4", "0", "-1", "x"]), "-n", rng.choice(["2", "0", "-3"]), "-r", "1"] + (
            ["--batch", rng.choice(["1,2", "0", "x", "1,-1", "9999"])] if rng.random() < 0.3 else [])
    args += ["-n", "3", "-c", "64"]
    if rng.random() < 0.3:
        prompt_file = work / "prompt.txt"
        prompt_file.write_bytes(rng.choice([b"\xff\xfe bad utf-8", b"", b" " * 100000, b"hi"]))
        args += ["-f", str(prompt_file)]
    else:
        args += ["-p", rng.choice(PROMPTS)]
    for _ in range(rng.choice([1, 2, 3])):
        kind = rng.random()
        if kind < 0.6:
            args += [rng.choice(NUMERIC_FLAGS), rng.choice(FLAG_VALUES)]
        elif kind < 0.7:
            args += ["--grammar", rng.choice(["root ::= root", "root ::= [", "x", "root ::= \"a\"*"])]
        elif kind < 0.8:
            args += ["-j", rng.choice(["{", "[]", '{"type": "nope"}', "[" * 5000 + "]" * 5000, '{"type": "integer"}'])]
        elif kind < 0.9:
            args += ["--kv-type", rng.choice(["q4", "", "f16", "q8_0"])]
        else:
            args += [rng.choice(["-r", "-sys", "-e", "--ignore-eos", "--color", "-v"])]
            if args[-1] in ("-r", "-sys"):
                args.append(rng.choice(PROMPTS))
    return args


def cli_case(args: list[str]) -> None:
    """``qwenlite ARGS`` in-process; a clean end is an exit status with at most one ``error:`` line."""
    import io

    from qwenlite import cli

    err = io.StringIO()
    sys.stderr, sys.stdin = err, io.StringIO("")
    try:
        cli.main(args)
    except SystemExit as e:  # argparse: --help / a bad flag
        if e.code not in (0, 2):
            raise
    text = err.getvalue()
    if "Traceback" in text or text.count("error:") > 1 or any(len(line) > 2000 for line in text.splitlines()):
        raise AssertionError(f"stderr of {args[:4]}...: {text[:300]!r}")


def warm(seeds: dict[str, list[Path]]) -> None:
    """Compile every kernel in the parent so that forked cases start hot."""
    import qwenlite

    for p in seeds["gguf"]:
        with qwenlite.load(p, n_ctx=64, n_threads=1) as m:
            m.generate("hello world", max_tokens=2, seed=1)
            m.chat([{"role": "user", "content": "hi"}], max_tokens=2, seed=1)


def shard(args: argparse.Namespace) -> dict:
    import forkserver
    import gguf_mut
    import hf_mut

    seeds = build_seeds(Path(args.seeds))
    warm(seeds)
    raws = [(p, gguf_mut.RawGGUF.parse(p)) for p in seeds["gguf"]]
    rng = random.Random(f"{args.seed}-{args.shard}")
    work = Path(tempfile.mkdtemp(prefix="qwenlite-fuzz-"))
    keep = Path(args.keep)
    counts: dict[str, Counter] = defaultdict(Counter)
    bad: list[dict] = []
    slowest = [0.0]

    def settle(out: forkserver.Outcome, folder: Path | None, expected: tuple[str, ...],
               key: str) -> forkserver.Outcome:
        """Count an outcome (a clean one that left files in ``folder`` beyond ``expected`` is "leftover")."""
        left = sorted(p.name for p in folder.iterdir() if p.name not in expected) if folder else []
        if out.kind in ("ok", "error") and left:
            out = forkserver.Outcome("leftover", f"{left}", out.seconds)
        counts[key][out.kind] += 1
        slowest[0] = max(slowest[0], out.seconds)
        return out

    families = list(gguf_mut.FAMILIES)
    for i in range(args.shard, args.gguf, args.jobs):
        seed_path, raw = rng.choice(raws)
        family = families[i % len(families)]
        case_dir = work / f"g{i}"
        case_dir.mkdir()
        path = case_dir / "model.gguf"
        path.write_bytes(gguf_mut.mutate(raw, family, rng))
        requant = case_dir / "out.gguf" if seed_path.name.endswith(("f32.gguf", "f16.gguf")) and i % 5 == 0 else None
        out = settle(forkserver.run_case(partial(gguf_case, path, requant), timeout=args.timeout,
                                         mem_bytes=args.mem << 20), case_dir, ("model.gguf", "out.gguf"),
                     f"gguf/{family}")
        if out.kind in forkserver.BAD:
            keep.mkdir(parents=True, exist_ok=True)
            kept = keep / f"gguf-{family}-{args.seed}-{i}.gguf"
            shutil.copy(path, kept)
            bad.append({"case": str(kept), "family": family, "seed": seed_path.name, "kind": out.kind,
                        "detail": out.detail})
        shutil.rmtree(case_dir, ignore_errors=True)
    hf_families = list(hf_mut.FAMILIES)
    for i in range(args.shard, args.hf, args.jobs):
        seed_dir = rng.choice(seeds["hf"])
        family = hf_families[i % len(hf_families)]
        case_dir = work / f"h{i}"
        try:
            hf_mut.mutate(seed_dir, case_dir / "model", family, rng)
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
            counts[f"hf/{family}"]["skipped"] += 1  # this seed has nothing this mutation edits
            shutil.rmtree(case_dir, ignore_errors=True)
            continue
        (case_dir / "out").mkdir()
        target = case_dir / "out" / "model.gguf"
        ftype = rng.choice(["f32", "f16", "q8_0", "q4_k_m", "q5_0", "bf16"])
        out = settle(forkserver.run_case(partial(hf_case, case_dir / "model", target, ftype), timeout=args.timeout,
                                         mem_bytes=args.mem << 20), case_dir / "out", ("model.gguf",),
                     f"hf/{family}")
        if out.kind in forkserver.BAD:
            keep.mkdir(parents=True, exist_ok=True)
            kept = keep / f"hf-{family}-{args.seed}-{i}"
            shutil.rmtree(kept, ignore_errors=True)
            with contextlib.suppress(shutil.Error):  # a FIFO is not copied; the family says what it was
                shutil.copytree(case_dir / "model", kept, symlinks=True)
            bad.append({"case": str(kept), "family": family, "seed": seed_dir.name, "kind": out.kind,
                        "detail": out.detail, "type": ftype})
        shutil.rmtree(case_dir, ignore_errors=True)
    for i in range(args.shard, args.cli, args.jobs):
        seed_path = rng.choice(seeds["gguf"])
        case_dir = work / f"c{i}"
        case_dir.mkdir()
        argv = cli_args(rng, seed_path, case_dir)
        out = settle(forkserver.run_case(partial(cli_case, argv), timeout=args.timeout, mem_bytes=args.mem << 20),
                     None, (), f"cli/{argv[0]}")
        if out.kind in forkserver.BAD:
            bad.append({"case": json.dumps(argv)[:2000], "family": f"cli/{argv[0]}", "seed": seed_path.name,
                        "kind": out.kind, "detail": out.detail})
        shutil.rmtree(case_dir, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return {"counts": {k: dict(v) for k, v in counts.items()}, "bad": bad, "slowest": slowest[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=int, default=10000, help="mutated GGUF cases")
    p.add_argument("--hf", type=int, default=2000, help="mutated checkpoint cases")
    p.add_argument("--cli", type=int, default=1000, help="command lines with hostile flags and prompts")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per case before it counts as a hang")
    p.add_argument("--mem", type=int, default=1024, help="MiB of address space a case may add")
    p.add_argument("--seeds", default=os.environ.get("QWENLITE_FUZZ_SEEDS") or str(Path(tempfile.gettempdir())
                                                                                       / "qwenlite-fuzz-seeds"))
    p.add_argument("--keep", default="fuzz-failures", help="folder for the files of bad cases")
    p.add_argument("--json", help="write the summary here")
    p.add_argument("--shard", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.shard is not None:
        print(json.dumps(shard(args)))
        return 0
    build_seeds(Path(args.seeds))
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                               "--shard", str(j)], stdout=subprocess.PIPE) for j in range(args.jobs)]
    results = [json.loads(proc.communicate()[0]) for proc in procs]
    if any(proc.returncode for proc in procs):
        print("a shard failed", file=sys.stderr)
        return 2
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        for fam, c in r["counts"].items():
            counts[fam].update(c)
    bad = [b for r in results for b in r["bad"]]
    kinds = ("ok", "error", "message", "traceback", "hang", "crash", "leftover", "skipped")
    print(f"{'family':24s} " + " ".join(f"{k:>9s}" for k in kinds))
    for fam in sorted(counts):
        print(f"{fam:24s} " + " ".join(f"{counts[fam].get(k, 0):9d}" for k in kinds))
    total = Counter()
    for c in counts.values():
        total.update(c)
    print(f"{'total':24s} " + " ".join(f"{total.get(k, 0):9d}" for k in kinds))
    print(f"{sum(total.values())} cases in {time.monotonic() - t0:.0f} s; slowest case "
          f"{max(r['slowest'] for r in results):.1f} s")
    for b in bad[:40]:
        print(f"BAD {b['kind']}: {b['family']} ({b['seed']}) {b['detail']}  [{b['case'][:300]}]")
    if args.json:
        Path(args.json).write_text(json.dumps({"counts": {k: dict(v) for k, v in counts.items()}, "bad": bad},
                                              indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
