"""Many sequences at once on the real 0.5B model: bitwise determinism, batch APIs, prefix reuse,
cancellation, thread safety and the errors of bad batches.

The determinism guarantee is exact (``assert_array_equal``, never a tolerance): a sequence's logits
are the same bits alone, batched with others, on 1 or 2 threads and for any prefill split.
"""

from __future__ import annotations

import _thread
import threading
import time

import numba
import numpy as np
import pytest

import qwenlite
from qwenlite.errors import QwenliteError

PROMPTS = [
    "def quicksort(xs):",
    "The three laws of thermodynamics are",
    "SELECT name, count(*) FROM users GROUP BY name HAVING",
    "北京是中国的首都，也是",
    "fn main() {\n    let v: Vec<i32> = (0..10).collect();\n"
    "    println!(\"{:?}\", v.iter().sum::<i32>());\n}\n// what does this print?",
]


@pytest.fixture(scope="module")
def m(real_model):  # noqa: ANN001, ANN201
    return real_model


@pytest.fixture(scope="module")
def id_lists(m) -> list[list[int]]:  # noqa: ANN001
    return [m.tokenize(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def alone(m, id_lists) -> list[np.ndarray]:  # noqa: ANN001
    return [m.logits(ids) for ids in id_lists]


def test_prompts_have_different_lengths(id_lists) -> None:  # noqa: ANN001
    assert len({len(ids) for ids in id_lists}) == len(id_lists)
    assert max(len(ids) for ids in id_lists) >= 30


def test_logits_batch_is_bitwise_equal_to_alone(m, id_lists, alone) -> None:  # noqa: ANN001
    """Five prompts, four slots: a wave of four batched together and a wave of one."""
    assert m.n_seq == 4
    batched = m.logits_batch(id_lists)
    for a, b in zip(alone, batched):
        assert b.dtype == np.float32 and b.shape == a.shape
        np.testing.assert_array_equal(a, b)


def test_thread_count_does_not_change_a_bit(m, id_lists, alone) -> None:  # noqa: ANN001
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = m.logits_batch(id_lists[:3])
    finally:
        numba.set_num_threads(before)
    assert before == 2
    for a, b in zip(alone, one):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n_batch", [1, 7, 32])
def test_prefill_split_does_not_change_a_bit(m, id_lists, alone, n_batch: int) -> None:  # noqa: ANN001
    old = m.runtime.n_batch
    m.runtime.n_batch = n_batch
    try:
        got = m.logits(id_lists[4])
    finally:
        m.runtime.n_batch = old
    np.testing.assert_array_equal(got, alone[4])


def test_interleaved_prefill_and_decode_in_one_batch(m, id_lists, alone) -> None:  # noqa: ANN001
    """Sequence 1 decodes token by token while sequence 0 prefills in the same forward passes, tokens
    of the two interleaved in the batch: each row equals the sequence's own logits."""
    eng = m.runtime
    a, b = id_lists[4], id_lists[1]
    eng.clear()
    try:
        first = eng.decode(b[:3], 1)
        np.testing.assert_array_equal(first[0], alone[1][2])
        ids, seq, n1 = [], [], 0
        for i in range(len(a)):
            ids.append(a[i])
            seq.append(0)
            if i % 2 == 0 and 3 + n1 < len(b):
                ids.append(b[3 + n1])
                seq.append(1)
                n1 += 1
        rows = eng.decode(ids, seq, logits=np.ones(len(ids), bool))
        np.testing.assert_array_equal(rows[[i for i, s in enumerate(seq) if s == 0]], alone[4])
        np.testing.assert_array_equal(rows[[i for i, s in enumerate(seq) if s == 1]], alone[1][3 : 3 + n1])
        assert eng.tokens(0) == a and eng.tokens(1) == b[: 3 + n1]
    finally:
        eng.clear()


def test_decode_of_four_sequences_equals_each_alone(m, id_lists, alone) -> None:  # noqa: ANN001
    """Batched single-token decode steps (the server's hot path), after batched prefills."""
    eng = m.runtime
    eng.clear()
    try:
        lists = id_lists[:4]
        cut = [len(x) - 3 for x in lists]
        eng.decode([t for x, c in zip(lists, cut) for t in x[:c]], [s for s, c in enumerate(cut) for _ in range(c)])
        for step in range(3):
            rows = eng.decode([x[c + step] for x, c in zip(lists, cut)], [0, 1, 2, 3])
            for s in range(4):
                np.testing.assert_array_equal(rows[s], alone[s][cut[s] + step])
    finally:
        eng.clear()


def test_generate_batch_equals_generate(m) -> None:  # noqa: ANN001
    singles = [m.generate(p, max_tokens=12, temperature=0.0) for p in PROMPTS]
    assert m.generate_batch(PROMPTS, max_tokens=12, temperature=0.0) == singles
    assert m.generate_batch([m.tokenize(PROMPTS[0])], max_tokens=12, temperature=0.0) == singles[:1]


def test_generate_batch_seeds_are_per_prompt(m) -> None:  # noqa: ANN001
    opts = dict(max_tokens=10, temperature=0.9, top_k=50, top_p=0.95)
    alone = m.generate(PROMPTS[2], seed=7, **opts)
    assert m.generate_batch([PROMPTS[0], PROMPTS[2]], seed=7, **opts)[1] == alone
    assert m.generate_batch([PROMPTS[1], PROMPTS[3], PROMPTS[2]], seed=7, **opts)[2] == alone
    a, b = m.generate_batch([PROMPTS[2], PROMPTS[2]], seed=[1, 2], **opts)
    assert a == m.generate(PROMPTS[2], seed=1, **opts) and b == m.generate(PROMPTS[2], seed=2, **opts)


def test_generate_batch_stop_strings_and_more_prompts_than_slots(m) -> None:  # noqa: ANN001
    prompts = [f"Count: {i}, {i + 1}, {i + 2}," for i in range(6)]
    out = m.generate_batch(prompts, max_tokens=16, temperature=0.0, stop=[","])
    assert len(out) == 6
    assert all("," not in o for o in out)
    assert out == [m.generate(p, max_tokens=16, temperature=0.0, stop=[","]) for p in prompts]


def test_chat_reuses_the_common_prefix(m) -> None:  # noqa: ANN001
    msgs = [{"role": "user", "content": "Name a prime number below 10."}]
    first = m.chat(msgs, max_tokens=16, temperature=0.0)
    n_first = len(m.template.encode(m.tokenizer, msgs))
    msgs2 = [*msgs, {"role": "assistant", "content": first}, {"role": "user", "content": "And another one?"}]
    second = m.chat(msgs2, max_tokens=16, temperature=0.0)
    assert m.last_reused >= n_first, "the first turn's prompt should come from the cache"
    stream = m.chat(msgs2, max_tokens=16, temperature=0.0, stream=True)
    assert "".join(stream) == second
    n2 = len(m.template.encode(m.tokenizer, msgs2))
    assert stream.reused == n2 - 1, "the same conversation again costs one token"
    m.engine.reset()
    assert m.chat(msgs2, max_tokens=16, temperature=0.0) == second and m.last_reused == 0


def test_breaking_out_of_a_stream_stops_and_frees_the_model(m) -> None:  # noqa: ANN001
    stream = m.generate("def add(a, b):", max_tokens=200, stream=True)
    next(stream)
    with pytest.raises(QwenliteError, match="still streaming"):
        m.generate("x", max_tokens=1)
    evaluated = m.engine.n_past
    stream.close()
    assert m.engine.n_past == evaluated, "closing must not evaluate anything more"
    for piece in m.generate("def add(a, b):", max_tokens=200, stream=True):
        assert piece
        break  # the dropped stream is closed at once by reference counting
    greedy = {"max_tokens": 8, "temperature": 0.0}
    assert m.generate("def add(a, b):", **greedy) == m.generate_batch(["def add(a, b):"], **greedy)[0]


def test_cancel_aborts_a_long_prefill_between_chunks(m) -> None:  # noqa: ANN001
    ids = m.tokenize(" ".join(PROMPTS) * 8)
    old = m.runtime.n_batch
    m.runtime.n_batch = 8
    try:
        timer = threading.Timer(0.3, m.cancel)
        timer.start()
        t0 = time.perf_counter()
        stream = m.generate(ids, max_tokens=5, stream=True)
        assert list(stream) == [] and stream.finish_reason == "cancelled"
        assert time.perf_counter() - t0 < 20
        assert 0 < m.engine.n_past < len(ids) and m.engine.n_past % 8 == 0
    finally:
        m.runtime.n_batch = old
        timer.cancel()
    greedy = {"max_tokens": 6, "temperature": 0.0}
    assert m.generate(PROMPTS[0], **greedy) == m.generate_batch([PROMPTS[0]], **greedy)[0]


def test_keyboard_interrupt_leaves_the_model_usable(m, id_lists, alone) -> None:  # noqa: ANN001
    ids = m.tokenize(" ".join(PROMPTS) * 8)
    old = m.runtime.n_batch
    m.runtime.n_batch = 8
    timer = threading.Timer(0.3, _thread.interrupt_main)
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            m.generate(ids, max_tokens=5)
            time.sleep(30)  # the interrupt lands at the latest here, if the prefill was faster
    finally:
        m.runtime.n_batch = old
        timer.cancel()
    np.testing.assert_array_equal(m.logits(id_lists[0]), alone[0])


def test_two_threads_are_serialized(m) -> None:  # noqa: ANN001
    expect = {p: m.generate(p, max_tokens=10, temperature=0.0) for p in PROMPTS[:2]}
    got: dict[str, str] = {}

    def work(p: str) -> None:
        got[p] = m.generate(p, max_tokens=10, temperature=0.0)

    threads = [threading.Thread(target=work, args=(p,)) for p in PROMPTS[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expect


def test_bad_batches_are_one_clear_error(m) -> None:  # noqa: ANN001
    eng = m.runtime
    eng.clear()
    eng.decode(m.tokenize("hello"), 1)
    with pytest.raises(QwenliteError, match="prompt 1 is empty"):
        m.generate_batch(["hi", ""], max_tokens=2)
    with pytest.raises(QwenliteError, match="prompt 0: token id 999999 out of range"):
        m.generate_batch([[1, 999999]], max_tokens=2)
    with pytest.raises(QwenliteError, match="token id -1 out of range"):
        eng.decode([5, -1], [0, 1])
    with pytest.raises(QwenliteError, match="sequence id out of range: the cache has 4 slots"):
        eng.decode([5, 6], [0, 4])
    held = len(m.tokenize("hello"))
    with pytest.raises(QwenliteError, match=f"sequence 1: {held + 4096} tokens do not fit its context of 4096"):
        eng.decode([5] * 4097, [0] + [1] * 4096)
    with pytest.raises(QwenliteError, match="4097 tokens but a sequence's context is 4096"):
        m.logits_batch([[5] * 3, [5] * 4097])
    with pytest.raises(QwenliteError, match="positions must continue"):
        eng.decode([5], 1, pos=[0])
    assert eng.tokens(1) == m.tokenize("hello") and eng.length(0) == 0, "nothing of a refused batch ran"
    eng.clear()
    with pytest.raises(QwenliteError, match="unknown KV cache type 'q4_0': choose one of f32, f16, q8_0"):
        qwenlite.load(m.path, kv_type="q4_0")


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_other_cache_types_are_deterministic_too(real_model_path, id_lists, kind: str) -> None:  # noqa: ANN001
    with qwenlite.load(real_model_path, n_threads=2, kv_type=kind) as mk:
        assert mk.kv_type == kind
        alone = [mk.logits(ids) for ids in id_lists[:3]]
        for a, b in zip(alone, mk.logits_batch(id_lists[:3])):
            np.testing.assert_array_equal(a, b)
