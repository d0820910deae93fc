"""The ``qwenlite`` command line: run / embed / classify / chat / serve / info / show / list / rm / pull /
warmup / bench / convert / quantize.

Conventions every subcommand keeps: stdout carries only the product (generated text, JSON, the info
report); status goes to stderr. Any ``QwenliteError`` becomes one ``error: ...`` line on stderr and exit
status 1, never a traceback; Ctrl-C exits with 130 quietly. ``-m`` takes a file path or a known model
name (see ``qwenlite pull --list``) and defaults to the default model, pulled on first use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from qwenlite import __version__, hub
from qwenlite.chat.sampler import Sampler, SamplerConfig
from qwenlite.errors import GGUFError, QwenliteError, QwenliteWarning
from qwenlite.runtime import heads

# ``run``'s -n default, the same as ``Model.generate``'s max_tokens; ``chat`` runs to the end of the turn.
DEFAULT_MAX_TOKENS = 256


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default."""


def _load(args: argparse.Namespace, **extra: Any) -> Any:
    if args.threads is not None and args.threads < 1:
        raise QwenliteError(f"-t/--threads must be >= 1, got {args.threads}")
    if args.ctx_size is not None and args.ctx_size < 1:
        raise QwenliteError(f"-c/--ctx-size must be >= 1, got {args.ctx_size}")
    kv = _kv_type(args)
    path = hub.resolve_model(args.model)
    from qwenlite.api import load  # imported lazily: `pull` and `--help` should not compile kernels

    model = load(path, n_threads=args.threads, n_ctx=args.ctx_size, kv_type=kv, **extra)
    if args.threads is not None and model.n_threads < args.threads:
        print(f"warning: -t {args.threads} is more than the {model.n_threads} cores available; "
              f"using {model.n_threads} threads", file=sys.stderr)
    return model


def _kv_type(args: argparse.Namespace) -> str | None:
    """The KV cache type from --kv-type or llama.cpp's -ctk/-ctv (one type serves K and V)."""
    given = {name: getattr(args, name) for name in ("kv_type", "cache_type_k", "cache_type_v")
             if getattr(args, name, None) is not None}
    if len({v.lower() for v in given.values()}) > 1:
        raise QwenliteError("qwenlite keeps K and V in one type: give the same --kv-type / -ctk / -ctv, got "
                            + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in given.items()))
    return next(iter(given.values()), None)


def _sampling(args: argparse.Namespace) -> SamplerConfig:
    """The sampling flags, checked before the model loads (a bad flag should not cost a load)."""
    if args.n_predict < -1:
        raise QwenliteError(f"-n/--n-predict must be >= -1 (-1 = until the end), got {args.n_predict}")
    return SamplerConfig(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                         repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                         presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                         seed=None if args.seed < 0 else args.seed)


def _for_model(cfg: SamplerConfig, args: argparse.Namespace, model: Any) -> SamplerConfig:
    """``--ignore-eos`` needs the model's end-of-turn ids: they are banned through the logit bias."""
    if not args.ignore_eos:
        return cfg
    from qwenlite.chat.generate import default_stop_ids

    ban = tuple((t, float("-inf")) for t in sorted(default_stop_ids(model.tokenizer)))
    return dataclasses.replace(cfg, logit_bias=cfg.logit_bias + ban)


def _max_tokens(args: argparse.Namespace, model: Any) -> int:
    return model.n_ctx if args.n_predict < 0 else args.n_predict


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "0": "\0", "a": "\a",
            "b": "\b", "f": "\f", "v": "\v"}


def _unescape(text: str) -> str:
    """llama.cpp's ``-e``: backslash escapes in a prompt become the characters they name."""
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), text)


def _emit(pieces: Iterable[str]) -> None:
    from qwenlite.repl import CompileNotice

    notice = CompileNotice()
    try:
        for piece in pieces:
            notice.done()
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        notice.done()


def _read_prompt(args: argparse.Namespace) -> str:
    """The prompt of ``-p``, of ``-f FILE`` (``-f -``: stdin), or of a piped stdin."""
    if args.file is not None:
        if args.prompt is not None:
            raise QwenliteError("give the prompt with -p or -f, not both")
        try:
            raw = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        except OSError as exc:
            raise QwenliteError(f"cannot read prompt file {args.file}: {exc.strerror or exc}") from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise QwenliteError(f"prompt file {args.file} is not valid UTF-8 (bad byte at offset {exc.start})") from exc
    elif args.prompt is not None:
        text = args.prompt
    elif not sys.stdin.isatty():
        try:
            text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise QwenliteError(f"the piped prompt is not valid UTF-8 (bad byte at offset {exc.start})") from exc
    else:
        raise QwenliteError("no prompt: give one with -p TEXT, -f FILE or on stdin")
    return _unescape(text) if args.escape else text


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
        except (ValueError, RecursionError) as exc:
            raise QwenliteError(f"the JSON schema is not valid JSON: {str(exc)[:200]}") from None
        return model.grammar(json_schema=parsed)
    return None


def cmd_run(args: argparse.Namespace) -> int:
    """Raw completion. The prompt is taken verbatim and special tokens in it are parsed (as llama.cpp's
    ``-p`` does), so a hand-written ChatML prompt works; use ``chat`` for untrusted user text."""
    cfg = _sampling(args)
    prompt = _read_prompt(args)
    model = _load(args)
    sampling = _for_model(cfg, args, model)
    ids = model.tokenize(prompt, special=True)
    t0 = time.perf_counter()
    gen = model.generate(ids, _max_tokens(args, model), stream=True, stop=args.stop, sampling=sampling,
                         grammar=_grammar(args, model))
    from qwenlite.repl import COLOR_REPLY, COLOR_RESET, COLOR_USER

    color = args.color and sys.stdout.isatty()
    if color:
        sys.stdout.write(f"{COLOR_USER}{prompt}{COLOR_REPLY}")
    try:
        _emit(gen)
    finally:
        if color:
            sys.stdout.write(COLOR_RESET)
    if sys.stdout.isatty():
        sys.stdout.write("\n")
    if args.verbose:
        dt = time.perf_counter() - t0
        seed = gen.generation.sampler.seed if gen.generation else None
        print(f"{len(ids)} prompt tokens, {len(gen.tokens)} generated in {dt:.2f} s "
              f"({gen.finish_reason}); seed {seed}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from qwenlite.chat.session import ChatSession
    from qwenlite.repl import Repl

    cfg = _sampling(args)
    system = _unescape(args.system) if args.escape and args.system else args.system
    model = _load(args)
    sampler = Sampler(_for_model(cfg, args, model))
    if args.verbose:
        print(f"seed {sampler.seed}", file=sys.stderr)
    session = ChatSession.from_model(model, system=system, sampler=sampler, max_tokens=_max_tokens(args, model),
                                     stop_strings=args.stop, grammar=_grammar(args, model))
    if args.prompt is not None:
        _emit(session.send(_unescape(args.prompt) if args.escape else args.prompt))
        sys.stdout.write("\n")
        return 0
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    return Repl(session, interactive=interactive, color=args.color).run()


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


def _jsonable(value: Any) -> Any:
    """A metadata value for ``info --json``: long arrays are summarized (a vocabulary is 150k strings)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, list | tuple):
        if len(value) > 64:
            return {"array_of": type(value[0]).__name__ if value else "?", "length": len(value)}
        return [_jsonable(v) for v in value]
    return value


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}".replace(".0" + unit, unit)
    return str(int(n))


def _summary(path: Path) -> dict[str, Any]:
    """``show``'s facts about a GGUF file: what ollama's ``show`` tells, from the file alone."""
    from qwenlite.gguf import names as gn
    from qwenlite.gguf.constants import LlamaFileType
    from qwenlite.gguf.reader import GGUFFile
    from qwenlite.model.config import ModelConfig

    with GGUFFile(path) as f:
        md = f.metadata
        cfg = ModelConfig.from_gguf(f)
        n_params = sum(t.n_values for t in f.tensors.values())
        ftype = md.get(gn.FILE_TYPE)
        try:
            quant = LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else None
        except ValueError:
            quant = f"file type {ftype}"
        template = md.get(gn.CHAT_TEMPLATE)
        entry = next((e for e in hub.load_manifest()[1].values() if e.file == path.name), None)
        license_ = md.get("general.license") or (entry.license if entry else None)
        return {"name": entry.name if entry else path.stem, "file": str(path), "size_bytes": path.stat().st_size,
                "architecture": md.get(gn.ARCHITECTURE), "size_label": md.get("general.size_label"),
                "parameters": n_params,
                "parameters_human": _human(n_params), "quantization": quant,
                "context_length": cfg.n_ctx_train, "embedding_length": cfg.n_embd, "layers": cfg.n_layer,
                "heads": cfg.n_head, "kv_heads": cfg.n_head_kv,
                "task": cfg.task, "labels": list(cfg.labels),
                "chat_template": isinstance(template, str) and bool(template.strip()),
                "tools_in_template": isinstance(template, str) and "tools" in template,
                "license": license_}


def cmd_show(args: argparse.Namespace) -> int:
    info = _summary(hub.resolve_model(args.model))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    params = info["parameters_human"] + (f" (a {info['size_label']} model)" if info["size_label"] else "")
    rows = [("architecture", info["architecture"]), ("parameters", params),
            ("quantization", info["quantization"]), ("context length", info["context_length"]),
            ("embedding length", info["embedding_length"]), ("layers", info["layers"]),
            ("heads (kv)", f"{info['heads']} ({info['kv_heads']})"),
            *([("task", f"{info['task']}: {', '.join(info['labels'])}")] if info["labels"] else []),
            ("chat template", ("yes, with tools" if info["tools_in_template"] else "yes")
             if info["chat_template"] else "no (ChatML is used)"),
            ("license", info["license"] or "unknown"), ("file", info["file"]),
            ("size", f"{info['size_bytes'] / 1e6:.0f} MB")]
    print(f"  {info['name']}")
    for k, v in rows:
        print(f"    {k:<18}{v}")
    return 0


def _cached_models() -> list[tuple[str, Path]]:
    """(name, path) of every GGUF in the cache: a known model's name, or the file's stem."""
    d = hub.models_dir()
    if not d.is_dir():
        return []
    known = {e.file: e.name for e in hub.load_manifest()[1].values()}
    return sorted((known.get(p.name, p.stem), p) for p in d.glob("*.gguf") if p.is_file())


def cmd_list(args: argparse.Namespace) -> int:
    models = _cached_models()
    if args.json:
        print(json.dumps([{"name": n, "file": str(p), "size_bytes": p.stat().st_size,
                           "modified": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(p.stat().st_mtime))}
                          for n, p in models], indent=2))
        return 0
    if not models:
        print(f"no models in {hub.models_dir()} (qwenlite pull NAME fetches one; pull --list shows them)",
              file=sys.stderr)
        return 0
    width = max(len(n) for n, _ in models)
    print(f"{'NAME':<{width}}  {'SIZE':>8}  MODIFIED")
    for name, path in models:
        st = path.stat()
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(st.st_mtime))
        print(f"{name:<{width}}  {st.st_size / 1e6:6.0f} MB  {when}")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    for name in args.models:
        hits = [p for n, p in _cached_models() if name in (n, p.name, p.stem)]
        if not hits:
            raise QwenliteError(f"no model {name!r} in {hub.models_dir()} (qwenlite list shows what is there)")
        for p in hits:
            p.unlink()
            print(f"deleted {p.name}", file=sys.stderr)
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Embeddings of ``-p TEXT`` or of each non-empty line of ``-f FILE``: one line of floats per text,
    or with ``--json`` OpenAI's ``{"object": "list", "data": [{"embedding": ...}]}``."""
    if args.file is not None:
        texts = [line for line in _read_prompt(args).splitlines() if line.strip()]
    else:
        texts = [_read_prompt(args)]
    if not texts:
        raise QwenliteError(f"{args.file}: no text to embed")
    model = _load(args)
    vectors = model.embed(texts, pooling=args.pooling, normalize=not args.no_normalize)
    if args.json:
        data = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
        print(json.dumps({"object": "list", "data": data, "model": model.path.stem}))
    else:
        for v in vectors:
            print(" ".join(f"{x:.6g}" for x in np.asarray(v).ravel()))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """The task head of a classifier or question-answering model (docs/task-heads.md), by the file's task:
    sequence classification prints each text's top label and its probability (a softmax of the
    logits), one line a text of ``-p TEXT`` or of each non-empty line of ``-f FILE``; token
    classification prints one ``token<TAB>label<TAB>probability`` line a token; question answering takes
    ``--question`` and prints the answer found in the context (``-p``, or the whole of ``-f``).
    ``--json`` prints every score."""
    model = _load(args)
    task = model.task
    if task == "causal-lm":
        raise QwenliteError(f"{model.path.name} is a causal LM with no task head; classify runs models converted "
                            "from Qwen2ForSequenceClassification, ...ForTokenClassification or ...ForQuestionAnswering")
    if (args.question is not None) != (task == "question-answering"):
        raise QwenliteError("--question is for question-answering models; this one is a " + task + " model"
                            if args.question is not None else "this is a question-answering model: give --question")
    text = _read_prompt(args)
    labels = list(model.labels)
    if task == "question-answering":
        found = model.answer(args.question, text)
        print(json.dumps(found, ensure_ascii=False) if args.json else found["answer"])
        return 0
    if task == "token-classification":
        ids = model.tokenize(text)
        probs = heads.softmax(model.classify_tokens(ids))
        pieces = [model.detokenize([t]) for t in ids]
        if args.json:
            rows = [{"token": piece, "id": t, "label": labels[int(p.argmax())], "probabilities": p.tolist()}
                    for piece, t, p in zip(pieces, ids, probs)]
            print(json.dumps({"labels": labels, "tokens": rows}, ensure_ascii=False))
        else:
            for piece, p in zip(pieces, probs):
                print(f"{piece!r}\t{labels[int(p.argmax())]}\t{p.max():.4f}")
        return 0
    texts = [line for line in text.splitlines() if line.strip()] if args.file is not None else [text]
    if not texts:
        raise QwenliteError(f"{args.file}: no text to classify")
    logits = model.classify(texts)
    probs = heads.softmax(logits)
    if args.json:
        data = [{"index": i, "label": labels[int(p.argmax())], "logits": lg.tolist(), "probabilities": p.tolist()}
                for i, (lg, p) in enumerate(zip(logits, probs))]
        print(json.dumps({"labels": labels, "data": data}, ensure_ascii=False))
    else:
        for p in probs:
            print(f"{labels[int(p.argmax())]}\t{p.max():.4f}")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    """llama-perplexity's run (``Model.perplexity``): the running estimate after each chunk on stderr
    (``[1]14.5844,[2]10.9425,...``), then on stdout the final statistics; the last line reads
    ``PPL = X +/- Y``. ``--kl-divergence-base FILE`` saves the log-probabilities; with
    ``--kl-divergence`` that file is read and llama-perplexity's KL-divergence statistics printed."""
    if args.ctx_size is None or args.ctx_size < 4:
        raise QwenliteError(f"-c/--ctx-size must be >= 4, got {args.ctx_size}")
    if args.batch_size < 1:
        raise QwenliteError(f"-b/--batch-size must be >= 1, got {args.batch_size}")
    if args.kl_divergence and args.kl_divergence_base is None:
        raise QwenliteError("--kl-divergence needs --kl-divergence-base FILE (the base model's saved "
                            "log-probabilities)")
    n_ctx = args.ctx_size
    if args.kl_divergence:
        from qwenlite.quality.perplexity import read_base_header

        n_ctx = read_base_header(args.kl_divergence_base)[0]
        text = None
    else:
        if args.file is None:
            raise QwenliteError("give the text with -f FILE (- = stdin)")
        text = _read_prompt(args)
    args.ctx_size = n_ctx
    model = _load(args, n_seq=max(1, args.batch_size // n_ctx))

    def progress(i: int, ppl: float, kld: float | None) -> None:
        extra = f" KLD {kld:.6f}" if kld is not None else ""
        print(f"[{i}]{ppl:.4f}{extra},", end="\n" if kld is not None else "", file=sys.stderr, flush=True)

    r = model.perplexity(text, n_ctx, args.chunks, kl_divergence_base=args.kl_divergence_base,
                         kl_divergence=args.kl_divergence, progress=progress)
    print(file=sys.stderr)
    print(f"perplexity: {r.n_chunks} chunks of {r.n_ctx} tokens, {r.count} scored, {r.tokens_per_second:.1f} tok/s")
    if r.kld is not None:
        k = r.kld
        print("====== Perplexity statistics ======")
        print(f"Mean PPL(Q)                   : {k['ppl']:10.6f} ± {k['ppl_err']:10.6f}")
        print(f"Mean PPL(base)                : {k['ppl_base']:10.6f} ± {k['ppl_base_err']:10.6f}")
        print(f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * k['ppl_cor']:6.2f}%")
        print(f"Mean ln(PPL(Q)/PPL(base))     : {k['ln_ppl_ratio']:10.6f} ± {k['ln_ppl_ratio_err']:10.6f}")
        print(f"Mean PPL(Q)/PPL(base)         : {k['ppl_ratio']:10.6f} ± {k['ppl_ratio_err']:10.6f}")
        print(f"Mean PPL(Q)-PPL(base)         : {k['ppl_diff']:10.6f} ± {k['ppl_diff_err']:10.6f}")
        print("====== KL divergence statistics ======")
        print(f"Mean    KLD: {k['kld']:10.6f} ± {k['kld_err']:10.6f}")
        print(f"Maximum KLD: {k['kld_max']:10.6f}")
        for q in (99.9, 99.0, 95.0, 90.0):
            print(f"{q:4.1f}%   KLD: {k[f'kld_p{q:g}']:10.6f}")
        print(f"Median  KLD: {k['kld_median']:10.6f}")
        for q in (10.0, 5.0, 1.0, 0.1):
            print(f"{q:4.1f}%   KLD: {k[f'kld_p{q:g}']:10.6f}")
        print(f"Minimum KLD: {k['kld_min']:10.6f}")
        print("====== Token probability statistics ======")
        print(f"Mean    Δp: {100 * k['p_diff']:6.3f} ± {100 * k['p_diff_err']:5.3f} %")
        print(f"Maximum Δp: {100 * k['p_diff_max']:6.3f}%")
        for q in (99.9, 99.0, 95.0, 90.0, 75.0):
            print(f"{q:4.1f}%   Δp: {100 * k[f'p_diff_p{q:g}']:6.3f}%")
        print(f"Median  Δp: {100 * k['p_diff_median']:6.3f}%")
        for q in (25.0, 10.0, 5.0, 1.0, 0.1):
            print(f"{q:4.1f}%   Δp: {100 * k[f'p_diff_p{q:g}']:6.3f}%")
        print(f"Minimum Δp: {100 * k['p_diff_min']:6.3f}%")
        print(f"RMS Δp    : {100 * k['p_diff_rms']:6.3f} ± {100 * k['p_diff_rms_err']:5.3f} %")
        print(f"Same top p: {100 * k['same_top']:6.3f} ± {100 * k['same_top_err']:5.3f} %")
    elif args.kl_divergence_base is not None:
        print(f"saved the log-probabilities to {args.kl_divergence_base}")
    print(f"PPL = {r.ppl:.4f} +/- {r.ppl_err:.5f}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from qwenlite.gguf.reader import GGUFFile
    from qwenlite.model.config import ModelConfig

    path = hub.resolve_model(args.model)
    if args.json:
        with GGUFFile(path) as f:
            try:
                hp: Any = vars(ModelConfig.from_gguf(f))
            except GGUFError as exc:
                hp = {"unavailable": _one_line(exc)}
            doc = {"file": str(path), "size_bytes": path.stat().st_size,
                   "metadata": {k: _jsonable(v) for k, v in f.metadata.items()},
                   "hyperparameters": {k: _jsonable(v) for k, v in hp.items()},
                   "tensors": [{"name": t.name, "type": t.qtype.name, "shape": list(t.shape), "bytes": t.nbytes}
                               for t in f.tensors.values()]}
        print(json.dumps(doc, indent=2, default=str))
        return 0
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
    convert(args.hf_dir, args.output, args.type, progress=True, parents=args.mkdir,
            allow_nonfinite=args.allow_nonfinite)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    try:
        from qwenlite.converters.requantize import requantize
    except ImportError as exc:
        raise QwenliteError(f"the re-quantizer is not available: {exc}") from exc
    requantize(args.input, args.output, args.type, progress=True, parents=args.mkdir,
               allow_nonfinite=args.allow_nonfinite)
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


def _add_sampling(p: argparse.ArgumentParser, n_default: int) -> None:
    """Generation flags, spelled as llama.cpp spells them; the defaults are ``SamplerConfig``'s, the
    same the Python API and the server use."""
    d = SamplerConfig()
    p.add_argument("-n", "--n-predict", type=int, default=n_default,
                   help="max tokens to generate; -1 = until the end of the turn or of the context")
    p.add_argument("--temp", "--temperature", dest="temp", type=float, default=d.temperature,
                   help="temperature; 0 = greedy")
    p.add_argument("-s", "--seed", type=int, default=-1, help="random seed; -1 = random (printed with -v)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus mass; 1 = off")
    p.add_argument("--min-p", type=float, default=d.min_p, help="drop tokens below min-p x the best; 0 = off")
    p.add_argument("--repeat-penalty", type=float, default=d.repeat_penalty,
                   help="llama.cpp repetition penalty; 1 = off")
    p.add_argument("--repeat-last-n", type=int, default=d.repeat_last_n, help="tokens the penalties look back over")
    p.add_argument("--presence-penalty", type=float, default=d.presence_penalty, help="OpenAI's presence penalty")
    p.add_argument("--frequency-penalty", type=float, default=d.frequency_penalty,
                   help="OpenAI's frequency penalty")
    p.add_argument("--ignore-eos", action="store_true", help="never stop at an end-of-turn token")
    p.add_argument("-r", "--reverse-prompt", "--stop", dest="stop", action="append", default=[],
                   help="stop string (repeatable)")
    p.add_argument("-e", "--escape", action="store_true",
                   help=r"process escapes (\n, \t, \\, \', \") in the prompt and system prompt")
    p.add_argument("--color", action="store_true", help="on a terminal, show the prompt and reply in colour")
    p.add_argument("-v", "--verbose", action="store_true", help="seed, token counts and time on stderr")
    p.add_argument("--grammar", default=None, metavar="GRAMMAR",
                   help="constrain the output to a GBNF (llama.cpp) or Lark grammar: the text, or a file")
    p.add_argument("--grammar-file", default=None, metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument("-j", "--json-schema", default=None, metavar="SCHEMA",
                   help="constrain the output to JSON valid for this schema: the JSON text, or a file")
    p.add_argument("-jf", "--json-schema-file", default=None, metavar="FILE", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qwenlite", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"qwenlite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="raw text completion; stdout carries only the generated text",
                       formatter_class=_Help)
    _add_model(p)
    p.add_argument("-p", "--prompt", default=None, help="prompt text (else -f, else a piped stdin)")
    p.add_argument("-f", "--file", default=None, help="read the prompt from a UTF-8 file; - = stdin")
    _add_sampling(p, DEFAULT_MAX_TOKENS)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("embed", help="embeddings of a text (-p) or of each line of a file (-f)",
                       formatter_class=_Help)
    _add_model(p)
    p.add_argument("-p", "--prompt", default=None, help="the text")
    p.add_argument("-f", "--file", default=None, help="a UTF-8 file, one text a line; - = stdin")
    p.add_argument("--pooling", default=None, choices=["mean", "last", "cls", "none"],
                   help="how token states become one vector (default: the file's pooling_type, else mean)")
    p.add_argument("--no-normalize", action="store_true", help="do not scale to unit length")
    p.add_argument("--json", action="store_true", help="OpenAI's embeddings list as JSON")
    p.set_defaults(func=cmd_embed, escape=False)

    p = sub.add_parser("classify", help="a task model's head: labels of texts or tokens, or an answer",
                       formatter_class=_Help)
    _add_model(p)
    p.add_argument("-p", "--prompt", default=None, help="the text (question answering: the context)")
    p.add_argument("-f", "--file", default=None,
                   help="a UTF-8 file, one text a line (question answering: the whole context); - = stdin")
    p.add_argument("-q", "--question", default=None, help="the question (question-answering models)")
    p.add_argument("--json", action="store_true", help="every label's logit and probability as JSON")
    p.set_defaults(func=cmd_classify, escape=False)

    p = sub.add_parser("perplexity", help="perplexity and KL divergence of a text, as llama-perplexity computes them",
                       formatter_class=_Help)
    _add_model(p)
    p.set_defaults(ctx_size=512)
    p.add_argument("-f", "--file", default=None, help="the text, UTF-8 (- = stdin)")
    p.add_argument("-b", "--batch-size", type=int, default=2048,
                   help="tokens per forward pass: batch / ctx chunks are evaluated together (llama.cpp's rule)")
    p.add_argument("--chunks", type=int, default=None, help="at most this many chunks (default: all)")
    p.add_argument("--kl-divergence-base", default=None, metavar="FILE",
                   help="save the log-probabilities there (llama.cpp's format), or with --kl-divergence read them")
    p.add_argument("--kl-divergence", action="store_true",
                   help="compare with the --kl-divergence-base file (its tokens are scored; no -f)")
    p.set_defaults(func=cmd_perplexity, prompt=None, escape=False)

    p = sub.add_parser("chat", help="interactive streaming chat, or one reply with -p", formatter_class=_Help)
    _add_model(p)
    p.add_argument("-sys", "--system-prompt", "--system", dest="system", default=None,
                   help="system prompt (default: the template's own)")
    p.add_argument("-p", "--prompt", default=None, help="send this one message, print the reply and exit")
    _add_sampling(p, -1)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="metadata, hyperparameters and tensor table of a GGUF file")
    p.add_argument("model", nargs="?", default=None, help="GGUF file or known model name")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("show", help="a model's summary: architecture, parameters, quantization, context, license")
    p.add_argument("model", nargs="?", default=None, help="GGUF file or known model name")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("list", aliases=["ls"], help=f"the models in the cache ({hub.models_dir()})")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("rm", help="delete models from the cache")
    p.add_argument("models", nargs="+", help="model names (as qwenlite list shows them)")
    p.set_defaults(func=cmd_rm)

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
    _output_flags(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="re-quantize a GGUF file")
    p.add_argument("input", help="input GGUF")
    p.add_argument("output", help="output GGUF")
    p.add_argument("--type", default="q4_k_m", help="target type, e.g. q8_0, q4_k_m, q5_k_m")
    _output_flags(p)
    p.set_defaults(func=cmd_quantize)
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the usage block would bury it); subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mkdir", action="store_true", help="create the output's folder when it does not exist")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write weights that hold NaN or inf (with a warning) instead of refusing them")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every cleanup path (a writer's temp file) runs."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def _show_warning(message: Warning | str, category: type[Warning], *rest: Any, **kw: Any) -> None:
    """Our warnings as one ``warning: ...`` line on stderr; others as Python prints them."""
    if issubclass(category, QwenliteWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, *rest[:2]))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qwenlite`` console script; returns the exit status."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(encoding="utf-8", errors="replace")
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None  # `serve`: uvicorn's own
    try:
        return args.func(args)
    except QwenliteError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except _Terminated:
        return 143
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`); there is nobody left to tell.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
