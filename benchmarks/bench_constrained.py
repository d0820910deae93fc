"""Decode speed under a JSON-schema constraint vs unconstrained decode, and the per-token mask cost.

Same model, same chat prompt, same thread count, greedy. The constrained run follows a schema that lets
the reply run on (an array of up to 500 small objects), the unconstrained run bans the end-of-turn
tokens, so both decode ``-n`` tokens; a third run decodes free text under the tool-call grammar of
``tool_choice`` "auto" (what every chat request with tools runs). Speed is decode tokens / decode
time (the prefill is excluded: timing starts when the first token arrives). Repetitions alternate in
one process so that load from other users of the machine hits all runs alike.

The mask cost is measured apart by replaying the constrained run's tokens through a fresh matcher:
llguidance's mask computation (``Constraint.mask``), then applying it to a logits row
(``Constraint.apply`` minus the mask), per token.

Run from the repository root: ``python3 -m benchmarks.bench_constrained [-m MODEL] [-n 128] [-r 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

import qwenlite
from benchmarks.report import fmt, machine_summary, update_section
from qwenlite import hub
from qwenlite.chat.generate import default_stop_ids
from qwenlite.chat.sampler import SamplerConfig
from qwenlite.chat.tools import ToolChoice, tool_grammar

SCHEMA = {"type": "object", "properties": {"points": {"type": "array", "maxItems": 500, "items": {
    "type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}, "label": {"type": "string"}},
    "required": ["x", "y", "label"], "additionalProperties": False}}}, "required": ["points"],
    "additionalProperties": False}
PROMPT = "List many labelled points on a grid as JSON."


def decode_rate(m: qwenlite.Model, ids: list[int], n: int, **kw: object) -> tuple[float, list[int]]:
    stream = m.generate(ids, max_tokens=n, stream=True, **kw)
    t_first = None
    for _ in stream:
        if t_first is None:
            t_first = time.perf_counter()
    done = time.perf_counter()
    tokens = stream.tokens
    return (len(tokens) - 1) / (done - t_first), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None, help="GGUF file or known name (default: the 0.5B)")
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update BENCHMARKS.md")
    args = ap.parse_args()
    path = Path(args.model) if args.model and Path(args.model).is_file() else hub.pull(args.model, progress=False)
    m = qwenlite.load(path, n_threads=args.threads)
    ids = m.template.encode(m.tokenizer, [{"role": "user", "content": PROMPT}])
    grammar = m.grammar(json_schema=SCHEMA)
    ban = tuple((t, float("-inf")) for t in sorted(default_stop_ids(m.tokenizer)))
    free_cfg = SamplerConfig(temperature=0.0, logit_bias=ban)
    greedy = SamplerConfig(temperature=0.0)
    decode_rate(m, ids, 8, sampling=free_cfg)  # compile and warm both paths
    decode_rate(m, ids, 8, sampling=greedy, grammar=grammar)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    tools = tool_grammar(m.tokenizer, [tool], ToolChoice("auto"))  # free text (or a call) under "auto"
    decode_rate(m, ids, 8, sampling=free_cfg, grammar=tools)
    rates: dict[str, list[float]] = {"unconstrained": [], "json schema": [], "tool grammar (auto), text": []}
    tokens: list[int] = []
    for _ in range(args.reps):
        rates["unconstrained"].append(decode_rate(m, ids, args.n_gen, sampling=free_cfg)[0])
        rate, tokens = decode_rate(m, ids, args.n_gen, sampling=greedy, grammar=grammar)
        rates["json schema"].append(rate)
        rates["tool grammar (auto), text"].append(decode_rate(m, ids, args.n_gen, sampling=free_cfg, grammar=tools)[0])
    # The mask cost, replayed token by token.
    c = grammar.start()
    row = np.random.default_rng(0).standard_normal(m.config.n_vocab).astype(np.float32)
    t_mask, t_apply = [], []
    for tok in tokens:
        t0 = time.perf_counter()
        c.mask()
        t1 = time.perf_counter()
        c.apply(row)
        t2 = time.perf_counter()
        c.accept(tok)
        t_mask.append((t1 - t0) * 1e3)
        t_apply.append(((t2 - t1) - (t1 - t0)) * 1e3)
    base = statistics.fmean(rates["unconstrained"])
    step_ms = 1e3 / statistics.fmean(rates["unconstrained"])
    mask_ms, apply_ms = statistics.median(t_mask), statistics.median(t_apply)
    body = "\n".join([
        "## Constrained decoding (JSON schema) vs unconstrained",
        "",
        f"`python3 -m benchmarks.bench_constrained -n {args.n_gen} -r {args.reps} -t {args.threads}`, "
        f"model `{path.name}`, greedy, one sequence, {len(tokens)} tokens per run, "
        "the three runs alternating in one process.",
        machine_summary(),
        "",
        "| decode | tok/s | vs unconstrained |",
        "|---|---:|---:|",
        *(f"| {k} | {fmt(v)} | {statistics.fmean(v) / base:.2f}x |" for k, v in rates.items()),
        "",
        f"Per-token cost of the constraint (median over {len(t_mask)} tokens): llguidance's mask "
        f"{mask_ms:.3f} ms (p95 {np.percentile(t_mask, 95):.3f} ms), applying it to the logits {apply_ms:.3f} ms; "
        f"together {100 * (mask_ms + apply_ms) / step_ms:.1f}% of an unconstrained decode step ({step_ms:.1f} ms).",
    ])
    print(body)
    if not args.no_write:
        update_section("constrained", body)


if __name__ == "__main__":
    main()
