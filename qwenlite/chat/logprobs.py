"""Log-probabilities of sampled tokens, in OpenAI's shapes.

They are computed from the logits the model produced, before any penalty, bias, grammar mask or
temperature (OpenAI and llama-server report the model's own distribution), in float64 so that the
values equal ``log_softmax`` of ``Model.logits`` to well under 1e-4.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MAX_TOP_LOGPROBS = 20


def _piece(tokenizer: Any, tok: int) -> dict[str, Any]:
    raw = tokenizer.token_bytes(int(tok))
    return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}


def entry(tokenizer: Any, logits: np.ndarray, tok: int, top: int) -> dict[str, Any]:
    """``{"token", "logprob", "bytes", "top_logprobs": [...]}`` for the sampled ``tok``."""
    x = np.asarray(logits, dtype=np.float64)
    peak = x.max()
    lse = peak + np.log(np.exp(x - peak).sum())
    out = {**_piece(tokenizer, tok), "logprob": float(x[tok] - lse), "top_logprobs": []}
    if top > 0:
        top = min(top, x.shape[0])
        best = np.argpartition(-x, top - 1)[:top]
        best = best[np.argsort(-x[best], kind="stable")]
        out["top_logprobs"] = [{**_piece(tokenizer, t), "logprob": float(x[t] - lse)} for t in best]
    return out


def legacy(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``/v1/completions`` shape: parallel lists and ``{token: logprob}`` maps, with text offsets."""
    offsets, pos = [], 0
    for e in entries:
        offsets.append(pos)
        pos += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}
