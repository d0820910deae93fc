"""The continuous-batching scheduler on the real model, without HTTP: chunked prompts never stall the
generating requests, results equal the single-sequence API, prefix reuse, queue bounds, cancellation."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qwenlite.chat.sampler import SamplerConfig
from qwenlite.errors import QwenliteError
from qwenlite.runtime.scheduler import QueueFullError, Request, Result, Update

GREEDY = SamplerConfig(temperature=0.0)


def _collect() -> tuple[list[Result], list[str], Callable[[Update], None]]:
    results: list[Result] = []
    pieces: list[str] = []

    def emit(u: Update) -> None:
        pieces.append(u.text)
        if u.result is not None:
            results.append(u.result)

    return results, pieces, emit


def test_a_long_prompt_is_read_in_chunks_while_others_keep_generating(real_model) -> None:  # noqa: ANN001
    m = real_model
    sched = m.scheduler(n_batch=32)
    sizes: list[int] = []
    decode = m.runtime.decode

    def spy(tokens, seq, **kw):  # noqa: ANN001, ANN003, ANN202
        sizes.append(len(tokens))
        return decode(tokens, seq, **kw)

    m.runtime.decode = spy
    try:
        m.runtime.clear()
        a_ids = m.tokenize("def quicksort(xs):")
        b_ids = m.tokenize("Explain, in detail, how a CPU cache works. " * 10)
        assert len(b_ids) > 3 * 32
        ra, pa, ea = _collect()
        rb, pb, eb = _collect()
        a = sched.submit(Request(a_ids, 24, GREEDY, ignore_eos=True, emit=ea))
        while not any(s.req is a and s.tokens for s in sched.slots):
            sched.step()
        slot_a = next(s for s in sched.slots if s.req is a)
        sched.submit(Request(b_ids, 4, GREEDY, emit=eb))
        slot_b = None
        for _ in range(len(b_ids) // 31):
            before = len(slot_a.tokens)
            sched.step()
            slot_b = slot_b or next(s for s in sched.slots if s.req is not None and s.req is not a)
            assert len(slot_a.tokens) == before + 1  # A produced a token in every step of B's prompt
            assert sizes[-1] <= 32
        assert slot_b.t_first is None and len(slot_b.feed) < len(b_ids)  # B was still being read
        while sched.step():
            pass
    finally:
        m.runtime.decode = decode
        m.runtime.clear()
    assert len(ra[0].tokens) == 24 and ra[0].finish_reason == "length"  # ignore_eos: never stopped early
    assert rb[0].text == m.generate(b_ids, max_tokens=4, temperature=0.0)
    assert "".join(pb) == rb[0].text  # the pieces add up to the result


def test_prefix_reuse_picks_the_slot_holding_the_conversation(real_model) -> None:  # noqa: ANN001
    m = real_model
    m.runtime.clear()
    sched = m.scheduler()
    conv = [{"role": "user", "content": "Name a color."}]
    ids1 = m.template.encode(m.tokenizer, conv)
    r1, _, e1 = _collect()
    sched.run_until_idle([Request(ids1, 6, GREEDY, emit=e1)])
    # Fill other slots with unrelated text, then continue the conversation.
    others = [Request(m.tokenize(f"x{i} = {i}"), 2, GREEDY) for i in range(3)]
    sched.run_until_idle(others)
    conv2 = conv + [{"role": "assistant", "content": r1[0].text}, {"role": "user", "content": "Another?"}]
    ids2 = m.template.encode(m.tokenizer, conv2)
    r2, _, e2 = _collect()
    sched.run_until_idle([Request(ids2, 6, GREEDY, emit=e2)])
    m.runtime.clear()
    assert r2[0].cached_tokens >= len(ids1)
    assert r2[0].text == m.generate(ids2, max_tokens=6, temperature=0.0)


def test_queue_bound_cancel_and_bad_requests(real_model) -> None:  # noqa: ANN001
    m = real_model
    m.runtime.clear()
    sched = m.scheduler(max_queue=1)
    results, _, emit = _collect()
    reqs = [sched.submit(Request(m.tokenize(f"print({i})"), 50, GREEDY, emit=emit)) for i in range(5)]  # 4 + 1
    with pytest.raises(QueueFullError, match="retry later"):
        sched.submit(Request([1, 2, 3], 5, GREEDY))
    reqs[0].cancel()  # a cancelled request no longer counts against the bound
    sched.submit(Request(m.tokenize("print(9)"), 1, GREEDY, emit=emit))
    sched.step()
    for r in reqs:
        r.cancel()
    while sched.step():
        pass
    m.runtime.clear()
    assert sorted(r.finish_reason for r in results) == ["cancelled"] * 5 + ["length"]
    assert sched.n_busy == 0 and sched.n_queued == 0
    with pytest.raises(QwenliteError, match="empty"):
        sched.submit(Request([], 5, GREEDY))
    with pytest.raises(QwenliteError, match="context"):
        sched.submit(Request([1] * (m.n_ctx + 1), 5, GREEDY))
    with pytest.raises(QwenliteError, match="max tokens"):
        sched.submit(Request([1], -1, GREEDY))


def test_a_prefix_held_by_a_busy_slot_is_copied_not_evaluated(real_model) -> None:  # noqa: ANN001
    """Two clients with the same system prompt: the second one's slot is empty, but the first one's
    keys and values for the shared prefix are copied over; the reply is the same as alone."""
    m = real_model
    m.runtime.clear()
    sched = m.scheduler()
    system = {"role": "system", "content": "You are a careful senior engineer who answers briefly."}
    ids_a = m.template.encode(m.tokenizer, [system, {"role": "user", "content": "What is TCP?"}])
    ids_b = m.template.encode(m.tokenizer, [system, {"role": "user", "content": "What is UDP?"}])
    shared = next(i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y)
    assert shared > 10
    ra, _, ea = _collect()
    rb, _, eb = _collect()
    a = sched.submit(Request(ids_a, 16, GREEDY, ignore_eos=True, emit=ea))
    while not any(s.req is a and s.tokens for s in sched.slots):
        sched.step()
    sched.submit(Request(ids_b, 8, GREEDY, emit=eb))
    while sched.step():
        pass
    m.runtime.clear()
    assert ra[0].cached_tokens == 0 and rb[0].cached_tokens == shared
    assert rb[0].text == m.generate(ids_b, max_tokens=8, temperature=0.0)


def test_the_scheduler_thread_runs_on_the_model_thread_count(real_model_path) -> None:  # noqa: ANN001
    """Numba's thread count is per thread: a model loaded with 1 thread must not run its server's
    scheduler thread on all cores."""
    import threading

    import numba

    import qwenlite

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 cores")
    m = qwenlite.load(real_model_path, n_threads=1, n_ctx=64, n_seq=1)
    seen: list[int] = []
    sched = m.scheduler()
    decode = m.runtime.decode
    m.runtime.decode = lambda *a, **kw: seen.append(numba.get_num_threads()) or decode(*a, **kw)
    done = threading.Event()
    sched.start()
    try:
        sched.submit(Request([1000, 1001], 2, GREEDY, emit=lambda u: u.result and done.set()))
        assert done.wait(120)
    finally:
        sched.close()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    assert seen and set(seen) == {1}
