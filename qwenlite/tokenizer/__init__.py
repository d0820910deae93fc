"""Byte-level BPE tokenizer built from the GGUF vocabulary (tiktoken), and a streaming detokenizer."""

from qwenlite.tokenizer.bpe import Tokenizer
from qwenlite.tokenizer.stream import StreamDecoder

__all__ = ["StreamDecoder", "Tokenizer"]
