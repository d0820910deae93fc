"""Oracle wrappers around the llama.cpp peer (llama-cpp-python built into `.peer/venv` by `make peer`).

The peer is deliberately NOT a dependency of qwenlite: it takes ~20 minutes to build and pins its own
ggml. It lives in a side virtual environment, and this module talks to it two ways:

* quantization goes straight to ``libggml-base.so`` through ctypes, in this process, because
  ``ggml_quantize_chunk`` is a plain C function with no state: that is the bit-exact oracle for our
  quantizers;
* everything that needs a llama.cpp model (tokenize, greedy decode, logits, speed) runs
  ``benchmarks/peer_worker.py`` under the side interpreter, exchanging JSON / ``.npy`` files, since the
  main interpreter does not have ``llama_cpp`` installed.

Tests mark themselves ``@pytest.mark.peer`` plus ``@requires_peer`` so they skip cleanly without it.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PEER_DIR = Path(os.environ.get("QWENLITE_PEER_DIR", REPO_ROOT / ".peer"))
PEER_PYTHON = PEER_DIR / "venv" / "bin" / "python"
PEER_WORKER = REPO_ROOT / "benchmarks" / "peer_worker.py"
LLAMA_CPP_SRC = PEER_DIR / "llama.cpp-src"


class PeerError(RuntimeError):
    """The peer is missing or one of its calls failed (the message carries its stderr)."""


def peer_lib_dir() -> Path | None:
    """The folder holding llama-cpp-python's shared libraries (libllama, libggml*), if built."""
    for candidate in sorted(PEER_DIR.glob("venv/lib/python3.*/site-packages/llama_cpp/lib")):
        if (candidate / "libggml-base.so").exists():
            return candidate
    return None


@functools.lru_cache(maxsize=1)
def peer_available() -> bool:
    """True when the side venv interpreter and the ggml libraries are both there."""
    return PEER_PYTHON.exists() and PEER_WORKER.exists() and peer_lib_dir() is not None


requires_peer = pytest.mark.skipif(
    not peer_available(), reason="llama.cpp peer not built (run `make peer`)"
)


# --------------------------------------------------------------------------------------------------
# ggml_quantize_chunk through ctypes


@functools.lru_cache(maxsize=1)
def _libggml() -> ctypes.CDLL:
    """Load libggml-base once and declare the few prototypes we call (wrong prototypes = garbage)."""
    lib_dir = peer_lib_dir()
    if lib_dir is None:
        raise PeerError("llama.cpp peer not built (run `make peer`)")
    lib = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    return lib


def ggml_quantize(qtype: int, x: np.ndarray) -> bytes:
    """Quantize ``x`` (float32 ``[rows, n]``) to ggml type ``qtype`` with ggml's own reference code.

    No importance matrix is passed, which selects the same reference quantizers llama-quantize uses
    without ``--imatrix``. Arguments are checked here because ggml answers bad ones with ``abort()``.
    """
    qtype = int(qtype)
    try:
        gguf.GGMLQuantizationType(qtype)
    except ValueError as exc:
        raise ValueError(f"unknown ggml type {qtype}") from exc
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"expected a [rows, n] array, got shape {x.shape}")
    rows, n = x.shape
    lib = _libggml()
    block = lib.ggml_blck_size(qtype)
    if block <= 0:
        raise ValueError(f"ggml type {qtype} has no block layout in this ggml build")
    if n % block:
        raise ValueError(f"row length {n} is not a multiple of the block size {block}")
    if lib.ggml_quantize_requires_imatrix(qtype):
        raise ValueError(f"ggml type {qtype} requires an importance matrix")
    row_bytes = lib.ggml_row_size(qtype, n)
    dst = np.zeros(rows * row_bytes, dtype=np.uint8)
    lib.ggml_quantize_init(qtype)
    written = lib.ggml_quantize_chunk(qtype, x.ctypes.data, dst.ctypes.data, 0, rows, n, None)
    if written != dst.nbytes:
        raise PeerError(f"ggml_quantize_chunk wrote {written} bytes, expected {dst.nbytes}")
    return dst.tobytes()


# --------------------------------------------------------------------------------------------------
# model-level calls through the side interpreter


def run_worker(request: dict[str, Any], timeout: float = 900.0) -> dict[str, Any]:
    """Run one ``peer_worker.py`` request in the side venv; returns its JSON answer.

    ``request`` gets an ``out`` directory added; the worker writes ``result.json`` (and any arrays
    as ``.npy``) there, so nothing large goes through pipes.
    """
    if not peer_available():
        raise PeerError("llama.cpp peer not built (run `make peer`)")
    with tempfile.TemporaryDirectory(prefix="qwenlite-peer-") as tmp:
        req = dict(request, out=tmp)
        req_path = Path(tmp) / "request.json"
        req_path.write_text(json.dumps(req))
        proc = subprocess.run(
            [str(PEER_PYTHON), str(PEER_WORKER), str(req_path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise PeerError(f"peer worker failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        result = json.loads((Path(tmp) / "result.json").read_text())
        for key, name in list(result.get("arrays", {}).items()):
            result[key] = np.load(Path(tmp) / name)
        return result


def llama_tokenize(model_path: str | os.PathLike, text: str, special: bool) -> list[int]:
    """llama.cpp's tokenization of ``text`` (no BOS added); ``special`` parses control tokens."""
    return llama_tokenize_many(model_path, [text], special)[0]


def llama_tokenize_many(model_path: str | os.PathLike, texts: list[str], special: bool) -> list[list[int]]:
    """Like ``llama_tokenize`` for many texts with one model load (one worker process)."""
    res = run_worker({"op": "tokenize", "model": str(model_path), "texts": list(texts), "special": special})
    return [[int(t) for t in ids] for ids in res["ids"]]


def llama_greedy(
    model_path: str | os.PathLike, prompt_ids: list[int], n: int, n_threads: int = 2
) -> list[int]:
    """Exactly ``n`` argmax tokens after ``prompt_ids`` (no stop on EOS, so prefixes compare)."""
    res = run_worker(
        {
            "op": "greedy",
            "model": str(model_path),
            "ids": [int(t) for t in prompt_ids],
            "n": int(n),
            "n_threads": int(n_threads),
        }
    )
    return [int(t) for t in res["ids"]]


def llama_logits(model_path: str | os.PathLike, ids: list[int], n_threads: int = 2) -> np.ndarray:
    """float32 ``[len(ids), n_vocab]`` logits llama.cpp computes for every position of ``ids``."""
    res = run_worker(
        {
            "op": "logits",
            "model": str(model_path),
            "ids": [int(t) for t in ids],
            "n_threads": int(n_threads),
        }
    )
    return res["logits"]
