"""The ``qwenlite`` command line: run / chat / serve / info / pull / warmup / bench / convert / quantize.

Conventions every subcommand keeps: stdout carries only the product (generated text, JSON, the info
report); status goes to stderr. Any ``QwenliteError`` becomes one ``error: ...`` line on stderr and exit
status 1, never a traceback; Ctrl-C exits with 130 quietly. ``-m`` takes a file path or a known model
name (see ``qwenlite pull --list``) and defaults to the default model, pulled on first use.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from qwenlite import hub
from qwenlite.chat.sampler import Sampler, SamplerConfig
from qwenlite.errors import GGUFError, QwenliteError


def _load(args: argparse.Namespace, **extra: Any) -> Any:
    if args.threads is not None and args.threads < 1:
        raise QwenliteError(f"-t/--threads must be >= 1, got {args.threads}")
    if args.ctx_size is not None and args.ctx_size < 1:
        raise QwenliteError(f"-c/--ctx-size must be >= 1, got {args.ctx_size}")
    kv = _kv_type(args)
    path = hub.resolve_model(args.model)
    from qwenlite.api import load  # imported lazily: `pull` and `--help` should not compile kernels

    return load(path, n_threads=args.threads, n_ctx=args.ctx_size, kv_type=kv, **extra)


def _kv_type(args: argparse.Namespace) -> str | None:
    """The KV cache type from --kv-type or llama.cpp's -ctk/-ctv (one type serves K and V)."""
    given = {name: getattr(args, name) for name in ("kv_type", "cache_type_k", "cache_type_v")
             if getattr(args, name, None) is not None}
    if len({v.lower() for v in given.values()}) > 1:
        raise QwenliteError("qwenlite keeps K and V in one type: give the same --kv-type / -ctk / -ctv, got "
                            + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in given.items()))
    return next(iter(given.values()), None)


def _sampling(args: argparse.Namespace) -> SamplerConfig:
    return SamplerConfig(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                         repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed)


def _sampler(args: argparse.Namespace) -> Sampler:
    return Sampler(_sampling(args))


def _emit(pieces: Iterable[str]) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()


def _read_prompt(args: argparse.Namespace) -> str:
    if args.file is not None:
        if args.prompt is not None:
            raise QwenliteError("give the prompt with -p or -f, not both")
        try:
            raw = Path(args.file).read_bytes()
        except OSError as exc:
            raise QwenliteError(f"cannot read prompt file {args.file}: {exc.strerror or exc}") from exc
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise QwenliteError(f"prompt file {args.file} is not valid UTF-8 (bad byte at offset {exc.start})") from exc
    if args.prompt is None:
        raise QwenliteError("no prompt: give one with -p TEXT or -f FILE")
    return args.prompt


def _text_or_file(value: str, what: str) -> str:
    """llama.cpp's ``--grammar`` / ``--json-schema`` take the text itself; a path to a file works too."""
    path = Path(value)
    if len(value) < 4096 and "\n" not in value and path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise QwenliteError(f"cannot read {what} file {value}: {exc}") from exc
    return value


def _grammar(args: argparse.Namespace, model: Any) -> Any:
    """The ``--grammar`` / ``--json-schema`` constraint, compiled for ``model`` (None without one)."""
    grammar = args.grammar_file or args.grammar
    schema = args.json_schema_file or args.json_schema
    if grammar is not None and schema is not None:
        raise QwenliteError("give --grammar or --json-schema, not both")
    if grammar is not None:
        return model.grammar(grammar=_text_or_file(grammar, "grammar"))
    if schema is not None:
        text = _text_or_file(schema, "JSON schema")
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise QwenliteError(f"the JSON schema is not valid JSON: {exc}") from None
        return model.grammar(json_schema=parsed)
    return None


def cmd_run(args: argparse.Namespace) -> int:
    """Raw completion. The prompt is taken verbatim and special tokens in it are parsed (as llama.cpp's
    ``-p`` does), so a hand-written ChatML prompt works; use ``chat`` for untrusted user text."""
    prompt = _read_prompt(args)
    model = _load(args)
    ids = model.tokenize(prompt, special=True)
    t0 = time.perf_counter()
    gen = model.generate(ids, args.n_predict, stream=True, stop=args.stop, sampling=_sampling(args),
                         grammar=_grammar(args, model))
    _emit(gen)
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    if args.verbose:
        dt = time.perf_counter() - t0
        print(f"{len(ids)} prompt tokens, {len(gen.tokens)} generated in {dt:.2f} s "
              f"({gen.finish_reason})", file=sys.stderr)
    return 0


def _read_line(interactive: bool) -> str | None:
    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None


def cmd_chat(args: argparse.Namespace) -> int:
    from qwenlite.chat.session import ChatSession

    model = _load(args)
    session = ChatSession.from_model(model, system=args.system, sampler=_sampler(args),
                                     max_tokens=args.n_predict, stop_strings=args.stop, grammar=_grammar(args, model))
    if args.prompt is not None:
        _emit(session.send(args.prompt))
        sys.stdout.write("\n")
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model; /exit or Ctrl-D ends, /reset starts over", file=sys.stderr)
    while (line := _read_line(interactive)) is not None:
        text = line.strip()
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.reset()
            continue
        if not text:
            continue
        try:
            _emit(session.send(line))
        except QwenliteError as exc:  # one bad turn (too long) should not end the conversation
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def _fmt_value(value: Any) -> str:
    if isinstance(value, list | tuple) or (hasattr(value, "shape") and getattr(value, "ndim", 0) > 0):
        n = len(value)
        kind = type(value[0]).__name__ if n else "?"
        if hasattr(value, "dtype"):
            kind = str(value.dtype)
        return f"[{n} x {kind}]"
    text = str(value)
    if "\n" in text or len(text) > 80:
        return f"<{len(text)} chars>"
    return text


def cmd_info(args: argparse.Namespace) -> int:
    from qwenlite.gguf.reader import GGUFFile
    from qwenlite.model.config import ModelConfig

    path = hub.resolve_model(args.model)
    out: list[str] = []
    size = path.stat().st_size
    with GGUFFile(path) as f:
        out.append(f"file: {path}")
        out.append(f"size: {size:,} bytes ({size / 2**20:.1f} MiB)")
        out.append(f"metadata ({len(f.metadata)} keys):")
        out.extend(f"  {key} = {_fmt_value(value)}" for key, value in f.metadata.items())
        out.append("hyperparameters:")
        try:
            cfg = ModelConfig.from_gguf(f)
            out.extend(f"  {k} = {v}" for k, v in vars(cfg).items())
        except GGUFError as exc:
            out.append(f"  unavailable: {_one_line(exc)}")
        tensors = list(f.tensors.values())
        n_params = sum(t.n_values for t in tensors)
        out.append(f"tensors: {len(tensors)}, {n_params:,} parameters, "
                   f"{sum(t.nbytes for t in tensors) / 2**20:.1f} MiB of data")
        counts: dict[str, list[int]] = {}
        for t in tensors:
            c = counts.setdefault(t.qtype.name, [0, 0, 0])
            c[0] += 1
            c[1] += t.n_values
            c[2] += t.nbytes
        out.append("types:")
        for name, (n, vals, nbytes) in sorted(counts.items(), key=lambda kv: -kv[1][2]):
            bpw = 8 * nbytes / vals if vals else 0.0
            out.append(f"  {name:<6} {n:5d} tensors {nbytes / 2**20:9.1f} MiB {bpw:6.2f} bits/weight")
        width = max((len(t.name) for t in tensors), default=4)
        out.append("tensor table:")
        out.append(f"  {'name':<{width}}  {'type':<6}  {'shape':<20}  bytes")
        for t in tensors:
            shape = "x".join(str(d) for d in t.shape)
            out.append(f"  {t.name:<{width}}  {t.qtype.name:<6}  {shape:<20}  {t.nbytes:,}")
    sys.stdout.write("\n".join(out) + "\n")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    if args.list:
        default, entries = hub.load_manifest()
        for e in entries.values():
            mark = "*" if e.name == default else " "
            have = "cached" if (hub.models_dir() / e.file).is_file() else ""
            print(f"{mark} {e.name:<40} {e.size / 1e6:7.0f} MB  {e.license:<11} {have}")
            print(f"    {e.description}")
        return 0
    path = hub.pull(args.name, progress=True)
    print(path)
    return 0


def cmd_warmup(args: argparse.Namespace) -> int:
    """Compile (or load from Numba's disk cache) every kernel the model runs, so that the first
    ``run``/``chat`` starts in about two seconds instead of waiting for the compiler."""
    start = time.perf_counter()
    model = _load(args)
    loaded = time.perf_counter()
    model.warmup()
    done = time.perf_counter()
    print(f"warm: load {loaded - start:.1f} s, kernels {done - loaded:.1f} s", file=sys.stderr)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from qwenlite.bench import bench

    path = hub.resolve_model(args.model)
    args.model = str(path)
    batch = _batch_sizes(args.batch)
    model = _load(args, n_seq=max(batch, default=1))

    def report(kind: str, rep: int, tps: float) -> None:
        if not args.json:
            print(f"{kind}{args.n_prompt if kind == 'pp' else args.n_gen} rep {rep + 1}: {tps:.2f} tok/s",
                  file=sys.stderr)

    batch = _batch_sizes(args.batch)
    res = bench(model.engine, args.n_prompt, args.n_gen, args.reps, on_rep=report) if not batch else {}
    if batch:
        from qwenlite.bench import bench_batch

        def report_batch(n_seq: int, rep: int, tps: float) -> None:
            if not args.json:
                print(f"batch {n_seq} tg{args.n_gen} rep {rep + 1}: {tps:.2f} tok/s", file=sys.stderr)

        res["batch"] = bench_batch(model.runtime, batch, args.n_gen, args.reps, on_rep=report_batch)
    import numba

    result = {"model": path.name, "path": str(path), "size_bytes": path.stat().st_size,
              "n_threads": args.threads or numba.get_num_threads(), "kv_type": model.kv_type, **res}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for kind, n in (("pp", args.n_prompt), ("tg", args.n_gen)):
            if f"{kind}_tps" in result:
                print(f"{path.name}  {kind}{n}  {result[f'{kind}_tps']:8.2f} ± {result[f'{kind}_std']:.2f} tok/s"
                      f"  (t={result['n_threads']}, r={args.reps})")
        for row in result.get("batch", []):
            print(f"{path.name}  batch {row['n_seq']}  tg{args.n_gen}  {row['tg_tps']:8.2f} ± {row['tg_std']:.2f} "
                  f"tok/s aggregate  (t={result['n_threads']}, r={args.reps})")
    return 0


def _batch_sizes(text: str | None) -> list[int]:
    if text is None:
        return []
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise QwenliteError(f"--batch takes sequence counts like 1,2,4,8, got {text!r}") from None
    if not sizes or min(sizes) < 1 or max(sizes) > 256:
        raise QwenliteError(f"--batch sizes must be 1..256, got {text!r}")
    return sizes


def cmd_serve(args: argparse.Namespace) -> int:
    """The OpenAI-compatible server; the model loads and compiles before the port opens."""
    from qwenlite.server import _require, serve

    _require()  # before the model loads: a missing extra is a one-line error, not a minute's wait
    if args.threads is not None and args.threads < 1:
        raise QwenliteError(f"-t/--threads must be >= 1, got {args.threads}")
    if args.ctx_size is not None and args.ctx_size < 1:
        raise QwenliteError(f"-c/--ctx-size must be >= 1, got {args.ctx_size}")
    if args.batch_size is not None and args.batch_size < 1:
        raise QwenliteError(f"-b/--batch-size must be >= 1, got {args.batch_size}")
    serve(hub.resolve_model(args.model), host=args.host, port=args.port, parallel=args.parallel,
          n_ctx=args.ctx_size, threads=args.threads, kv_type=_kv_type(args), api_key=args.api_key,
          queue=args.queue, cors_origin=args.cors_origin, max_body=args.max_body, n_batch=args.batch_size,
          alias=args.alias, log_level=args.log_level)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        from qwenlite.converters.hf_to_gguf import convert
    except ImportError as exc:
        raise QwenliteError(f"the HF converter is not available: {exc}") from exc
    convert(args.hf_dir, args.output, args.type, progress=True)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    try:
        from qwenlite.converters.requantize import requantize
    except ImportError as exc:
        raise QwenliteError(f"the re-quantizer is not available: {exc}") from exc
    requantize(args.input, args.output, args.type, progress=True)
    return 0


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file or known model name (default: the manifest's default, pulled on first use)")
    p.add_argument("-t", "--threads", type=int, default=None, help="worker threads (default: all cores)")
    p.add_argument("-c", "--ctx-size", type=int, default=None,
                   help="context size in tokens per sequence (default: the loader's, at most the trained context)")
    p.add_argument("--kv-type", default=None, metavar="T",
                   help="KV cache type: f16 (default), f32, q8_0; -ctk/-ctv (llama.cpp's spelling) too")
    p.add_argument("-ctk", "--cache-type-k", default=None, help=argparse.SUPPRESS)
    p.add_argument("-ctv", "--cache-type-v", default=None, help=argparse.SUPPRESS)


def _add_sampling(p: argparse.ArgumentParser, n_default: int, temp_default: float) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=n_default, help="max tokens to generate")
    p.add_argument("--temp", type=float, default=temp_default, help="temperature; 0 = greedy")
    p.add_argument("--seed", type=int, default=None, help="random seed (reproducible sampling)")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus mass; 1 = off")
    p.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min-p x the best; 0 = off")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="llama.cpp repetition penalty; 1 = off")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the penalty looks back over")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--grammar", default=None, metavar="GRAMMAR",
                   help="constrain the output to a GBNF (llama.cpp) or Lark grammar: the text, or a file")
    p.add_argument("--grammar-file", default=None, metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("-j", "--json-schema", default=None, metavar="SCHEMA",
                   help="constrain the output to JSON valid for this schema: the JSON text, or a file")
    p.add_argument("-jf", "--json-schema-file", default=None, metavar="FILE", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenlite", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="raw text completion; stdout carries only the generated text")
    _add_model(p)
    p.add_argument("-p", "--prompt", default=None, help="prompt text")
    p.add_argument("-f", "--file", default=None, help="read the prompt from a UTF-8 file")
    p.add_argument("-v", "--verbose", action="store_true", help="token counts and time on stderr")
    _add_sampling(p, 128, 0.8)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive streaming chat (ChatML), or one reply with --prompt")
    _add_model(p)
    p.add_argument("-s", "--system", default=None, help="system prompt (default: the template's own)")
    p.add_argument("--prompt", default=None, help="send this one message, print the reply and exit")
    _add_sampling(p, 512, 0.7)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="metadata, hyperparameters and tensor table of a GGUF file")
    p.add_argument("model", nargs="?", default=None, help="GGUF file or known model name")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("pull", help=f"download a known model into {hub.models_dir()} ($QWENLITE_HOME)")
    p.add_argument("name", nargs="?", default=None, help="model name (default: the default model)")
    p.add_argument("--list", action="store_true", help="list the known models")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("warmup", help="compile and cache the kernels a model needs (the first run then starts fast)")
    _add_model(p)
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("bench", help="prompt-processing and generation throughput")
    _add_model(p)
    p.add_argument("-p", "--n-prompt", type=int, default=128, help="prompt tokens (pp test)")
    p.add_argument("-n", "--n-gen", type=int, default=64, help="generated tokens (tg test)")
    p.add_argument("-r", "--reps", type=int, default=3, help="repetitions")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--batch", default=None, metavar="B,B,...",
                   help="aggregate decode tok/s of B sequences decoding together, e.g. 1,2,4,8 (key 'batch')")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching and a chat page")
    _add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
    p.add_argument("-np", "--parallel", type=int, default=4, help="sequence slots decoded together (default 4)")
    p.add_argument("--api-key", default=os.environ.get("QWENLITE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $QWENLITE_API_KEY, else none)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait for a slot; more get 503")
    p.add_argument("--cors-origin", default=None, metavar="ORIGIN", help="allow this browser origin (CORS off)")
    p.add_argument("--max-body", type=int, default=4 << 20, metavar="BYTES", help="request body limit (413)")
    p.add_argument("-b", "--batch-size", type=int, default=None, help="tokens per forward pass (default 256)")
    p.add_argument("-a", "--alias", default=None, help="model name in the API (default: the file's stem)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (info logs each request)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="Hugging Face checkpoint directory -> GGUF")
    p.add_argument("hf_dir", help="directory with config.json and *.safetensors")
    p.add_argument("-o", "--output", required=True, help="output GGUF path")
    p.add_argument("--type", default="f16", help="output type, e.g. f32, f16, q8_0, q4_k_m")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="re-quantize a GGUF file")
    p.add_argument("input", help="input GGUF")
    p.add_argument("output", help="output GGUF")
    p.add_argument("--type", default="q4_k_m", help="target type, e.g. q8_0, q4_k_m, q5_k_m")
    p.set_defaults(func=cmd_quantize)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qwenlite`` console script; returns the exit status."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QwenliteError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`); there is nobody left to tell.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
