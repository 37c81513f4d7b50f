"""The HTTP side: a FastAPI app with `POST /v1/chat/completions` (server-sent events or one JSON body),
`GET /v1/models`, `GET /v1/models/{id}` and `GET /health`. Errors answer in OpenAI's shape.

`Guard`, a plain ASGI middleware in front of the app, checks the API key on every request and reads a request
body only up to the size limit. A request names a model from the table built at start-up; nothing in it
reaches the filesystem.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exporter.model.encoding import prompt_ids
from exporter.runtime.sampling import Sampling
from exporter.serve.protocol import (
    ApiError,
    ChatRequest,
    chunk,
    completion,
    completion_id,
    parse_request,
    usage,
    usage_chunk,
)
from exporter.serve.scheduler import Event, Job, Overloaded, Scheduler, Served

POLL_S = 0.25  # how often a non-streaming request looks for its client having left
OWNER = "persona-export"


async def _send_error(send: Send, error: ApiError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """API key (`Authorization: Bearer KEY`) on every request; a request body read only up to `max_body`
    bytes (413 beyond), then handed on whole."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app, self.max_body = app, max_body
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            text = "a valid API key is required: send the header 'Authorization: Bearer KEY'"
            await _send_error(send, ApiError(401, text, "invalid_api_key"))
            return
        too_large = ApiError(413, f"the request body is larger than {self.max_body} bytes", "request_too_large")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_body:
            await _send_error(send, too_large)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _send_error(send, too_large)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def create_app(models: dict[str, Served], scheduler: Scheduler) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title=OWNER, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code)

    def card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": OWNER}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        limits = {"max_batch": scheduler.max_batch, "max_queue": scheduler.max_queue}
        formats = {name: f"{m.format} ({m.runtime})" for name, m in models.items()}
        return {"status": "ok", "models": formats, **limits, **scheduler.status()}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [card(name) for name in models]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        return card(lookup(models, name).name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        try:
            data = json.loads(await request.body())
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError
            raise ApiError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from None
        req = parse_request(data)
        model = lookup(models, req.model)
        job = make_job(model, req)
        try:
            scheduler.submit(job)
        except Overloaded:
            message = "the server is at capacity (every row decoding, the queue full); retry shortly"
            raise ApiError(503, message, "overloaded") from None
        if req.stream:
            return StreamingResponse(
                _events(job, req, scheduler), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await _collect(job, req, scheduler, request)

    return app


def lookup(models: dict[str, Served], name: str) -> Served:
    if name not in models:
        message = f"the model {name!r} does not exist; this server has: {', '.join(models)}"
        raise ApiError(404, message, "model_not_found", "model")
    return models[name]


def make_job(model: Served, req: ChatRequest) -> Job:
    """The request as a job: the chat template's prompt, the reply's budget within the context, the sampler
    (the model's generation defaults where the request is silent; a fresh seed unless it gives one)."""
    chat = [m.as_chat() for m in req.messages]
    try:
        with model.lock:
            ids = prompt_ids(model.tokenizer, chat)
    except Exception as exc:  # the template's own exceptions (jinja2's TemplateError, raise_exception)
        raise ApiError(400, f"the chat template refused the messages: {exc}", "invalid_messages", "messages") from None
    context, asked = model.decoder.context, req.budget()
    room = context - len(ids)
    if room < 1 or (asked is not None and asked > room):
        wanted = f" and max_tokens asks for {asked} more" if asked is not None else ", leaving no room for a reply"
        raise ApiError(
            400,
            f"this model's maximum context length is {context} tokens; the messages take {len(ids)}{wanted}: "
            "shorten the messages or lower max_tokens",
            "context_length_exceeded",
            "messages",
        )
    d = model.defaults
    sampling = Sampling(
        d["temperature"] if req.temperature is None else req.temperature,
        d["top_p"] if req.top_p is None else req.top_p,
        d["repetition_penalty"] if req.repetition_penalty is None else req.repetition_penalty,
        secrets.randbits(32) if req.seed is None else req.seed % 2**64,  # any integer a client sends
    )
    return Job(model, ids, sampling, asked or min(d["max_tokens"] or room, room), req.stops())


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _events(job: Job, req: ChatRequest, scheduler: Scheduler) -> AsyncIterator[str]:
    """The reply as server-sent events; the job is cancelled when the client leaves (the stream is cancelled)."""
    cid, name = completion_id(), job.model.name
    try:
        yield _sse(chunk(cid, name, {"role": "assistant", "content": ""}))
        while True:
            event = await job.events.get()
            if event.error:
                yield _sse(ApiError(500, event.error).body())
                return
            if event.text:
                yield _sse(chunk(cid, name, {"content": event.text}))
            if event.finish:
                yield _sse(chunk(cid, name, {}, event.finish))
                break
        if req.stream_options is not None and req.stream_options.include_usage:
            yield _sse(usage_chunk(cid, name, usage(len(job.ids), job.reply.generated)))
        yield "data: [DONE]\n\n"
    finally:
        scheduler.cancel(job)


async def _collect(job: Job, req: ChatRequest, scheduler: Scheduler, request: Request) -> Response:
    """The whole reply as one body; the job is cancelled when the client leaves before it is done."""
    pieces: list[str] = []
    next_look = time.monotonic() + POLL_S
    try:
        while True:
            event: Event | None = None
            with suppress(asyncio.TimeoutError):
                event = await asyncio.wait_for(job.events.get(), POLL_S)
            if time.monotonic() >= next_look:
                if await request.is_disconnected():
                    return Response(status_code=499)
                next_look = time.monotonic() + POLL_S
            if event is None:
                continue
            if event.error:
                raise ApiError(500, event.error, "decoding_failed")
            pieces.append(event.text)
            if event.finish:
                counts = usage(len(job.ids), job.reply.generated)
                return JSONResponse(completion(completion_id(), job.model.name, "".join(pieces), event.finish, counts))
    finally:
        scheduler.cancel(job)
