"""``POST /v1/embeddings`` of the real server, through the official ``openai`` client: the same vectors
as ``Model.embed``, float and base64, usage, errors; streams running meanwhile are unaffected."""

from __future__ import annotations

import threading

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from conftest import SERVE_KEY  # noqa: E402

TEXTS = ["The quick brown fox.", "Der Zug fährt um 8 Uhr.", "def f(x):\n    return x", "今日は天気がいい"]


@pytest.fixture(scope="module")
def client(served):  # noqa: ANN001, ANN201
    url, _ = served
    return openai.OpenAI(base_url=f"{url}/v1", api_key=SERVE_KEY, max_retries=0)


def test_embeddings_equal_model_embed(client, real_model) -> None:  # noqa: ANN001
    r = client.embeddings.create(model="any", input=TEXTS)
    got = np.array([d.embedding for d in r.data], np.float32)
    np.testing.assert_allclose(got, real_model.embed(TEXTS), atol=1e-6)
    assert [d.index for d in r.data] == list(range(len(TEXTS)))
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(real_model.tokenize(t)) for t in TEXTS)
    one = client.embeddings.create(model="any", input=TEXTS[1])  # a single string
    np.testing.assert_allclose(one.data[0].embedding, got[1], atol=1e-6)
    ids = real_model.tokenize(TEXTS[2])
    tok = client.embeddings.create(model="any", input=[ids])  # token lists
    np.testing.assert_allclose(tok.data[0].embedding, got[2], atol=1e-6)


def test_base64_encoding(client, real_model) -> None:  # noqa: ANN001
    # The openai client asks for base64 by default and decodes it; ask explicitly through httpx too.
    r = client.embeddings.create(model="any", input=TEXTS[:2], encoding_format="base64")
    assert isinstance(r.data[0].embedding, str)
    got = np.frombuffer(__import__("base64").b64decode(r.data[0].embedding), "<f4")
    np.testing.assert_allclose(got, real_model.embed(TEXTS[0])[0], atol=1e-6)


def test_errors(served) -> None:  # noqa: ANN001
    url, _ = served
    auth = {"Authorization": f"Bearer {SERVE_KEY}"}
    for body, param in [({"input": 5}, "input"), ({"input": []}, "input"), ({"input": [""]}, "input"),
                        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
                        ({"input": "x", "dimensions": 7}, "dimensions"), ({"input": [[10**9]]}, "input"),
                        ({"input": "word " * 1100}, "input")]:
        r = httpx.post(f"{url}/v1/embeddings", json=body, headers=auth, timeout=60)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"] == param


def test_embeddings_while_streams_run(served, client, real_model) -> None:  # noqa: ANN001
    url, _ = served
    chat = openai.OpenAI(base_url=f"{url}/v1", api_key=SERVE_KEY, max_retries=0)
    msgs = [{"role": "user", "content": "Count from 1 to 20."}]
    want = real_model.chat(msgs, max_tokens=40, temperature=0)
    texts: list[str] = []

    def stream() -> None:
        pieces = chat.chat.completions.create(model="m", messages=msgs, max_tokens=40, temperature=0, stream=True)
        texts.append("".join(c.choices[0].delta.content or "" for c in pieces if c.choices))

    t = threading.Thread(target=stream)
    t.start()
    vectors = [client.embeddings.create(model="any", input=TEXTS) for _ in range(3)]
    t.join()
    assert texts == [want]  # the stream's slot was not touched by the embeddings
    for v in vectors:
        np.testing.assert_allclose([d.embedding for d in v.data], real_model.embed(TEXTS), atol=1e-6)
