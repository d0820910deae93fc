"""The Python API: ``m = qwenlite.load(path)``, then tokenize / logits / generate / chat.

A ``Model`` owns the mapped GGUF file, the tokenizer, the network and one ``Engine`` (KV cache). It is
not thread-safe: one generation at a time per model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numba
import numpy as np

from qwenlite.chat.generate import generate as _generate
from qwenlite.chat.sampler import Sampler, SamplerConfig
from qwenlite.chat.template import ChatTemplate
from qwenlite.errors import QwenliteError
from qwenlite.gguf.reader import GGUFFile
from qwenlite.model.config import ModelConfig
from qwenlite.model.engine import Engine
from qwenlite.model.qwen2 import Qwen2
from qwenlite.tokenizer import Tokenizer

DEFAULT_N_CTX = 4096


def _fits_in_memory(path: Path) -> bool:
    """Whether a copy of the whole file fits comfortably (half of the available memory): only then
    are the routed experts of a MoE model copied into the interleaved layout. Larger files (Qwen2
    57B-A14B is 35 GB) keep their experts in the mapped file, paged in on demand."""
    try:
        with open("/proc/meminfo") as fh:
            info = {k: v for k, _, v in (line.partition(":") for line in fh)}
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return path.stat().st_size <= available // 2


class Model:
    """A loaded Qwen2 / Qwen2-MoE model."""

    def __init__(self, path: str | os.PathLike[str], n_threads: int | None = None, n_ctx: int | None = None) -> None:
        if n_threads is not None:
            if n_threads < 1:
                raise QwenliteError(f"threads must be >= 1, got {n_threads}")
            numba.set_num_threads(min(n_threads, numba.config.NUMBA_NUM_THREADS))
        self.path = Path(path)
        self.file = GGUFFile(self.path)
        self.metadata = self.file.metadata
        self.config = ModelConfig.from_gguf(self.file)
        self.tokenizer = Tokenizer.from_metadata(self.metadata)
        n_ctx = n_ctx or min(self.config.n_ctx_train, DEFAULT_N_CTX)
        if n_ctx < 1:
            raise QwenliteError(f"context size must be >= 1, got {n_ctx}")
        self.n_ctx = n_ctx
        self.network = Qwen2(self.file, self.config, n_ctx, interleave_experts=_fits_in_memory(self.path))
        self.engine = Engine(self.network, n_ctx)
        self.template = ChatTemplate.from_metadata(self.metadata)

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text``; control-token text stays plain unless ``special`` is True."""
        return self.tokenizer.encode(text, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``float32 [len(ids), n_vocab]`` at every position, in a fresh context."""
        self.engine.reset()
        return self.engine.eval_all(ids)

    def generate(
        self,
        prompt_or_ids: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 40,
        top_p: float = 0.95,
        seed: int | None = None,
        stream: bool = False,
        *,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        stop: Sequence[str] = (),
        special: bool = False,
    ) -> str | Iterator[str]:
        """Raw completion of a prompt (text, or token ids) in a fresh context.

        Stops at an end-of-turn token, at a stop string, or after ``max_tokens``. With ``stream=True``
        returns an iterator of text pieces that never contains part of a stop marker.
        """
        ids = self.tokenize(prompt_or_ids, special=special) if isinstance(prompt_or_ids, str) else list(prompt_or_ids)
        sampler = Sampler(SamplerConfig(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed))
        self.engine.reset()
        pieces = _generate(self.engine, self.tokenizer, ids, max_tokens, sampler, stop_strings=stop)
        return pieces if stream else "".join(pieces)

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        max_tokens: int = 512,
        temperature: float = 0.0,
        stream: bool = False,
        *,
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        repeat_penalty: float = 1.0,
        seed: int | None = None,
    ) -> str | Iterator[str]:
        """The assistant's reply to a ChatML conversation (``[{"role": ..., "content": ...}, ...]``).

        Message text is tokenized with special parsing off, so ``<|im_end|>`` typed by a user stays
        text. The model's default system prompt applies when no system message is given.
        """
        ids = self.template.encode(self.tokenizer, messages)
        return self.generate(ids, max_tokens, temperature, top_k, top_p, seed, stream,
                             min_p=min_p, repeat_penalty=repeat_penalty)

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: str | os.PathLike[str], n_threads: int | None = None, n_ctx: int | None = None) -> Model:
    """Load a GGUF model (memory-mapped; nothing is copied but the small norm vectors)."""
    return Model(path, n_threads=n_threads, n_ctx=n_ctx)
