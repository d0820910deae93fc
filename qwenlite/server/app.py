"""The Starlette app of ``qwenlite serve``: OpenAI routes over one continuous-batching scheduler.

The scheduler runs in its own thread and owns the model; handlers on the event loop parse and check a
request (``chat.openai``, the code the Python API's ``chat_completion`` runs too), submit it, and relay
the text pieces the scheduler emits through an asyncio queue (``call_soon_threadsafe``). The kernels
release the GIL, so the loop keeps accepting requests and sending chunks while a forward pass runs. A
client that goes away cancels its request: the slot is free after the current step.

One guard in front of every route enforces the API key (constant-time compare; ``/health`` and the
static chat page are open), counts responses by status for ``/metrics``, and turns anything unexpected
into a 500 in OpenAI's error shape, so no request can take the server down.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from qwenlite.chat import openai as proto
from qwenlite.errors import QwenliteError
from qwenlite.runtime.embed import embed_lists
from qwenlite.runtime.engine import Engine
from qwenlite.runtime.scheduler import QueueFullError, Result, Update
from qwenlite.runtime.scheduler import Request as Job

log = logging.getLogger("qwenlite.server")

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]

OPEN_PATHS = frozenset({"/health", "/"})
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on the inputs of one embeddings request


class _Guard:
    """Pure ASGI middleware: API key, status counting, last-resort 500."""

    def __init__(self, app: ASGIApp, api_key: str | None, statuses: Counter[int]) -> None:
        self.app, self.key, self.statuses = app, api_key.encode() if api_key else None, statuses

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counted(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.statuses[message["status"]] += 1
            await send(message)

        if self.key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + self.key):
                err = proto.RequestError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key", kind="authentication_error")
                await _error_response(err)(scope, receive, counted)
                return
        try:
            await self.app(scope, receive, counted)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            if not started:
                err = proto.RequestError(500, "internal server error", code="internal_error", kind="server_error")
                await _error_response(err)(scope, receive, counted)


def _error_response(err: proto.RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class Server:
    """Routes and state of one served model."""

    def __init__(self, model: Any, *, queue: int, max_body: int, n_batch: int | None, alias: str | None) -> None:
        self.model = model
        self.scheduler = model.scheduler(max_queue=queue, n_batch=n_batch)
        self.max_body = max_body
        self.name = alias or model.path.stem
        self.created = int(time.time())
        self.statuses: Counter[int] = Counter()
        self.page = resources.files("qwenlite.server").joinpath("page.html").read_text(encoding="utf-8")
        self._embedder: Engine | None = None

    # ---- request plumbing ------------------------------------------------------------------------

    async def _json(self, request: Request) -> dict[str, Any]:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            raise proto.RequestError(413, f"request body is {size} bytes; the limit is {self.max_body}",
                             code="request_too_large")
        chunks, total = [], 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > self.max_body:
                    raise proto.RequestError(413, f"request body exceeds the limit of {self.max_body} bytes",
                                     code="request_too_large")
                chunks.append(chunk)
        except ClientDisconnect:
            raise proto.RequestError(400, "the client disconnected while sending the body") from None
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as exc:
            raise proto.RequestError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise proto.RequestError(400, "the body must be a JSON object", code="invalid_json")
        return body

    def _submit(self, c: proto.Completion, emit: Callable[[Update], None]) -> Job:
        try:
            return self.scheduler.submit(c.request(emit))
        except QueueFullError as exc:
            raise proto.RequestError(503, str(exc), code="server_busy", kind="server_error",
                                     headers={"Retry-After": "1"}) from None
        except QwenliteError as exc:
            raise proto.RequestError(400, str(exc)) from None

    async def _complete(self, request: Request, kind: str, c: proto.Completion) -> Response:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()

        def emit(u: Update) -> None:  # scheduler thread
            loop.call_soon_threadsafe(updates.put_nowait, u)

        job = self._submit(c, emit)
        asm = c.assembler(kind, self.name, self.model.tokenizer)
        if c.stream:
            return StreamingResponse(self._events(job, updates, asm), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        res = await self._wait(request, job, updates)
        if res is None:  # the client went away; nobody reads this
            return Response(status_code=499)
        if res.finish_reason == "error":
            raise proto.RequestError(500, res.error or "generation failed", code="internal_error",
                                     kind="server_error")
        return JSONResponse(asm.response(res))

    async def _wait(self, request: Request, job: Job, updates: asyncio.Queue[Update]) -> Result | None:
        async def gone() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        watch = asyncio.ensure_future(gone())
        try:
            while True:
                get = asyncio.ensure_future(updates.get())
                done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    job.cancel()
                    return None
                if get.result().result is not None:
                    return get.result().result
        finally:
            watch.cancel()
            job.cancel()  # a no-op once finished

    async def _events(self, job: Job, updates: asyncio.Queue[Update], asm: proto.Assembler) -> AsyncIterator[str]:
        try:
            yield _sse(asm.first())
            while True:
                u = await updates.get()
                for chunk in asm.chunks(u):
                    yield _sse(chunk)
                if u.result is not None:
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancel()  # the client left (or we are done): free the slot within one step

    # ---- routes ----------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        body = await self._json(request)
        c = await run_in_threadpool(proto.prepare_chat, self.model, body)
        return await self._complete(request, "chat", c)

    async def completions(self, request: Request) -> Response:
        body = await self._json(request)
        c = await run_in_threadpool(proto.prepare_text, self.model, body)
        return await self._complete(request, "text", c)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "qwenlite",
             "meta": {"n_ctx_per_slot": self.model.n_ctx, "n_slots": self.model.n_seq,
                      "n_vocab": self.model.config.n_vocab, "kv_type": self.model.kv_type}}]})

    async def health(self, request: Request) -> Response:
        s = self.scheduler
        busy = s.n_busy
        return JSONResponse({"status": "ok", "slots_idle": len(s.slots) - busy, "slots_processing": busy,
                             "queue": s.n_queued})

    async def metrics(self, request: Request) -> Response:
        s, st = self.scheduler, self.scheduler.stats
        rows: list[tuple[str, str, str, float]] = [
            ("requests_total", "counter", "requests accepted by the scheduler", st.requests),
            ("prompt_tokens_total", "counter", "prompt tokens of admitted requests", st.prompt_tokens),
            ("prompt_tokens_cached_total", "counter", "prompt tokens reused from a slot's cache", st.cached_tokens),
            ("prompt_tokens_evaluated_total", "counter", "prompt tokens evaluated", st.prompt_evaluated),
            ("completion_tokens_total", "counter", "tokens generated", st.completion_tokens),
            ("decode_steps_total", "counter", "batched forward passes", st.steps),
            ("busy_seconds_total", "counter", "seconds spent in forward passes", st.busy_seconds),
            ("requests_processing", "gauge", "slots serving a request", s.n_busy),
            ("requests_queued", "gauge", "requests waiting for a slot", s.n_queued),
            ("slots", "gauge", "sequence slots", len(s.slots)),
            ("tokens_per_second", "gauge", "generated tokens per second over the last 10 s",
             st.tokens_per_second()),
        ]
        lines = []
        for name, kind, help_, value in rows:
            lines += [f"# HELP qwenlite_{name} {help_}", f"# TYPE qwenlite_{name} {kind}", f"qwenlite_{name} {value}"]
        lines += ["# HELP qwenlite_requests_finished_total finished requests by reason",
                  "# TYPE qwenlite_requests_finished_total counter"]
        lines += [f'qwenlite_requests_finished_total{{reason="{k}"}} {v}' for k, v in sorted(st.finished.items())]
        lines += ["# HELP qwenlite_http_responses_total HTTP responses by status",
                  "# TYPE qwenlite_http_responses_total counter"]
        lines += [f'qwenlite_http_responses_total{{status="{k}"}} {v}' for k, v in sorted(self.statuses.items())]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def tokenize(self, request: Request) -> Response:
        body = await self._json(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise proto.RequestError(400, "content: must be a string", param="content", code="invalid_type")
        tok = self.model.tokenizer
        special = proto.boolean(body, "parse_special", True)  # llama-server's default
        add = proto.boolean(body, "add_special", False)
        ids = await run_in_threadpool(self.model.tokenize, content, special)
        if add and tok.add_bos and tok.bos_id is not None:
            ids = [tok.bos_id, *ids]
        pieces = proto.boolean(body, "with_pieces", False)
        return JSONResponse({"tokens": proto.token_pieces(tok, ids) if pieces else ids})

    async def embeddings(self, request: Request) -> Response:
        """OpenAI's ``POST /v1/embeddings``: ``input`` a string, a list of strings, a token list or a list
        of token lists; ``encoding_format`` "float" or "base64" (little-endian float32). Vectors are the
        file's pooling (mean by default), unit length, computed in the scheduler's thread over an
        engine of their own between decode steps."""
        body = await self._json(request)
        lists = await run_in_threadpool(self._embedding_inputs, body.get("input"))
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise proto.RequestError(400, "encoding_format: must be 'float' or 'base64'", param="encoding_format")
        if body.get("dimensions") not in (None, self.model.config.n_embd):
            raise proto.RequestError(400, f"dimensions: this model's embeddings have {self.model.config.n_embd}",
                                     param="dimensions")
        future = self.scheduler.call(lambda: self._embed(lists))
        try:
            vectors = await asyncio.wrap_future(future)
        except QwenliteError as exc:
            raise proto.RequestError(400, str(exc), param="input") from None
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()}
                for i, v in enumerate(vectors)]
        n = sum(len(ids) for ids in lists)
        return JSONResponse({"object": "list", "data": data, "model": self.name,
                             "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _embedding_inputs(self, value: Any) -> list[list[int]]:
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
            value = [value]
        if not isinstance(value, list) or not value or len(value) > MAX_EMBEDDING_INPUTS:
            raise proto.RequestError(400, f"input: must be a string, a token list, or a list of 1 to "
                                          f"{MAX_EMBEDDING_INPUTS} of them", param="input")
        try:
            lists = [self.model._ids(v, False, f"input[{i}]") for i, v in enumerate(value)]
        except QwenliteError as exc:
            raise proto.RequestError(400, str(exc), param="input") from None
        return lists

    def _embed(self, lists: list[list[int]]) -> Any:
        """In the scheduler's thread: an engine of this server's own for embeddings (its KV cache is
        address space until used), so the slots of running requests are never touched."""
        if self._embedder is None:
            self._embedder = Engine(self.model.network, self.model.n_ctx, n_seq=min(4, self.model.n_seq),
                                    kv_type=self.model.kv_type, n_batch=self.model.runtime.n_batch)
        return embed_lists(self._embedder, lists, self.model.default_pooling, True)

    async def detokenize(self, request: Request) -> Response:
        body = await self._json(request)
        ids = body.get("tokens", [])
        n = self.model.config.n_vocab
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise proto.RequestError(400, "tokens: must be a list of token ids", param="tokens", code="invalid_type")
        bad = [t for t in ids if not 0 <= t < n]
        if bad:
            raise proto.RequestError(400, f"tokens: id {bad[0]} out of range 0..{n - 1}", param="tokens")
        return JSONResponse({"content": self.model.detokenize(ids)})

    async def page_route(self, request: Request) -> Response:
        return HTMLResponse(self.page)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, proto.RequestError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
    return _error_response(proto.RequestError(exc.status_code, msg, code=str(exc.status_code), kind=kind))


def build(model: Any, *, api_key: str | None = None, queue: int = 64, cors_origin: str | None = None,
          max_body: int = 4 << 20, n_batch: int | None = None, alias: str | None = None) -> Starlette:
    """The ASGI app for a loaded ``Model`` (its scheduler starts and stops with the app's lifespan)."""
    srv = Server(model, queue=queue, max_body=max_body, n_batch=n_batch, alias=alias)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        srv.scheduler.start()
        try:
            yield
        finally:
            await run_in_threadpool(srv.scheduler.close)

    routes = [
        Route("/v1/chat/completions", srv.chat_completions, methods=["POST"]),
        Route("/chat/completions", srv.chat_completions, methods=["POST"]),
        Route("/v1/completions", srv.completions, methods=["POST"]),
        Route("/completions", srv.completions, methods=["POST"]),
        Route("/v1/models", srv.models, methods=["GET"]),
        Route("/models", srv.models, methods=["GET"]),
        Route("/health", srv.health, methods=["GET"]),
        Route("/metrics", srv.metrics, methods=["GET"]),
        Route("/v1/embeddings", srv.embeddings, methods=["POST"]),
        Route("/embeddings", srv.embeddings, methods=["POST"]),
        Route("/tokenize", srv.tokenize, methods=["POST"]),
        Route("/detokenize", srv.detokenize, methods=["POST"]),
        Route("/", srv.page_route, methods=["GET"]),
    ]
    middleware = []
    if cors_origin:
        middleware.append(Middleware(CORSMiddleware, allow_origins=[cors_origin], allow_methods=["GET", "POST"],
                                     allow_headers=["Authorization", "Content-Type"]))
    middleware.append(Middleware(_Guard, api_key=api_key, statuses=srv.statuses))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={proto.RequestError: _api_error, HTTPException: _http_error})
    app.state.server = srv
    return app
