"""One llama.cpp request, run under the side interpreter `.peer/venv/bin/python`.

Usage: ``peer_worker.py REQUEST.json``. The request is a JSON object with an ``op`` and an ``out``
directory; the answer goes to ``out/result.json`` (arrays as ``.npy`` files listed under
``"arrays"``). Only this file imports ``llama_cpp``: the main test interpreter does not have it, and
one process per request keeps llama.cpp's state (and its stderr chatter) away from the caller.

Ops: ``tokenize``, ``greedy``, ``logits``, ``bench``, ``quantize_model``.
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
    "quantize_model": op_quantize_model,
}


def main() -> None:
    """Read the request, run its op, write ``result.json``."""
    req = json.loads(Path(sys.argv[1]).read_text())
    result = OPS[req["op"]](req)
    (Path(req["out"]) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
