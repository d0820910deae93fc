"""``qwenlite serve``: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

    import qwenlite
    qwenlite.serve("model.gguf", port=8080, parallel=4)       # blocks, like the CLI
    app = qwenlite.server.create_app("model.gguf")             # an ASGI app to mount or run yourself

The HTTP stack (uvicorn + Starlette) is the optional ``server`` extra; without it these functions
raise one clear error that names the install command.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from qwenlite.errors import QwenliteError

INSTALL_HINT = "qwenlite serve needs the server extra: pip install 'qwenlite[server]'"
DEFAULT_PARALLEL = 4
DEFAULT_QUEUE = 64
DEFAULT_MAX_BODY = 4 << 20  # 4 MiB: a full 32k-token prompt is ~130 kB of JSON


def _require() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise QwenliteError(f"{INSTALL_HINT} ({exc})") from None


def load_for_serving(model: str | os.PathLike[str], *, parallel: int = DEFAULT_PARALLEL, n_ctx: int | None = None,
                     threads: int | None = None, kv_type: str | None = None, n_batch: int | None = None) -> Any:
    """Load ``model`` with ``parallel`` sequence slots of ``n_ctx`` positions each and compile its kernels,
    so that the first request is not the one that waits for the compiler."""
    from qwenlite.api import DEFAULT_N_BATCH, load

    if parallel < 1:
        raise QwenliteError(f"--parallel must be >= 1, got {parallel}")
    m = load(model, n_threads=threads, n_ctx=n_ctx, n_seq=parallel, kv_type=kv_type,
             n_batch=n_batch or DEFAULT_N_BATCH)
    m.warmup()
    return m


def create_app(model: Any, *, parallel: int = DEFAULT_PARALLEL, n_ctx: int | None = None, threads: int | None = None,
               kv_type: str | None = None, api_key: str | None = None, queue: int = DEFAULT_QUEUE,
               cors_origin: str | None = None, max_body: int = DEFAULT_MAX_BODY, n_batch: int | None = None,
               alias: str | None = None) -> Any:
    """The Starlette app serving ``model`` (a path, or a loaded ``qwenlite.Model`` whose slots it uses)."""
    _require()
    from qwenlite.api import Model
    from qwenlite.server.app import build

    if queue < 0:
        raise QwenliteError(f"--queue must be >= 0, got {queue}")
    if max_body < 1:
        raise QwenliteError(f"the body limit must be >= 1 byte, got {max_body}")
    if not isinstance(model, Model):
        model = load_for_serving(model, parallel=parallel, n_ctx=n_ctx, threads=threads, kv_type=kv_type,
                                 n_batch=n_batch)
    return build(model, api_key=api_key, queue=queue, cors_origin=cors_origin, max_body=max_body,
                 n_batch=n_batch, alias=alias)


def serve(model: Any, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "info", **options: Any) -> None:
    """Serve ``model`` over HTTP until interrupted (what ``qwenlite serve`` runs); ``options`` are
    ``create_app``'s."""
    _require()
    import uvicorn

    if not 0 <= port <= 65535:
        raise QwenliteError(f"--port must be in 0..65535, got {port}")
    app = create_app(model, **options)
    srv = app.state.server
    print(f"qwenlite: serving {srv.name} on http://{host}:{port} ({srv.model.n_seq} slots of {srv.model.n_ctx} "
          f"tokens, KV {srv.model.kv_type}); chat page at /, OpenAI API at /v1", file=sys.stderr)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run()
    except OSError as exc:  # port in use, address not available
        raise QwenliteError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if not server.started:
        raise QwenliteError(f"cannot listen on {host}:{port} (see the message above)")
