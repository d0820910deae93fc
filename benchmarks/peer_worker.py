"""One llama.cpp request, run under the side interpreter `.peer/venv/bin/python`.

Usage: ``peer_worker.py REQUEST.json``. The request is a JSON object with an ``op`` and an ``out``
directory; the answer goes to ``out/result.json`` (arrays as ``.npy`` files listed under
``"arrays"``). Only this file imports ``llama_cpp``: the main test interpreter does not have it, and
one process per request keeps llama.cpp's state (and its stderr chatter) away from the caller.

Ops: ``tokenize``, ``greedy``, ``logits``, ``bench``, ``batched_bench``, ``embed_bench``, ``kv_memory``,
``quantize_model``.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np


def _load(model: str, n_ctx: int = 512, n_threads: int = 2, logits_all: bool = False,
          vocab_only: bool = False) -> llama_cpp.Llama:
    """A context big enough for the request; batch = context so a prompt is one decode call."""
    return llama_cpp.Llama(
        model_path=model,
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=min(n_ctx, 512),
        n_threads=n_threads,
        n_threads_batch=n_threads,
        logits_all=logits_all,
        vocab_only=vocab_only,
        verbose=False,
    )


def _ctx_for(n_tokens: int) -> int:
    """Smallest multiple of 256 (at least 512) holding ``n_tokens``."""
    return max(512, (n_tokens + 255) // 256 * 256)


def _last_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """Logits of the last decoded position (the only one computed when logits_all is off)."""
    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def op_tokenize(req: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp tokenization of each of ``texts`` without BOS; ``special`` parses control tokens."""
    llm = _load(req["model"], vocab_only=True)
    special = bool(req["special"])
    return {"ids": [llm.tokenize(t.encode("utf-8"), add_bos=False, special=special) for t in req["texts"]]}


def op_greedy(req: dict[str, Any]) -> dict[str, Any]:
    """Argmax decoding for exactly ``n`` tokens, ignoring EOS so callers can compare prefixes."""
    ids, n = list(req["ids"]), int(req["n"])
    llm = _load(req["model"], n_ctx=_ctx_for(len(ids) + n), n_threads=int(req.get("n_threads", 2)))
    llm.eval(ids)
    out: list[int] = []
    for i in range(n):
        tok = int(np.argmax(_last_logits(llm)))
        out.append(tok)
        if i + 1 < n:
            llm.eval([tok])
    return {"ids": out}


def op_logits(req: dict[str, Any]) -> dict[str, Any]:
    """Logits for every position of ``ids`` in one prompt evaluation."""
    ids = list(req["ids"])
    llm = _load(req["model"], n_ctx=_ctx_for(len(ids)), n_threads=int(req.get("n_threads", 2)),
                logits_all=True)
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    np.save(Path(req["out"]) / "logits.npy", logits)
    return {"arrays": {"logits": "logits.npy"}}


def op_bench(req: dict[str, Any]) -> dict[str, Any]:
    """llama-bench's definitions: pp = one decode of ``n_prompt`` tokens into an empty cache,
    tg = ``n_gen`` single-token decodes from an empty cache. One warm-up of each first, as
    llama-bench does, so page faults and thread start-up are not timed. Model load is not timed.
    """
    n_prompt, n_gen, reps = int(req["n_prompt"]), int(req["n_gen"]), int(req.get("reps", 1))
    llm = _load(req["model"], n_ctx=_ctx_for(max(n_prompt, n_gen)), n_threads=int(req["n_threads"]))
    rng = np.random.default_rng(1234)
    prompt = [int(t) for t in rng.integers(0, 32000, size=n_prompt)]
    pp: list[float] = []
    tg: list[float] = []

    def run_pp() -> float:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        llama_cpp.llama_synchronize(llm.ctx)
        return time.perf_counter() - t0

    def run_tg(n: int) -> float:
        llm.reset()
        t0 = time.perf_counter()
        for i in range(n):
            llm.eval([prompt[i % n_prompt]])
        llama_cpp.llama_synchronize(llm.ctx)
        return time.perf_counter() - t0

    run_pp()
    run_tg(1)
    for _ in range(reps):
        pp.append(n_prompt / run_pp())
        tg.append(n_gen / run_tg(n_gen))
    return {"pp_tps": pp, "tg_tps": tg}


FLASH_ATTN = {
    "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


def _argmax_ith(ctx: llama_cpp.llama_context_p, i: int, n_vocab: int) -> int:
    """Greedy pick from the logits of batch row ``i`` (a row whose ``logits`` flag was set)."""
    ptr = llama_cpp.llama_get_logits_ith(ctx, i)
    if not ptr:
        raise RuntimeError(f"llama_get_logits_ith({i}) returned NULL")
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))


def _fill(batch: llama_cpp.llama_batch, rows: list[tuple[int, int, int, bool]]) -> None:
    """Write ``(token, position, sequence id, logits?)`` rows into ``batch`` (one sequence id each)."""
    for k, (tok, pos, seq, want) in enumerate(rows):
        batch.token[k] = tok
        batch.pos[k] = pos
        batch.n_seq_id[k] = 1
        batch.seq_id[k][0] = seq
        batch.logits[k] = 1 if want else 0
    batch.n_tokens = len(rows)


def _decode(ctx: llama_cpp.llama_context_p, batch: llama_cpp.llama_batch) -> None:
    rc = llama_cpp.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode returned {rc}")


def _batched_run(ctx: llama_cpp.llama_context_p, batch: llama_cpp.llama_batch,
                 prompts: list[list[int]], n_gen: int, n_vocab: int) -> tuple[float, float, list[int]]:
    """Empty the cache, prefill every prompt in one batch (each in its own sequence), then ``n_gen``
    steps of one batch holding the next token of every sequence. Returns (prefill seconds, decode
    seconds, the tokens sequence 0 generated)."""
    n_seq, n_prompt = len(prompts), len(prompts[0])
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    _fill(batch, [(tok, i, s, i == n_prompt - 1) for s, p in enumerate(prompts) for i, tok in enumerate(p)])
    t0 = time.perf_counter()
    _decode(ctx, batch)
    nxt = [_argmax_ith(ctx, s * n_prompt + n_prompt - 1, n_vocab) for s in range(n_seq)]
    llama_cpp.llama_synchronize(ctx)
    t1 = time.perf_counter()
    out = [nxt[0]]
    for step in range(n_gen):
        _fill(batch, [(nxt[s], n_prompt + step, s, True) for s in range(n_seq)])
        _decode(ctx, batch)
        nxt = [_argmax_ith(ctx, s, n_vocab) for s in range(n_seq)]
        out.append(nxt[0])
    llama_cpp.llama_synchronize(ctx)
    return t1 - t0, time.perf_counter() - t1, out[:n_gen]


def op_batched_bench(req: dict[str, Any]) -> dict[str, Any]:
    """Batched decoding through llama-cpp-python's low-level batch API (``llama_batch_init`` /
    ``llama_decode`` / ``llama_get_logits_ith`` / ``llama_memory_clear``), not the
    ``llama-batched-bench`` binary, which this build does not have; the figure mirrors that tool's
    S_TG (aggregate text-generation speed of B parallel sequences).

    For each B in ``batch_sizes``: a fresh context with ``n_seq_max = B``, room for B x (prompt +
    gen) tokens and a batch that takes all prompts at once. B distinct pseudo-random prompts of
    ``n_prompt`` tokens are prefilled together (sequence ids 0..B-1, logits only at each prompt's
    last token), then ``n_gen`` decode steps each run one ``llama_batch`` of B tokens (sequence s,
    its next position, logits on) and pick each sequence's next token greedily from its row.
    Aggregate decode speed = B x n_gen / decode time (prefill excluded, greedy picking included).
    One untimed warm-up run per context, then ``reps`` timed runs, each from an empty cache.
    ``kv_unified`` (default off, llama-batched-bench's default) selects one KV buffer shared by all
    sequences instead of one stream per sequence; ``flash_attn`` is auto / on / off.
    """
    sizes = [int(b) for b in req.get("batch_sizes", [1, 2, 4, 8])]
    n_prompt, n_gen = int(req.get("n_prompt", 16)), int(req["n_gen"])
    reps, threads = int(req.get("reps", 1)), int(req.get("n_threads", 2))
    if n_prompt < 1 or n_gen < 1 or reps < 1 or min(sizes) < 1:
        raise ValueError("batched_bench needs n_prompt, n_gen, reps and every batch size >= 1")
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(req["model"].encode(), mparams)
    if not model:
        raise RuntimeError(f"could not load {req['model']}")
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    # Prompt s is the same for every B, so sequence 0 generates the same tokens at every B.
    prompts_all = [[int(t) for t in np.random.default_rng(1234 + s).integers(0, 32000, size=n_prompt)]
                   for s in range(max(sizes))]
    results = []
    try:
        for n_seq in sizes:
            prompts = prompts_all[:n_seq]
            cparams = llama_cpp.llama_context_default_params()
            cparams.n_ctx = n_seq * _ctx_for(n_prompt + n_gen)
            cparams.n_batch = cparams.n_ubatch = max(n_seq * n_prompt, n_seq)
            cparams.n_seq_max = n_seq
            cparams.n_threads = cparams.n_threads_batch = threads
            cparams.kv_unified = bool(req.get("kv_unified", True))
            cparams.flash_attn_type = FLASH_ATTN[req.get("flash_attn", "auto")]
            cparams.no_perf = True
            ctx = llama_cpp.llama_init_from_model(model, cparams)
            if not ctx:
                raise RuntimeError(f"could not create a context for {n_seq} sequences")
            batch = llama_cpp.llama_batch_init(cparams.n_batch, 0, 1)
            try:
                _batched_run(ctx, batch, prompts, min(n_gen, 2), n_vocab)
                pp, tg, tokens = [], [], []
                for _ in range(reps):
                    t_pp, t_tg, tokens = _batched_run(ctx, batch, prompts, n_gen, n_vocab)
                    pp.append(n_seq * n_prompt / t_pp)
                    tg.append(n_seq * n_gen / t_tg)
            finally:
                llama_cpp.llama_batch_free(batch)
                llama_cpp.llama_free(ctx)
            results.append({"n_seq": n_seq, "tg_tps": tg, "pp_tps": pp, "tokens0": tokens,
                            "n_ctx": int(cparams.n_ctx)})
    finally:
        llama_cpp.llama_model_free(model)
    return {"batch": results, "n_prompt": n_prompt, "n_gen": n_gen, "n_threads": threads,
            "kv_unified": bool(req.get("kv_unified", False)), "flash_attn": req.get("flash_attn", "auto")}


def op_embed_bench(req: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's embedding path (what ``llama-embedding`` does): a context with ``embeddings`` on and
    mean pooling, ``n_seq_max`` = the number of texts, one unified KV cache (``kv_unified`` false gives
    one stream per text: faster, but in this build its pooled vectors are wrong, cosine 0.92 to
    transformers'), one batch of all texts (each its own sequence),
    every row flagged for output, then ``llama_get_embeddings_seq`` per text. ``reps`` timed runs after
    one warm-up, each from an empty cache; returns tokens/s per run and the first text's embedding."""
    lists = [[int(t) for t in ids] for ids in req["lists"]]
    reps, threads = int(req.get("reps", 3)), int(req.get("n_threads", 2))
    n_tokens = sum(len(x) for x in lists)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(req["model"].encode(), llama_cpp.llama_model_default_params())
    if not model:
        raise RuntimeError(f"could not load {req['model']}")
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = _ctx_for(n_tokens)
    cparams.n_batch = n_tokens
    cparams.n_ubatch = int(req.get("n_ubatch", 512))
    cparams.n_seq_max = len(lists)
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.embeddings = True
    cparams.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    cparams.kv_unified = bool(req.get("kv_unified", True))
    cparams.no_perf = True
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("could not create an embedding context")
    batch = llama_cpp.llama_batch_init(n_tokens, 0, 1)
    n_embd = llama_cpp.llama_model_n_embd(model)
    rates, first = [], None
    try:
        for rep in range(reps + 1):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            _fill(batch, [(tok, i, s, True) for s, ids in enumerate(lists) for i, tok in enumerate(ids)])
            t0 = time.perf_counter()
            _decode(ctx, batch)
            vecs = [np.ctypeslib.as_array(llama_cpp.llama_get_embeddings_seq(ctx, s), shape=(n_embd,)).copy()
                    for s in range(len(lists))]
            llama_cpp.llama_synchronize(ctx)
            if rep:
                rates.append(n_tokens / (time.perf_counter() - t0))
            first = vecs[0]
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return {"tps": rates, "n_tokens": n_tokens, "first": first.tolist(), "n_ubatch": int(cparams.n_ubatch)}


def _vm_hwm() -> int:
    """This process's peak resident set (VmHWM of /proc/self/status) in bytes, 0 where absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def op_kv_memory(req: dict[str, Any]) -> dict[str, Any]:
    """Load with a context of ``n_ctx`` and K/V cache types ``type_k`` / ``type_v`` (GGML type ids:
    0 f32, 1 f16, 8 q8_0; a quantized V cache needs ``flash_attn``), evaluate ``ids`` (batches of
    ``n_batch``), decode ``n_decode`` greedy tokens. The caller reads the peak RSS from the process's
    rusage; this reports the timings and its own VmHWM."""
    ids, n_decode = [int(t) for t in req["ids"]], int(req.get("n_decode", 4))
    n_batch = int(req.get("n_batch", 512))
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=req["model"], n_ctx=int(req["n_ctx"]), n_batch=n_batch, n_ubatch=n_batch,
        n_threads=int(req.get("n_threads", 2)), n_threads_batch=int(req.get("n_threads", 2)),
        type_k=int(req["type_k"]), type_v=int(req["type_v"]), flash_attn=bool(req.get("flash_attn", False)),
        verbose=False,
    )
    t1 = time.perf_counter()
    llm.eval(ids)
    t2 = time.perf_counter()
    out = []
    for _ in range(n_decode):
        tok = int(np.argmax(_last_logits(llm)))
        out.append(tok)
        llm.eval([tok])
    t3 = time.perf_counter()
    return {"load_s": t1 - t0, "prefill_s": t2 - t1, "decode_s": t3 - t2, "tokens": out,
            "n_ctx": int(llama_cpp.llama_n_ctx(llm.ctx)), "vm_hwm": _vm_hwm()}


def op_quantize_model(req: dict[str, Any]) -> dict[str, Any]:
    """llama_model_quantize (what llama-quantize calls) to the file type named in ``ftype``."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{req['ftype'].upper()}")
    params.nthread = int(req.get("n_threads", 2))
    t0 = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(req["src"].encode(), req["dst"].encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {"seconds": time.perf_counter() - t0}


OPS = {
    "tokenize": op_tokenize,
    "greedy": op_greedy,
    "logits": op_logits,
    "bench": op_bench,
    "batched_bench": op_batched_bench,
    "kv_memory": op_kv_memory,
    "quantize_model": op_quantize_model,
    "embed_bench": op_embed_bench,
}


def main() -> None:
    """Read the request, run its op, write ``result.json``."""
    req = json.loads(Path(sys.argv[1]).read_text())
    result = OPS[req["op"]](req)
    (Path(req["out"]) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
