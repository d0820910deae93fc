"""Read and validate the tokenizer part of GGUF metadata.

Everything the encoder relies on is checked here, once, so that a hostile or inconsistent file
fails with one clear ``QwenliteError`` at load time instead of producing wrong ids later:
the token list and token types must agree, every normal token must be byte-level text, and the
vocabulary must be one where token ids are BPE ranks (see ``_check_ids_are_ranks``), because the
encoder hands the ids straight to tiktoken as ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np

from qwenlite.errors import QwenliteError, shown
from qwenlite.gguf import names as gn
from qwenlite.gguf.constants import TokenType
from qwenlite.tokenizer.bytelevel import texts_to_bytes
from qwenlite.tokenizer.pretokenizer import pattern_for


@dataclass(frozen=True)
class Vocab:
    """A validated byte-level BPE vocabulary.

    ``ranks`` maps the bytes of every normal token to its id (= its BPE rank); ``control`` and
    ``user_defined`` map the literal text of those tokens to their ids. ``pieces[i]`` is what
    token ``i`` renders as when special tokens are shown (control and user-defined tokens as their
    text, unused tokens as nothing, like llama.cpp's ``token_to_piece``).
    """

    model: str
    pre: str
    pattern: str
    types: np.ndarray
    ranks: dict[bytes, int]
    pieces: list[bytes]
    control: dict[str, int]
    user_defined: dict[str, int]
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    add_bos: bool
    chat_template: str | None


def _string_list(md: Mapping[str, Any], key: str) -> list[str]:
    value = md.get(key)
    if value is None:
        raise QwenliteError(f"tokenizer metadata: '{key}' is missing")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise QwenliteError(f"tokenizer metadata: '{key}' must be an array of strings")
    if not set(map(type, value)) <= {str}:
        raise QwenliteError(f"tokenizer metadata: '{key}' must be an array of strings")
    return list(value)


def _token_types(md: Mapping[str, Any], n_tokens: int) -> np.ndarray:
    key = gn.TOKEN_TYPE
    value = md.get(key)
    if value is None:
        raise QwenliteError(f"tokenizer metadata: '{key}' is missing")
    types = np.asarray(value)
    if types.ndim != 1 or not np.issubdtype(types.dtype, np.integer):
        raise QwenliteError(f"tokenizer metadata: '{key}' must be an array of integers")
    if len(types) != n_tokens:
        raise QwenliteError(
            f"tokenizer metadata: {n_tokens} tokens but {len(types)} token types; the file is inconsistent"
        )
    known = np.array([int(t) for t in TokenType])
    bad = ~np.isin(types, known)
    if bad.any():
        i = int(np.argmax(bad))
        raise QwenliteError(f"tokenizer metadata: token {i} has unknown token type {int(types[i])}")
    if (types == TokenType.BYTE).any():
        i = int(np.argmax(types == TokenType.BYTE))
        raise QwenliteError(
            f"tokenizer metadata: token {i} is a BYTE token, which a byte-level (gpt2) vocabulary never has"
        )
    return types.astype(np.int32)


def _optional_id(md: Mapping[str, Any], key: str, n_tokens: int) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise QwenliteError(f"tokenizer metadata: '{key}' must be an integer token id")
    if not 0 <= int(value) < n_tokens:
        raise QwenliteError(f"tokenizer metadata: '{key}' = {int(value)} is outside the vocabulary (0..{n_tokens - 1})")
    return int(value)


def _optional_str(md: Mapping[str, Any], key: str) -> str | None:
    value = md.get(key)
    if value is not None and not isinstance(value, str):
        raise QwenliteError(f"tokenizer metadata: '{key}' must be a string")
    return value


def _check_ids_are_ranks(merges: list[str], normal_ids: dict[str, int], n_multibyte: int) -> None:
    """Fail unless the merge list is exactly "token ids are BPE ranks".

    tiktoken merges the adjacent pair whose *result* has the lowest id; HF and llama.cpp merge the
    pair that comes first in the merge list. The two agree when every multi-byte normal token is
    produced by exactly one merge, from two tokens with smaller ids, and the merge list is sorted
    by result id. That holds for vocabularies converted from tiktoken (Qwen, cl100k) and GPT-2;
    a vocabulary where it does not hold would be silently mis-tokenized, so it is refused.
    """
    if len(merges) != n_multibyte:
        raise QwenliteError(
            f"tokenizer vocabulary: {len(merges)} merges for {n_multibyte} multi-byte tokens; "
            "qwenlite needs a BPE vocabulary whose token ids are merge ranks"
        )
    if not merges:
        return
    # Byte-level token text never holds a space or a newline, so each merge is "left right" and
    # the whole list can be cut up with a few C-level string operations instead of 150k splits.
    joined = "\n".join(merges)
    halves = joined.replace(" ", "\n").split("\n")
    results = joined.replace(" ", "").split("\n")
    lefts, rights = halves[0::2], halves[1::2]
    well_formed = len(halves) == 2 * len(merges) and len(results) == len(merges)
    if not well_formed or list(map(str.__add__, lefts, rights)) != results:
        i = next(k for k, m in enumerate(merges) if m.count(" ") != 1 or "\n" in m)
        raise QwenliteError(f"tokenizer vocabulary: merge {i} ({shown(merges[i])}) is not two tokens")
    get = normal_ids.get
    n = len(merges)
    a = np.fromiter(map(get, lefts, repeat(-1)), np.int64, n)
    b = np.fromiter(map(get, rights, repeat(-1)), np.int64, n)
    r = np.fromiter(map(get, results, repeat(-1)), np.int64, n)
    bad = (a < 0) | (b < 0) | (r < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise QwenliteError(f"tokenizer vocabulary: merge {i} ({shown(merges[i])}) does not join two normal tokens")
    bad = (r <= a) | (r <= b)
    bad[1:] |= r[1:] <= r[:-1]
    if bad.any():
        i = int(np.argmax(bad))
        raise QwenliteError(
            f"tokenizer vocabulary: merge {i} ({shown(merges[i])}) gives token {int(r[i])} out of rank order; "
            "qwenlite needs a BPE vocabulary whose token ids are merge ranks"
        )


def _special_tables(texts: list[str], types: np.ndarray) -> tuple[dict[str, int], dict[str, int]]:
    """Text -> id for control (and unknown) tokens, and for user-defined tokens."""
    control: dict[str, int] = {}
    user_defined: dict[str, int] = {}
    wanted = (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN)
    for i in np.nonzero(np.isin(types, wanted))[0].tolist():
        text = texts[i]
        if not text:
            raise QwenliteError(f"tokenizer vocabulary: special token {i} has empty text")
        if text in control or text in user_defined:
            raise QwenliteError(f"tokenizer vocabulary: special token text {shown(text)} appears twice")
        table = user_defined if types[i] == TokenType.USER_DEFINED else control
        table[text] = i
    return control, user_defined


def read_vocab(md: Mapping[str, Any]) -> Vocab:
    """Validate GGUF tokenizer metadata and turn it into a ``Vocab``."""
    model = _optional_str(md, gn.TOKENIZER_MODEL)
    if model is None:
        raise QwenliteError(f"tokenizer metadata: '{gn.TOKENIZER_MODEL}' is missing")
    if model == "llama":
        raise QwenliteError(
            "tokenizer: SentencePiece ('llama') vocabularies are not supported; qwenlite runs byte-level "
            "BPE ('gpt2') vocabularies such as Qwen2's"
        )
    if model != "gpt2":
        raise QwenliteError(f"tokenizer: unsupported tokenizer model {shown(model)} (qwenlite supports 'gpt2')")
    # Files converted before llama.cpp recorded the pre-tokenizer carry no 'pre'; every byte-level
    # model qwenlite can run is a Qwen2-family model, so the Qwen2 split is the right default.
    pre = _optional_str(md, gn.TOKENIZER_PRE) or "qwen2"
    pattern = pattern_for(pre)

    texts = _string_list(md, gn.TOKENS)
    n = len(texts)
    if n == 0:
        raise QwenliteError("tokenizer metadata: the token list is empty")
    types = _token_types(md, n)
    merges = _string_list(md, gn.MERGES)

    normal = np.nonzero(types == TokenType.NORMAL)[0].tolist()
    normal_texts = [texts[i] for i in normal]
    if "" in normal_texts:
        raise QwenliteError(f"tokenizer vocabulary: token {normal[normal_texts.index('')]} is empty")
    normal_bytes = texts_to_bytes(normal_texts, normal)
    ranks = dict(zip(normal_bytes, normal))
    if len(ranks) != len(normal):
        seen: dict[bytes, int] = {}
        for raw, i in zip(normal_bytes, normal):
            if seen.setdefault(raw, i) != i:
                raise QwenliteError(f"tokenizer vocabulary: tokens {seen[raw]} and {i} spell the same bytes")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise QwenliteError(
            f"tokenizer vocabulary: no token for byte 0x{missing[0]:02x} ({len(missing)} bytes missing); "
            "a byte-level vocabulary needs all 256"
        )
    _check_ids_are_ranks(merges, dict(zip(normal_texts, normal)), len(ranks) - 256)

    control, user_defined = _special_tables(texts, types)
    pieces = [b""] * n
    for i, raw in zip(normal, normal_bytes):
        pieces[i] = raw
    for text, i in (*control.items(), *user_defined.items()):
        pieces[i] = text.encode("utf-8")

    add_bos = md.get(gn.ADD_BOS, False)
    if not isinstance(add_bos, (bool, np.bool_)):
        raise QwenliteError(f"tokenizer metadata: '{gn.ADD_BOS}' must be a boolean")

    return Vocab(
        model=model,
        pre=pre,
        pattern=pattern,
        types=types,
        ranks=ranks,
        pieces=pieces,
        control=control,
        user_defined=user_defined,
        bos_id=_optional_id(md, gn.BOS_ID, n),
        eos_id=_optional_id(md, gn.EOS_ID, n),
        eot_id=_optional_id(md, gn.EOT_ID, n),
        add_bos=bool(add_bos),
        chat_template=_optional_str(md, gn.CHAT_TEMPLATE),
    )
