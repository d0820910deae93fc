"""Pre-tokenizer regexes: how text is split into words before BPE runs on each word.

Keyed by GGUF ``tokenizer.ggml.pre``. The patterns are the ones in the models' own
``tokenizer.json`` (HF ``Split`` pre-tokenizer), written for tiktoken's regex engine.
"""

from __future__ import annotations

from qwenlite.errors import QwenliteError, shown

# Qwen2 / Qwen2.5: like cl100k but digits are split one by one (\p{N} without {1,3}).
QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PATTERNS: dict[str, str] = {"qwen2": QWEN2}


def pattern_for(pre: str) -> str:
    """The split regex for a ``tokenizer.ggml.pre`` name; QwenliteError for names qwenlite lacks."""
    try:
        return PATTERNS[pre]
    except KeyError:
        raise QwenliteError(
            f"tokenizer: unsupported pre-tokenizer {shown(pre)} (qwenlite supports: {', '.join(sorted(PATTERNS))})"
        ) from None
