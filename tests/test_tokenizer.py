"""Tokenizer tests against independent oracles.

* llama.cpp's own vectors (``tests/data/ggml-vocab-qwen2.gguf{,.inp,.out}``, from the llama.cpp
  sources in the llama-cpp-python sdist): exact ids, on that vocab and on the real model's.
* HF ``tokenizers``: a tokenizer.json-equivalent (BPE from the same vocab and merges, NFC, the Qwen2
  Split regex, ByteLevel, added tokens) built inside the test; exact ids on a multilingual set.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import TokenType
from qwenlite.gguf.reader import GGUFFile
from qwenlite.tokenizer import StreamDecoder, Tokenizer
from qwenlite.tokenizer.bytelevel import byte_to_unicode
from qwenlite.tokenizer.pretokenizer import QWEN2

tokenizers = pytest.importorskip("tokenizers")

DATA = Path(__file__).parent / "data"
VOCAB = DATA / "ggml-vocab-qwen2.gguf"

# Qwen2.5's added tokens (ids 151643..151664) and their GGUF types, as in the real model file.
QWEN25_SPECIALS = [
    ("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<|object_ref_start|>", 3),
    ("<|object_ref_end|>", 3), ("<|box_start|>", 3), ("<|box_end|>", 3), ("<|quad_start|>", 3),
    ("<|quad_end|>", 3), ("<|vision_start|>", 3), ("<|vision_end|>", 3), ("<|vision_pad|>", 3),
    ("<|image_pad|>", 3), ("<|video_pad|>", 3), ("<tool_call>", 4), ("</tool_call>", 4),
    ("<|fim_prefix|>", 3), ("<|fim_middle|>", 3), ("<|fim_suffix|>", 3), ("<|fim_pad|>", 3),
    ("<|repo_name|>", 3), ("<|file_sep|>", 3),
]


def _metadata(path: Path) -> dict[str, Any]:
    with GGUFFile(path) as f:
        return dict(f.metadata)


@pytest.fixture(scope="module")
def vocab_md() -> dict[str, Any]:
    """llama.cpp's Qwen2 test vocabulary (Qwen1.5 specials: [PADnnn] user-defined tokens)."""
    return _metadata(VOCAB)


@pytest.fixture(scope="module")
def qwen25_md(vocab_md: dict[str, Any]) -> dict[str, Any]:
    """The test vocabulary with Qwen2.5's special-token layout, so no download is needed."""
    md = dict(vocab_md)
    tokens = list(md["tokenizer.ggml.tokens"])
    types = np.array(md["tokenizer.ggml.token_type"])
    base = 151643
    for k, (text, kind) in enumerate(QWEN25_SPECIALS):
        tokens[base + k] = text
        types[base + k] = kind
    types[base + len(QWEN25_SPECIALS):] = TokenType.UNUSED
    md["tokenizer.ggml.tokens"] = tokens
    md["tokenizer.ggml.token_type"] = types
    md["tokenizer.ggml.eos_token_id"] = 151645
    return md


@pytest.fixture(scope="module")
def tok(qwen25_md: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(qwen25_md)


@pytest.fixture(scope="module")
def real_md(real_model_path: Path) -> dict[str, Any]:
    return _metadata(real_model_path)


# -- llama.cpp vectors -------------------------------------------------------------------------------


def _vectors() -> list[tuple[str, list[int]]]:
    raw = (DATA / "ggml-vocab-qwen2.gguf.inp").read_text(encoding="utf-8")
    inputs = raw.split("\n__ggml_vocab_test__\n")
    if inputs[-1] == "":
        inputs.pop()
    outputs = (DATA / "ggml-vocab-qwen2.gguf.out").read_text(encoding="utf-8").split("\n")[: len(inputs)]
    return [(s, [int(t) for t in o.split()]) for s, o in zip(inputs, outputs)]


VECTORS = _vectors()


def test_vector_count() -> None:
    assert len(VECTORS) == 46


@pytest.mark.parametrize("nfc", [True, False], ids=["nfc", "no-nfc"])
def test_llama_cpp_vectors(vocab_md: dict[str, Any], nfc: bool) -> None:
    tk = Tokenizer.from_metadata(vocab_md, nfc=nfc)
    failures = [(s, tk.encode(s), want) for s, want in VECTORS if tk.encode(s) != want]
    assert not failures, failures[:3]
    for s, want in VECTORS:
        assert tk.decode(want) == s


def test_llama_cpp_vectors_real_model(real_md: dict[str, Any]) -> None:
    tk = Tokenizer.from_metadata(real_md)
    failures = [(s, tk.encode(s), want) for s, want in VECTORS if tk.encode(s) != want]
    assert not failures, failures[:3]


# -- HF tokenizers oracle ----------------------------------------------------------------------------


def _hf_tokenizer(md: dict[str, Any], *, special: bool, nfc: bool = True) -> Any:
    """A tokenizer.json-equivalent for ``md`` built with HF ``tokenizers``.

    Control tokens are added only when ``special`` is set: HF always matches added tokens, and
    plain-text encoding in qwenlite must not see control tokens at all.
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

    texts = md["tokenizer.ggml.tokens"]
    types = np.asarray(md["tokenizer.ggml.token_type"])
    # Specials sit in the model vocab too, so that add_tokens() keeps their GGUF ids (no merge can
    # produce them, so BPE never emits them on its own).
    kept = (types == TokenType.NORMAL) | (types == TokenType.USER_DEFINED) | (types == TokenType.CONTROL)
    vocab = {texts[i]: i for i in np.nonzero(kept)[0].tolist()}
    merges = [tuple(m.split(" ")) for m in md["tokenizer.ggml.merges"]]
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, ignore_merges=False))
    if nfc:
        hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    added = []
    for i in np.nonzero((types == TokenType.USER_DEFINED) | (types == TokenType.CONTROL))[0].tolist():
        if types[i] == TokenType.CONTROL and not special:
            continue
        added.append(AddedToken(texts[i], special=bool(types[i] == TokenType.CONTROL), normalized=False))
    hf.add_tokens(added)
    for t in added:
        assert hf.token_to_id(t.content) == md["tokenizer.ggml.tokens"].index(t.content)
    return hf


MULTILINGUAL: list[str] = json.loads((DATA / "tokenizer_multilingual.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def hf_plain(qwen25_md: dict[str, Any]) -> Any:
    return _hf_tokenizer(qwen25_md, special=False)


@pytest.fixture(scope="module")
def hf_special(qwen25_md: dict[str, Any]) -> Any:
    return _hf_tokenizer(qwen25_md, special=True)


def test_multilingual_set_size() -> None:
    assert len(MULTILINGUAL) >= 40


def test_multilingual_matches_hf(tok: Tokenizer, hf_plain: Any, hf_special: Any) -> None:
    mismatches = []
    for s in MULTILINGUAL:
        for special, hf in ((False, hf_plain), (True, hf_special)):
            want = hf.encode(s, add_special_tokens=False).ids
            got = tok.encode(s, special=special)
            if got != want:
                mismatches.append((s, special, got, want))
            assert tok.decode(got) == hf.decode(want, skip_special_tokens=False)
    assert not mismatches, mismatches[:3]


def test_multilingual_matches_hf_real_model(real_md: dict[str, Any]) -> None:
    tk = Tokenizer.from_metadata(real_md)
    hf = _hf_tokenizer(real_md, special=True)
    mismatches = [s for s in MULTILINGUAL if tk.encode(s, special=True) != hf.encode(s, add_special_tokens=False).ids]
    assert not mismatches


def test_plain_decode_roundtrip(tok: Tokenizer) -> None:
    for s in MULTILINGUAL:
        assert tok.decode(tok.encode(s)) == unicodedata.normalize("NFC", s)


# -- NFC: HF normalizes, llama.cpp does not -----------------------------------------------------------


def test_nfc_follows_hf_and_differs_from_llama_cpp(qwen25_md: dict[str, Any], tok: Tokenizer) -> None:
    decomposed = "Cafe\u0301 cre\u0300me bru\u0302le\u0301e"
    composed = unicodedata.normalize("NFC", decomposed)
    assert composed != decomposed
    raw = Tokenizer.from_metadata(qwen25_md, nfc=False)
    hf_nfc = _hf_tokenizer(qwen25_md, special=False, nfc=True)
    hf_raw = _hf_tokenizer(qwen25_md, special=False, nfc=False)

    assert tok.encode(decomposed) == tok.encode(composed) == hf_nfc.encode(decomposed).ids
    assert raw.encode(decomposed) == hf_raw.encode(decomposed).ids
    assert raw.encode(decomposed) != tok.encode(decomposed)
    assert raw.decode(raw.encode(decomposed)) == decomposed
    assert tok.decode(tok.encode(decomposed)) == composed


# -- special tokens ---------------------------------------------------------------------------------


def test_control_tokens_only_with_special(tok: Tokenizer) -> None:
    im_start, im_end = tok.id_of("<|im_start|>"), tok.id_of("<|im_end|>")
    assert (im_start, im_end) == (151644, 151645)
    text = "<|im_start|>user\nhi<|im_end|>"
    plain = tok.encode(text)
    assert im_start not in plain and im_end not in plain
    assert tok.decode(plain) == text
    parsed = tok.encode(text, special=True)
    assert parsed[0] == im_start and parsed[-1] == im_end
    assert parsed[1:-1] == tok.encode("user\nhi")


def test_user_defined_tokens_always_matched(tok: Tokenizer) -> None:
    call, end = tok.id_of("<tool_call>"), tok.id_of("</tool_call>")
    assert (call, end) == (151657, 151658)
    ids = tok.encode('<tool_call>\n{"a": 1}\n</tool_call>')
    assert ids[0] == call and ids[-1] == end
    assert not tok.is_control(call)


def test_unused_tokens_not_matched_and_render_empty(tok: Tokenizer) -> None:
    assert tok.id_of("[PAD151700]") is None
    assert 151700 not in tok.encode("[PAD151700]", special=True)
    assert tok.decode([151700]) == ""


def test_decode_special_flag(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nok<tool_call><|im_end|>", special=True)
    assert tok.decode(ids) == "<|im_start|>assistant\nok<tool_call><|im_end|>"
    assert tok.decode(ids, special=False) == "assistant\nok<tool_call>"
    assert tok.token_bytes(151645) == b"<|im_end|>"
    assert tok.token_bytes(151645, special=False) == b""


def test_vocab_facts(tok: Tokenizer) -> None:
    assert tok.n_vocab == 151936
    assert tok.eot_ids == {151643, 151645}
    assert tok.is_control(151643) and tok.is_control(151645) and not tok.is_control(9707)
    assert tok.id_of("Hello") is None


def test_real_model_facts(real_md: dict[str, Any]) -> None:
    real = Tokenizer.from_metadata(real_md)
    assert (real.bos_id, real.eos_id, real.add_bos, real.n_vocab) == (151643, 151645, False, 151936)
    assert real.eot_ids == {151643, 151645}
    assert real.vocab.chat_template is not None and "<|im_start|>" in real.vocab.chat_template


def test_eot_token_id_is_included(qwen25_md: dict[str, Any]) -> None:
    md = dict(qwen25_md, **{"tokenizer.ggml.eot_token_id": 151663})
    assert Tokenizer.from_metadata(md).eot_ids == {151643, 151645, 151663}


# -- streaming ----------------------------------------------------------------------------------------


def test_stream_decoder_holds_partial_characters(tok: Tokenizer) -> None:
    text = "Emoji 👨‍👩‍👧‍👦🫠 and 漢字の鬱 test ❤️‍🔥 done"
    ids = tok.encode(text)
    assert any(_invalid_utf8(tok.token_bytes(i)) for i in ids), "no token splits a character; test is vacuous"
    stream = StreamDecoder(tok)
    pieces = [stream.feed(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some token completed no character and was held back


def test_stream_decoder_flushes_truncated_character(tok: Tokenizer) -> None:
    ids = tok.encode("🫠")
    assert len(ids) > 1
    stream = StreamDecoder(tok)
    assert stream.feed(ids[0]) == ""
    assert stream.flush() == "\ufffd"
    assert stream.feed(tok.encode("ok")[0]) == "ok"


def test_stream_decoder_special_flag(tok: Tokenizer) -> None:
    ids = tok.encode("hi<|im_end|>", special=True)
    assert "".join(StreamDecoder(tok, special=False).feed(i) for i in ids) == "hi"
    assert "".join(StreamDecoder(tok).feed(i) for i in ids) == "hi<|im_end|>"


def _invalid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_decode_invalid_utf8_is_replaced(tok: Tokenizer) -> None:
    ids = tok.encode("🫠")
    assert tok.decode(ids[:1]) == "\ufffd"


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [151936, -1, 10**12])
def test_out_of_range_ids(tok: Tokenizer, bad: int) -> None:
    with pytest.raises(QwenliteError, match="outside the vocabulary"):
        tok.decode([9707, bad])
    with pytest.raises(QwenliteError, match="outside the vocabulary"):
        tok.token_bytes(bad)
    with pytest.raises(QwenliteError, match="outside the vocabulary"):
        StreamDecoder(tok).feed(bad)


def test_empty_and_unencodable_text(tok: Tokenizer) -> None:
    assert tok.encode("") == [] and tok.decode([]) == ""
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"


def test_non_integer_ids_and_text(tok: Tokenizer) -> None:
    with pytest.raises(QwenliteError, match="integer"):
        tok.decode(["12"])  # type: ignore[list-item]
    with pytest.raises(QwenliteError, match="takes text"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def tiny_md(**changes: Any) -> dict[str, Any]:
    """A small valid byte-level vocabulary: 256 bytes, four merges, three specials, one unused."""
    b2u = byte_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["he", "ll", "hell", "hello"]
    tokens += ["<|endoftext|>", "<|im_end|>", "<tool_call>", "[PAD1]"]
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([1] * 260 + [3, 3, 4, 5], dtype=np.int32),
        "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o"],
        "tokenizer.ggml.eos_token_id": 261,
        "tokenizer.ggml.bos_token_id": 260,
    }
    md.update(changes)
    return md


def test_tiny_vocab_works() -> None:
    tk = Tokenizer.from_metadata(tiny_md())
    assert tk.encode("hello") == [259]
    assert tk.encode("hell<tool_call>") == [258, 262]
    assert tk.encode("<|im_end|>", special=True) == [261]
    assert tk.eot_ids == {260, 261}


def _types(values: list[int]) -> np.ndarray:
    return np.array(values, dtype=np.int32)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"tokenizer.ggml.token_type": _types([1] * 263)}, "264 tokens but 263 token types"),
        ({"tokenizer.ggml.token_type": None}, "token_type' is missing"),
        ({"tokenizer.ggml.token_type": _types([1] * 260 + [3, 3, 4, 9])}, "unknown token type 9"),
        ({"tokenizer.ggml.token_type": _types([6] + [1] * 259 + [3, 3, 4, 5])}, "BYTE token"),
        ({"tokenizer.ggml.tokens": None}, "tokens' is missing"),
        ({"tokenizer.ggml.tokens": "abc"}, "array of strings"),
        ({"tokenizer.ggml.tokens": [1] * 264}, "array of strings"),
        ({"tokenizer.ggml.merges": ["l l", "h e", "he ll", "hell o"]}, "out of rank order"),
        ({"tokenizer.ggml.merges": ["h e", "l l", "hell o"]}, "3 merges for 4 multi-byte tokens"),
        ({"tokenizer.ggml.merges": ["h e", "l l", "he l l", "hello"]}, "not two tokens"),
        ({"tokenizer.ggml.merges": ["h e", "l l", "he ll", "he llo"]}, "does not join two normal tokens"),
        ({"tokenizer.ggml.model": "llama"}, "SentencePiece"),
        ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer model 'bert'"),
        ({"tokenizer.ggml.model": None}, "model' is missing"),
        ({"tokenizer.ggml.pre": "falcon"}, "unsupported pre-tokenizer 'falcon'"),
        ({"tokenizer.ggml.eos_token_id": 264}, "outside the vocabulary"),
        ({"tokenizer.ggml.bos_token_id": "1"}, "must be an integer"),
        ({"tokenizer.ggml.add_bos_token": "yes"}, "must be a boolean"),
    ],
)
def test_hostile_vocab(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(QwenliteError, match=message):
        Tokenizer.from_metadata(tiny_md(**changes))


def test_hostile_token_texts() -> None:
    tokens = tiny_md()["tokenizer.ggml.tokens"]
    dup = list(tokens)
    dup[259] = dup[0]  # two tokens spelling the same bytes
    with pytest.raises(QwenliteError, match="spell the same bytes"):
        Tokenizer.from_metadata(tiny_md(**{"tokenizer.ggml.tokens": dup}))
    spaced = list(tokens)
    spaced[259] = "hel lo"  # a raw space is not byte-level text
    with pytest.raises(QwenliteError, match="not valid byte-level BPE text"):
        Tokenizer.from_metadata(tiny_md(**{"tokenizer.ggml.tokens": spaced}))
    no_byte = list(tokens)
    no_byte[7] = "zz"
    with pytest.raises(QwenliteError, match="no token for byte 0x07"):
        Tokenizer.from_metadata(tiny_md(**{"tokenizer.ggml.tokens": no_byte}))
    foreign = list(tokens)
    foreign[259] = "\u4e00"
    with pytest.raises(QwenliteError, match="not valid byte-level BPE text"):
        Tokenizer.from_metadata(tiny_md(**{"tokenizer.ggml.tokens": foreign}))
    empty = list(tokens)
    empty[259] = ""
    with pytest.raises(QwenliteError, match="token 259 is empty"):
        Tokenizer.from_metadata(tiny_md(**{"tokenizer.ggml.tokens": empty}))
    twice = list(tokens)
    twice[262] = "<|im_end|>"
    with pytest.raises(QwenliteError, match="appears twice"):
        Tokenizer.from_metadata(tiny_md(**{"tokenizer.ggml.tokens": twice}))
