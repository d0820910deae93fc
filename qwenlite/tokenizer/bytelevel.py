"""GPT-2 byte-level alphabet: how GGUF stores arbitrary bytes as printable token text.

Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) spell every byte 0..255 as one
printable code point so that token strings never contain whitespace or control characters: bytes
that are printable Latin-1 stand for themselves, the other 68 are shifted to U+0100 and up, in
byte order. Token text must be mapped back through this table to get the bytes the tokenizer
really works on.
"""

from __future__ import annotations

from bisect import bisect_right
from functools import lru_cache
from itertools import accumulate

from qwenlite.errors import QwenliteError


def _printable_bytes() -> list[int]:
    """Bytes that GPT-2 keeps as their own Latin-1 code point: '!'..'~', '¡'..'¬', '®'..'ÿ'."""
    return [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """The GPT-2 table byte -> printable character."""
    keep = set(_printable_bytes())
    table: dict[int, str] = {}
    shifted = 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@lru_cache(maxsize=1)
def _decode_table() -> dict[int, int | str]:
    """``str.translate`` table: alphabet character -> Latin-1 character of its byte.

    Latin-1 characters that are *not* in the alphabet (space, control characters, ...) are mapped
    to U+FFFF so that the following ``encode("latin-1")`` fails on them instead of silently
    accepting token text that no byte-level converter could have written.
    """
    table: dict[int, int | str] = {cp: "\uffff" for cp in range(256)}
    for b, ch in byte_to_unicode().items():
        table[ord(ch)] = b
    return table


def texts_to_bytes(texts: list[str], token_ids: list[int]) -> list[bytes]:
    """Bytes of many token strings at once (``token_ids`` name them in errors).

    Translating one joined string and slicing the result is several times faster than
    translating 150k short strings one by one, which matters for load time.
    """
    ends = list(accumulate(map(len, texts)))
    try:
        blob = "".join(texts).translate(_decode_table()).encode("latin-1")
    except UnicodeEncodeError as err:
        k = bisect_right(ends, err.start)
        raise QwenliteError(
            f"tokenizer vocabulary: token {token_ids[k]} ({texts[k]!r}) is not valid byte-level BPE text"
        ) from None
    return [blob[s:e] for s, e in zip([0, *ends[:-1]], ends)]
