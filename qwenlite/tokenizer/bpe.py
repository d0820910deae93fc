"""Byte-level BPE tokenizer for Qwen2 GGUF vocabularies, encoding with tiktoken.

Behaviour, and where it follows whom:

* Special tokens. Control tokens (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, ...) are
  recognised in text only with ``encode(text, special=True)``; in plain user text they are ordinary
  characters, so a user cannot inject a turn boundary. User-defined tokens (e.g. ``<tool_call>``)
  are always matched, as HF ``tokenizers`` and llama.cpp both do. Overlapping candidates are
  resolved longest-first, like llama.cpp.
* Normalization. Qwen2's ``tokenizer.json`` applies NFC before splitting and the models were
  trained on that; llama.cpp skips it. qwenlite follows HF by default (``nfc=True``): decomposed
  text such as ``"e\\u0301"`` is encoded as the precomposed ``"é"`` would be. For text that is
  already NFC (almost all text) both agree; ``nfc=False`` gives llama.cpp's ids.
* Decoding follows llama.cpp's ``common_detokenize`` default: ``special=True`` renders control
  tokens as their text, ``special=False`` drops them. User-defined tokens are always rendered and
  unused (padding) tokens never are. Invalid UTF-8 becomes U+FFFD.
* Lone surrogates in input text (not encodable as UTF-8) are encoded as U+FFFD, as tiktoken does.
* Token ids are used directly as tiktoken ranks; ``vocab.read_vocab`` refuses vocabularies where
  the merge list says otherwise.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tiktoken

from qwenlite.errors import QwenliteError
from qwenlite.gguf.constants import TokenType
from qwenlite.tokenizer.vocab import Vocab, read_vocab

# Longest whitespace run handed to tiktoken in one piece (see ``Tokenizer._encode_plain``).
MAX_SPACE_RUN = 4096
_LONG_SPACE = re.compile(r"\s{" + str(MAX_SPACE_RUN + 1) + ",}")


def _special_splitter(texts: Iterable[str]) -> re.Pattern[str] | None:
    """A regex that finds any of ``texts``, preferring the longest at each position."""
    ordered = sorted(texts, key=len, reverse=True)
    if not ordered:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")")


class Tokenizer:
    """Encode text to token ids and back for one GGUF vocabulary."""

    def __init__(self, vocab: Vocab, *, nfc: bool = True) -> None:
        self.vocab = vocab
        self.nfc = nfc
        self._encoding = tiktoken.Encoding(
            name=f"qwenlite-{vocab.pre}",
            pat_str=vocab.pattern,
            mergeable_ranks=vocab.ranks,
            special_tokens={},
        )
        self._pieces = vocab.pieces
        self._specials = {**vocab.control, **vocab.user_defined}
        self._split_user = _special_splitter(vocab.user_defined)
        self._split_all = _special_splitter(self._specials)
        self._control_ids = frozenset(
            int(i) for i in np.nonzero((vocab.types == TokenType.CONTROL) | (vocab.types == TokenType.UNKNOWN))[0]
        )

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], *, nfc: bool = True) -> Tokenizer:
        """Build from a GGUF metadata dict (``qwenlite.gguf.reader.GGUFFile(path).metadata``)."""
        return cls(read_vocab(md), nfc=nfc)

    # -- vocabulary facts -------------------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        """Number of token ids, special and padding tokens included."""
        return len(self._pieces)

    @property
    def bos_id(self) -> int | None:
        return self.vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.vocab.eos_id

    @property
    def add_bos(self) -> bool:
        """Whether prompts should start with BOS (false for Qwen2)."""
        return self.vocab.add_bos

    @property
    def eot_ids(self) -> frozenset[int]:
        """Ids that end a turn: EOS, EOT, ``<|im_end|>`` and ``<|endoftext|>``.

        Qwen models end a reply with ``<|im_end|>`` but sometimes emit ``<|endoftext|>`` instead;
        stopping on only one of them is the classic never-ending-generation bug.
        """
        ids = {self.vocab.eos_id, self.vocab.eot_id, self.id_of("<|im_end|>"), self.id_of("<|endoftext|>")}
        return frozenset(i for i in ids if i is not None)

    def is_control(self, token_id: int) -> bool:
        """True for control (and unknown) tokens: the ones hidden by ``decode(special=False)``."""
        self._check_id(token_id)
        return int(token_id) in self._control_ids

    @property
    def control_tokens(self) -> dict[str, int]:
        """Text -> id of the control tokens: what ``encode(special=True)`` recognises beyond the
        always-matched user-defined tokens (chat templates write them; user text must not)."""
        return dict(self.vocab.control)

    def id_of(self, text: str) -> int | None:
        """Id of the control or user-defined token spelled ``text``, or None."""
        return self._specials.get(text)

    # -- encoding ---------------------------------------------------------------------------------

    def encode(self, text: str, special: bool = False) -> list[int]:
        """Token ids for ``text`` (no BOS is added; see ``add_bos``).

        With ``special=True`` control-token text such as ``<|im_end|>`` becomes that token;
        otherwise it is tokenized as plain characters.
        """
        if not isinstance(text, str):
            raise QwenliteError(f"tokenizer: encode() takes text, not {type(text).__name__}")
        splitter = self._split_all if special else self._split_user
        if splitter is None:
            return self._encode_plain(text)
        ids: list[int] = []
        # re.split with one capture group alternates plain text (even) and special tokens (odd).
        for k, part in enumerate(splitter.split(text)):
            if k % 2:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self._encode_plain(part))
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if len(text) <= MAX_SPACE_RUN:
            return self._ordinary(text)
        # tiktoken's regex engine overflows its stack (a Rust panic, not an Exception) on a whitespace
        # run of ~10^6 characters, where the split pattern's look-ahead backtracks. Runs longer than
        # MAX_SPACE_RUN are cut into pieces of that size; the run's last character stays with the text
        # after it, as the split pattern would keep it (" word"). Shorter runs, that is all real text,
        # tokenize exactly as in one call; 10 MB of spaces takes ~1 s.
        ids: list[int] = []
        pos = 0
        for m in _LONG_SPACE.finditer(text):
            a, b = m.span()
            if a > pos:
                ids.extend(self._ordinary(text[pos:a]))
            for c in range(a, b - 1, MAX_SPACE_RUN):
                ids.extend(self._ordinary(text[c : min(c + MAX_SPACE_RUN, b - 1)]))
            pos = b - 1
        ids.extend(self._ordinary(text[pos:]))
        return ids

    def _ordinary(self, text: str) -> list[int]:
        try:
            return self._encoding.encode_ordinary(text)
        except BaseException as exc:  # pyo3's PanicException derives from BaseException
            if type(exc).__name__ != "PanicException":
                raise
            raise QwenliteError(f"tokenizer: the BPE engine failed on a text of {len(text)} characters") from None

    # -- decoding ---------------------------------------------------------------------------------

    def _check_id(self, token_id: int) -> None:
        if isinstance(token_id, bool) or not isinstance(token_id, (int, np.integer)):
            raise QwenliteError(f"tokenizer: token id must be an integer, got {type(token_id).__name__}")
        if not 0 <= token_id < len(self._pieces):
            raise QwenliteError(
                f"tokenizer: token id {int(token_id)} is outside the vocabulary (0..{len(self._pieces) - 1})"
            )

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes token ``token_id`` stands for (control tokens: their text, or b"" if not ``special``).

        A normal token may hold part of a UTF-8 character; use ``decode`` or ``StreamDecoder`` for text.
        """
        self._check_id(token_id)
        if not special and int(token_id) in self._control_ids:
            return b""
        return self._pieces[int(token_id)]

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """Text of a token sequence; invalid UTF-8 becomes U+FFFD."""
        return b"".join(self.token_bytes(i, special) for i in ids).decode("utf-8", errors="replace")
