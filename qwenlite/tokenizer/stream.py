"""Incremental detokenization for streaming generation.

A byte-level BPE token is a run of bytes, not of characters: an emoji or a CJK character is often
split over two or three tokens. Printing each token's bytes decoded on its own would show
replacement characters, so the stream holds back an incomplete UTF-8 tail until the token that
completes it arrives.
"""

from __future__ import annotations

import codecs

from qwenlite.tokenizer.bpe import Tokenizer


class StreamDecoder:
    """Feed token ids one at a time; get back only text made of complete characters.

    The concatenation of every ``feed`` result and the final ``flush`` equals
    ``tokenizer.decode(ids, special)`` for the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Text completed by this token (possibly empty while a character is still partial)."""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id, self._special))

    def flush(self) -> str:
        """Whatever is still held back, with an unfinished character as U+FFFD; resets the stream."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
