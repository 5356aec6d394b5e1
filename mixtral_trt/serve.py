"""``mixtral-build serve``: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over one executor.

Every request is one :meth:`Executor.submit`; the executor's loop thread batches whatever is in
flight, so concurrent clients share each decode step. A client that goes away (mid-stream or
while waiting for a whole completion) cancels its request, which frees its slot. FastAPI,
uvicorn and pydantic are imported when a server is made, so the command line works without them.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations (Request) at run time.
import asyncio
import contextlib
import logging
import socket
import time
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 << 20  # far above any prompt a build can take (max_seq_len ids of ~7 JSON bytes each)
OWNER = "mixtral-trt"
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # the runtime's reasons -> OpenAI's


def create_app(model, model_name: str, close_on_exit: bool = True):
    """The ASGI app serving ``model`` (a loaded :class:`runtime.Model`) as ``model_name``. Its
    lifespan starts the executor's loop thread, and stops it (``close_on_exit``: also cancels
    what is left) at shutdown."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException

    from . import serve_schema as schema
    from .serve_metrics import Metrics

    executor = model.executor
    metrics = Metrics(executor)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        executor.start()
        try:
            yield
        finally:
            executor.close() if close_on_exit else executor.stop()

    app = FastAPI(title=f"mixtral-trt: {model_name}", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.model, app.state.metrics = model, metrics

    @app.exception_handler(schema.ApiError)
    async def api_error(request, exc: schema.ApiError):
        if exc.code not in ("cancelled", "generation_failed"):  # those were queued: counted as ended
            metrics.reject(exc.status)
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # unknown route, wrong method
        error = schema.ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", None,
                                "not_found" if exc.status_code == 404 else "invalid_request")  # fmt: skip
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc: RequestValidationError):  # a path parameter (the body is ours)
        error = schema.ApiError(400, f"{request.url.path}: {exc.errors()[0].get('msg', 'invalid request')}", None,
                                "invalid_request")  # fmt: skip
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        error = schema.ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, None, "server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health():
        ok = executor.running
        return JSONResponse({"status": "ok" if ok else "stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": OWNER,
                "max_model_len": model.backend.max_seq_len}  # fmt: skip

    created = int(time.time())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        _check_model(name, model_name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        request_ = schema.parse(await _read_body(request))
        if request_.model is not None:
            _check_model(request_.model, model_name)
        prompt, params = schema.prompt_of(request_), schema.sampling_of(request_)
        handle = await _submit(executor, prompt, params, schema)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if request_.stream:
            include_usage = request_.stream_options is not None and request_.stream_options.include_usage
            events = _events(handle, meta, include_usage, metrics, schema)
            return _sse_response(handle, events, metrics)
        result = await _complete(handle, request, metrics, schema)
        return _completion(meta, result, [_choice(result.text or "", result.output_ids, _finish(result))])

    return app


def _check_model(name: str, model_name: str) -> None:
    from .serve_schema import ApiError

    if name != model_name:
        raise ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r} (GET /v1/models)",
                       "model", "model_not_found")  # fmt: skip


async def _read_body(request) -> bytes:
    """The request body (JSON, at most MAX_BODY_BYTES)."""
    from starlette.requests import ClientDisconnect

    from .serve_schema import ApiError

    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(415, f"Content-Type {kind!r} is not accepted; send the body as JSON with "
                            "Content-Type: application/json", None, "unsupported_media_type")  # fmt: skip
    too_big = ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", None, "body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise too_big
    except ClientDisconnect:
        raise ApiError(400, "the request body ended early (the client disconnected)", None, "incomplete_body") from None
    return bytes(body)


async def _submit(executor, prompt, params, schema):
    """Queue the request (tokenizing off the event loop). If this handler is cancelled meanwhile
    (server shutdown), the request it made is cancelled as soon as it exists."""
    from mixtral_trt.runtime import GenerationError, QueueFullError

    task = asyncio.ensure_future(asyncio.to_thread(executor.submit, prompt, params))
    try:
        return await asyncio.shield(task)
    except QueueFullError as exc:
        raise schema.ApiError(503, str(exc), None, "queue_full", "server_error") from None
    except GenerationError as exc:
        raise schema.generation_error(exc) from None
    except asyncio.CancelledError:
        task.add_done_callback(lambda t: t.cancelled() or t.exception() or t.result().cancel())
        raise


async def _complete(handle, request, metrics, schema):
    """Wait for the whole result; a client that disconnects meanwhile cancels it."""

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        async for _ in handle:
            pass
    except Exception as exc:  # noqa: BLE001  the backend failed this request
        metrics.ended("error")
        raise schema.ApiError(500, f"generation failed: {exc}", None, "generation_failed", "server_error") from None
    except BaseException:
        handle.cancel()
        raise
    finally:
        watcher.cancel()
    result = handle.result()
    metrics.record(result)
    if result.finish_reason == "cancelled":
        raise schema.ApiError(503, "the request was cancelled (the client went away, or the server is stopping)",
                              None, "cancelled", "server_error")  # fmt: skip
    return result


async def _events(handle, meta: dict, include_usage: bool, metrics, schema):
    """Server-sent events: one chunk per token, a last chunk with the finish reason, ``[DONE]``."""
    sent = ""
    try:
        async for delta in handle:
            sent += delta.text
            yield _sse(_completion(meta, None, [_choice(delta.text, [delta.token_id], None)]))
        result = handle.result()
        metrics.record(result)
        text = result.text or ""
        rest = text[len(sent):] if text.startswith(sent) else ""
        yield _sse(_completion(meta, None, [_choice(rest, [], _finish(result))]))
        if include_usage:
            yield _sse(_completion(meta, result, []))
        yield "data: [DONE]\n\n"
    except Exception as exc:  # noqa: BLE001  the status line is sent: the error goes in the stream
        metrics.ended("error")
        yield _sse(schema.ApiError(500, f"generation failed: {exc}", None, "generation_failed", "server_error").body())


def _sse_response(handle, events, metrics):
    from starlette.responses import StreamingResponse

    class Stream(StreamingResponse):
        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                if not handle.done:  # the client went away mid-stream: free its slot now
                    handle.cancel()
                    metrics.ended("cancelled")

    return Stream(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _sse(payload: dict) -> str:
    import json

    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _finish(result) -> str:
    return _FINISH.get(result.finish_reason, result.finish_reason)


def _choice(text: str, token_ids: list[int], finish: str | None) -> dict:
    # token_ids: an extension (the generated ids of this choice or chunk); OpenAI clients ignore it
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "token_ids": list(token_ids)}


def _completion(meta: dict, result, choices: list[dict]) -> dict:
    body = {"id": meta["id"], "object": "text_completion", "created": meta["created"], "model": meta["model"],
            "choices": choices}  # fmt: skip
    if result is not None:
        n_prompt, n_out = len(result.prompt_ids), len(result.output_ids)
        body["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
    return body


# -- the command -------------------------------------------------------------------------------


class ServeError(ValueError):
    """The server cannot start as asked (the address is taken, ...)."""


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; without it
    # each small write (a streamed token) waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --host or --port "
                         "(--port 0 picks a free one)") from None  # fmt: skip
    return sock


def make_server(app, log_level: str = "warning"):
    """A uvicorn server whose SIGINT/SIGTERM stop is a clean exit (status 0)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises the signal that stopped it once it is down (so the process would
            # die of SIGTERM, or raise KeyboardInterrupt); a requested stop is a normal exit here.
            with super().capture_signals():
                try:
                    yield
                finally:
                    getattr(self, "_captured_signals", []).clear()

    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5, lifespan="on")
    return Server(config)


def run(build_dir: Path, host: str, port: int, backend: str, max_queue: int, verify: bool, model_name: str | None,
        say=print) -> None:  # fmt: skip
    """Serve a build until SIGINT/SIGTERM (the address is taken first, so a busy port fails fast)."""
    from mixtral_trt import runtime
    from mixtral_trt.pipeline import resolve_build

    _require_server_packages()
    resolved, why = resolve_build(build_dir, backend)
    sock = listen(host, port)
    try:
        if why:
            say(why)
        model = runtime.load(resolved, backend=backend, verify=verify, executor={"max_queue": max_queue})
        name = model_name or Path(build_dir).resolve().name
        server = make_server(create_app(model, name))
        bound = sock.getsockname()
        shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
        say(f"serving {name!r} on http://{shown}:{bound[1]}/v1 ({model.executor.slots} slots, max_queue "
            f"{max_queue}); Ctrl-C stops")  # fmt: skip
        server.run(sockets=[sock])
    finally:
        sock.close()
    say("stopped")


def _require_server_packages() -> None:
    import importlib

    missing = []
    for name in ("fastapi", "uvicorn", "pydantic"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ServeError(f"serve needs {', '.join(missing)}: pip install 'mixtral-trt[serve]' "
                         "(or pip install fastapi uvicorn)")  # fmt: skip


def serve_command():
    """``mixtral-build serve``: a click command to add with ``main.add_command``."""
    import click

    @click.command("serve")
    @click.argument("build_dir", type=click.Path(path_type=Path))
    @click.option("--host", default="127.0.0.1", show_default=True,
                  help="Address to listen on (0.0.0.0: every interface; the API has no authentication).")
    @click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
                  help="TCP port (0: any free one, printed at start).")
    @click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
                  show_default=True)
    @click.option("--max-queue", type=click.IntRange(min=1), default=256, show_default=True,
                  help="Requests that may wait for a slot; beyond it a request gets 503.")
    @click.option("--model-name", help="The model's name in the API [default: BUILD_DIR's name].")
    @click.option("--no-verify", is_flag=True, help="Skip re-hashing the build's files against its manifest.")
    def serve(build_dir, host, port, backend, max_queue, model_name, no_verify):
        """Serve a build over HTTP with OpenAI's completions API (FastAPI on uvicorn).

        \b
        POST /v1/completions   text or token-id prompt; streaming as server-sent events
        GET  /v1/models        the one model served
        GET  /health           200 while the executor runs
        GET  /metrics          Prometheus text format
        Concurrent requests share the build's max_batch slots (in-flight batching). BUILD_DIR is
        read as by generate (the main job's OUT too). SIGINT/SIGTERM stop it (exit status 0).
        """
        run(build_dir, host, port, backend, max_queue, not no_verify, model_name,
            say=lambda m: click.echo(m, err=True))  # fmt: skip

    return serve
