"""`qwenlite serve` against the official `openai` client and raw HTTP, on a real uvicorn server on
127.0.0.1 with the real 0.5B model (the ``served`` fixture in conftest.py).

The oracle for every reply is the Python API: greedy server output must equal ``Model.chat`` /
``Model.generate`` greedy output token for token, alone and with 8 clients at once (the core's
bitwise determinism makes exact equality the right test, not a similarity score).
"""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from conftest import SERVE_KEY  # noqa: E402

AUTH = {"Authorization": f"Bearer {SERVE_KEY}"}

CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a mutex?"}],
    [{"role": "user", "content": "Name a sorting algorithm."}, {"role": "assistant", "content": "Quicksort."},
     {"role": "user", "content": "How fast is it?"}],
    [{"role": "user", "content": "Explain recursion in one sentence."}],
    [{"role": "user", "content": "What does `git rebase` do?"}],
    [{"role": "user", "content": [{"type": "text", "text": "Say hello "}, {"type": "text", "text": "in French."}]}],
    [{"role": "user", "content": "Write a haiku about C pointers."}],
    [{"role": "user", "content": "I typed <|im_end|> here; what is it?"}],
]
N_TOKENS = 24


def _plain(messages: list[dict]) -> list[dict]:
    """The conversation as the Python API takes it (string content)."""
    out = []
    for m in messages:
        c = m["content"]
        out.append({"role": m["role"], "content": c if isinstance(c, str) else "".join(p["text"] for p in c)})
    return out


@pytest.fixture(scope="module")
def expected(real_model) -> list[str]:  # noqa: ANN001
    return [real_model.chat(_plain(c), max_tokens=N_TOKENS, temperature=0.0) for c in CONVERSATIONS]


@pytest.fixture(scope="module")
def client(served):  # noqa: ANN001, ANN201
    url, _ = served
    return openai.OpenAI(base_url=f"{url}/v1", api_key=SERVE_KEY, max_retries=0, timeout=120)


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()


def _wait_idle(url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = _health(url)
        if (h["slots_processing"] == 0 and h["queue"] == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.05)


def _stream_text(client, messages: list[dict], **kw) -> tuple[str, list]:  # noqa: ANN001
    chunks = list(client.chat.completions.create(model="x", messages=messages, max_tokens=N_TOKENS,
                                                 temperature=0, stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_greedy_reply_equals_model_chat(client, expected) -> None:  # noqa: ANN001
    for conv, want in zip(CONVERSATIONS[:3], expected[:3]):
        r = client.chat.completions.create(model="whatever", messages=conv, max_tokens=N_TOKENS, temperature=0)
        assert r.object == "chat.completion"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == want
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens <= N_TOKENS
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_reply_equals_model_chat(client, expected) -> None:  # noqa: ANN001
    text, chunks = _stream_text(client, CONVERSATIONS[0], stream_options={"include_usage": True})
    assert text == expected[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0  # include_usage's last chunk


def test_raw_sse_framing(served) -> None:  # noqa: ANN001
    url, _ = served
    body = {"messages": CONVERSATIONS[3], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_eight_concurrent_streams_each_get_their_reply_alone(client, expected, served) -> None:  # noqa: ANN001
    """8 clients on 4 slots (4 run, 4 wait): each reply is exactly the one it gets alone."""
    url, _ = served
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda c: _stream_text(client, c)[0], CONVERSATIONS))
    assert got == expected
    h = _wait_idle(url)
    assert h["slots_processing"] == 0 and h["queue"] == 0


def test_follow_up_turn_reuses_the_cached_prefix(client) -> None:  # noqa: ANN001
    conv = [{"role": "user", "content": "List three prime numbers."}]
    r1 = client.chat.completions.create(model="x", messages=conv, max_tokens=12, temperature=0)
    conv2 = conv + [{"role": "assistant", "content": r1.choices[0].message.content},
                    {"role": "user", "content": "And three more?"}]
    r2 = client.chat.completions.create(model="x", messages=conv2, max_tokens=4, temperature=0)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= r1.usage.prompt_tokens  # the whole first prompt, and more, was not evaluated again
    assert cached < r2.usage.prompt_tokens


def test_completions_endpoint_equals_model_generate(served, real_model) -> None:  # noqa: ANN001
    url, _ = served
    c = openai.OpenAI(base_url=f"{url}/v1", api_key=SERVE_KEY, max_retries=0)
    want = real_model.generate("def fibonacci(n):", max_tokens=16, temperature=0.0)
    r = c.completions.create(model="x", prompt="def fibonacci(n):", max_tokens=16, temperature=0)
    assert r.choices[0].text == want
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="x", prompt="def fibonacci(n):", max_tokens=16, temperature=0, stream=True) if ch.choices)
    assert streamed == want
    ids = real_model.tokenize("def fibonacci(n):")
    assert c.completions.create(model="x", prompt=ids, max_tokens=16, temperature=0).choices[0].text == want


def test_seeded_sampling_is_reproducible(client) -> None:  # noqa: ANN001
    kw = {"model": "x", "messages": CONVERSATIONS[4], "max_tokens": 12, "temperature": 1.0, "seed": 7}
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_stop_strings_and_penalties(client, expected) -> None:  # noqa: ANN001
    full = expected[0]
    cut = full[5:9]
    r = client.chat.completions.create(model="x", messages=CONVERSATIONS[0], max_tokens=N_TOKENS, temperature=0,
                                       stop=[cut])
    assert r.choices[0].message.content == full[: full.index(cut)]
    assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="x", messages=CONVERSATIONS[0], max_tokens=N_TOKENS, temperature=0,
                                       frequency_penalty=2.0, presence_penalty=2.0)
    assert r.choices[0].message.content != full  # the penalties change a greedy reply


def test_disconnect_mid_stream_frees_the_slot(served) -> None:  # noqa: ANN001
    url, _ = served
    body = {"messages": CONVERSATIONS[0], "max_tokens": 500, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 4:
                assert _health(url)["slots_processing"] == 1  # still streaming
            if seen >= 6:
                break  # httpx closes the connection when its line iterator is dropped
    h = _wait_idle(url, timeout=5.0)
    assert h["slots_processing"] == 0


def test_disconnect_while_waiting_for_a_full_reply_frees_the_slot(served) -> None:  # noqa: ANN001
    url, _ = served
    body = {"messages": CONVERSATIONS[0], "max_tokens": 500, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=1.5)
    assert _wait_idle(url, timeout=5.0)["slots_processing"] == 0


def test_full_queue_answers_503_with_retry_after(served) -> None:  # noqa: ANN001
    url, _ = served
    body = {"messages": CONVERSATIONS[1], "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    streams = []
    try:
        with httpx.Client(timeout=60, headers=AUTH) as http:
            for _ in range(12):  # 4 slots + a queue of 8
                cm = http.stream("POST", f"{url}/v1/chat/completions", json=body)
                r = cm.__enter__()
                assert r.status_code == 200
                streams.append(cm)
            r = http.post(f"{url}/v1/chat/completions", json=body)
            assert r.status_code == 503
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "server_busy"
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)
    assert _wait_idle(url)["queue"] == 0


def _error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def test_bad_requests_get_openai_errors(served) -> None:  # noqa: ANN001
    url, _ = served
    post = lambda body, **kw: httpx.post(f"{url}/v1/chat/completions", headers={**AUTH, **kw.pop("h", {})},  # noqa: E731
                                         timeout=60, **({"json": body} if not isinstance(body, bytes) else
                                                        {"content": body}), **kw)
    msgs = CONVERSATIONS[0]
    _error(post(b"{not json"), 400)
    _error(post(b"[1, 2]"), 400)
    _error(post({"messages": msgs, "temperature": "hot"}), 400, "temperature")
    _error(post({"messages": msgs, "temperature": 9}), 400, "temperature")
    _error(post({"messages": msgs, "max_tokens": -1}), 400, "max_tokens")
    _error(post({"messages": msgs, "stop": 5}), 400, "stop")
    _error(post({"messages": msgs, "n": 2}), 400, "n")
    assert "n=1" in _error(post({"messages": msgs, "n": 2}), 400)["message"]
    _error(post({"messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages[0].role")
    _error(post({"messages": [{"role": "user", "content": 5}]}), 400, "messages[0].content")
    _error(post({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400)
    _error(post({"messages": []}), 400, "messages")
    _error(post({}), 400, "messages")
    long = [{"role": "user", "content": "word " * 1100}]
    assert _error(post({"messages": long}), 400)["code"] == "context_length_exceeded"
    _error(post(b"x" * (65 * 1024), h={"Content-Type": "application/json"}), 413)
    _error(httpx.get(f"{url}/v1/nope", headers=AUTH), 404)
    _error(httpx.get(f"{url}/v1/chat/completions", headers=AUTH), 405)
    _error(httpx.post(f"{url}/tokenize", json={"content": 3}, headers=AUTH), 400, "content")
    _error(httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}, headers=AUTH), 400, "tokens")
    _error(httpx.post(f"{url}/v1/completions", json={"prompt": [[1], [2]], "max_tokens": 1}, headers=AUTH), 400)
    # Unknown fields are ignored.
    r = post({"messages": msgs, "max_tokens": 2, "temperature": 0, "frobnicate": {"x": 1}, "user": "u1"})
    assert r.status_code == 200
    # The server is still healthy after all that.
    assert _wait_idle(url)["slots_processing"] == 0


def test_max_tokens_is_capped_to_the_slot(served, real_model) -> None:  # noqa: ANN001
    """A prompt that leaves 4 positions of the 1024-token slot: a huge max_tokens yields at most 5 tokens
    (the last sampled token needs no position). The prompt also runs as several prefill chunks."""
    url, _ = served
    ids = real_model.tokenize("x " * 2000)[:1020]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": ids, "max_tokens": 10**9, "temperature": 0,
                                                  "ignore_eos": True}, headers=AUTH, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_api_key_is_enforced(served) -> None:  # noqa: ANN001
    url, _ = served
    body = {"messages": CONVERSATIONS[0], "max_tokens": 1}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SERVE_KEY}):
        err = _error(httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers), 401)
        assert err["code"] == "invalid_api_key"
    _error(httpx.get(f"{url}/v1/models"), 401)
    _error(httpx.get(f"{url}/metrics"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{url}/health").status_code == 200  # open, for load balancers
    assert httpx.get(f"{url}/").status_code == 200  # the static page; it sends the key with its API calls


def test_models_tokenize_detokenize_metrics(served, client, real_model) -> None:  # noqa: ANN001
    url, _ = served
    models = client.models.list().data
    assert len(models) == 1 and models[0].id == "qwen2.5-coder-0.5b-instruct-q4_k_m"
    text = "héllo <|im_end|>"
    r = httpx.post(f"{url}/tokenize", json={"content": text}, headers=AUTH).json()
    assert r["tokens"] == real_model.tokenize(text, special=True)  # llama-server parses specials here
    r2 = httpx.post(f"{url}/tokenize", json={"content": text, "parse_special": False, "with_pieces": True},
                    headers=AUTH).json()
    assert [p["id"] for p in r2["tokens"]] == real_model.tokenize(text)
    assert all(isinstance(p["piece"], str | list) for p in r2["tokens"])
    d = httpx.post(f"{url}/detokenize", json={"tokens": r["tokens"]}, headers=AUTH).json()
    assert d["content"] == text
    metrics = httpx.get(f"{url}/metrics", headers=AUTH).text
    for name in ("qwenlite_requests_total", "qwenlite_completion_tokens_total", "qwenlite_requests_queued",
                 "qwenlite_tokens_per_second", 'qwenlite_http_responses_total{status="200"}'):
        assert name in metrics
    assert float(re.search(r"^qwenlite_completion_tokens_total (\S+)$", metrics, re.M).group(1)) > 0


def test_cors_is_off_by_default_and_on_with_an_origin(served, real_model) -> None:  # noqa: ANN001
    url, _ = served
    pre = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(f"{url}/v1/chat/completions", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    from starlette.testclient import TestClient

    from qwenlite.server import create_app

    # The middleware stack alone (no lifespan, so no scheduler takes the model).
    app = create_app(real_model, cors_origin="http://app.example")
    r = TestClient(app).options("/v1/chat/completions", headers=pre)
    assert r.headers["access-control-allow-origin"] == "http://app.example"


def test_soak_200_requests_at_concurrency_8(served) -> None:  # noqa: ANN001
    """200 requests, 8 at a time, every fifth client disconnecting early: no 5xx, all slots idle and the
    queue empty afterwards, and the process's RSS grows by less than 150 MB (the KV cache of the 4 slots
    is at most 4 x 1024 x 12 KiB = 48 MiB of it)."""
    url, app = served

    def rss() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

    prompts = [f"Give me a one-line tip about {topic}." for topic in
               ("Python", "C", "Rust", "Go", "SQL", "git", "bash", "regex", "HTTP", "JSON")]
    statuses: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        body = {"messages": [{"role": "user", "content": prompts[i % len(prompts)]}], "max_tokens": 6,
                "temperature": 0.7, "seed": i, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120) as r:
            with lock:
                statuses.append(r.status_code)
            for n, _ in enumerate(r.iter_lines()):
                if i % 5 == 0 and n >= 1:
                    break

    before = rss()
    errors_before = sum(n for k, n in app.state.server.statuses.items() if k >= 500)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(200)))
    h = _wait_idle(url, timeout=10)
    assert h["slots_processing"] == 0 and h["queue"] == 0
    assert len(statuses) == 200 and all(s < 500 for s in statuses), sorted(set(statuses))
    assert sum(n for k, n in app.state.server.statuses.items() if k >= 500) == errors_before
    assert rss() - before < 150 << 20
