"""The OpenAI-compatible HTTP API: FastAPI routes over one continuous-batching engine.

`create_app(lm, ...)` builds the app; `serve(model_dir, ...)` loads a run folder
and runs it on uvicorn (`lmforge serve`). Every error, bad input included, is an
OpenAI-style `{"error": {message, type, param, code}}` with a 4xx status: the
official client retries each 5xx twice, so a 500 on bad input is felt three times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmforge.data.chat import check_messages, render_chat
from lmforge.data.tokenizer import SPECIAL_TOKENS
from lmforge.errors import UserError
from lmforge.lm import LM
from lmforge.serve import protocol
from lmforge.serve.scheduler import Engine, Event, QueueFull, SequenceRequest

OPEN_PATHS = ("/health", "/")  # everything else needs the API key when one is set
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        detail = protocol.ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return JSONResponse(
            protocol.ErrorResponse(error=detail).model_dump(), status_code=self.status, headers=self.headers
        )


class BearerAuth:
    """ASGI middleware: deny by default unless `Authorization: Bearer KEY` matches, compared in constant time.

    The only open routes are matched on the exact path the router sees, so no spelling of
    another path (`//v1/models`, `/v1/../v1/models`, `%2Fv1`, a forged Host) can pass as one.
    """

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan" or (
            scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope["path"] in OPEN_PATHS
        ):
            return await self.app(scope, receive, send)
        given = [value for name, value in scope.get("headers", []) if name == b"authorization"]
        # NOTE: compare_digest takes the same time wherever the strings differ, so timing leaks nothing.
        if len(given) == 1 and hmac.compare_digest(given[0], self.expected):
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return  # a websocket is refused by closing it unanswered
        error = APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer YOUR_KEY'",
            "authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error.response()(scope, receive, send)


def create_app(
    lm: LM,
    *,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    cors_origins: Sequence[str] = (),
) -> FastAPI:
    """The app for one decoder model; its engine thread runs while the app's lifespan does."""
    engine = Engine(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue)
    context = lm.model.config.max_position_embeddings
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    errors = {status: {"model": protocol.ErrorResponse} for status in (400, 401, 404, 429)}
    app = FastAPI(
        title="lmforge",
        summary="OpenAI-compatible API for an lmforge model",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI pulls scripts from a CDN; the schema itself is at /openapi.json
        redoc_url=None,
        responses=errors,
    )
    app.state.engine = engine
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    if cors_origins:  # added last, so it is the outer layer and answers preflight requests itself
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    _install_error_handlers(app)

    def card() -> protocol.ModelCard:
        return protocol.ModelCard(id=model_name, created=created, max_model_len=context)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        page = resources.files("lmforge.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/health", response_model=protocol.Health)
    async def health() -> protocol.Health:
        return protocol.Health(**engine.load)

    @app.get("/v1/models", response_model=protocol.ModelList)
    async def list_models() -> protocol.ModelList:
        return protocol.ModelList(data=[card()])

    @app.get("/v1/models/{model_id}", response_model=protocol.ModelCard)
    async def get_model(model_id: str) -> protocol.ModelCard:
        _check_model(model_id, model_name)
        return card()

    @app.post(
        "/v1/chat/completions",
        response_model=protocol.ChatCompletion,
        responses={200: {"content": {"text/event-stream": {}}}},  # its item schema: _openapi_document
    )
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        _check_model(body.model, model_name)
        prompt_ids = _chat_prompt(lm, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        sequences, queue = _submit(engine, lm, body, [prompt_ids], max_tokens, context)
        reply = Reply("chatcmpl", model_name, len(prompt_ids), body.n)
        events = _events(request, sequences, queue)
        return await _answer(body, reply, events, reply.chat_chunks, reply.chat_completion)

    @app.post(
        "/v1/completions",
        response_model=protocol.Completion,
        responses={200: {"content": {"text/event-stream": {}}}},  # its item schema: _openapi_document
    )
    async def completions(body: protocol.CompletionRequest, request: Request):
        _check_model(body.model, model_name)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompt_ids = [lm.encode_prompt(prompt) for prompt in prompts]
        sequences, queue = _submit(engine, lm, body, prompt_ids, body.max_tokens, context)
        reply = Reply("cmpl", model_name, sum(len(ids) for ids in prompt_ids), len(sequences))
        events = _events(request, sequences, queue)
        return await _answer(body, reply, events, reply.completion_chunks, reply.completion)

    app.openapi = lambda: _openapi_document(app)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(UserError)
    async def user_error(request: Request, error: UserError) -> JSONResponse:
        return APIError(400, str(error)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = error.errors()
        first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                            code="json_invalid").response()  # fmt: skip
        where = [str(part) for part in first.get("loc", ()) if _is_field(part)]
        param = ".".join(where) or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        if len(problems) > 1:
            message += f" (and {len(problems) - 1} more problems)"
        return APIError(400, message, param=param, code=str(first.get("type", "invalid"))).response()

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {error}", "server_error").response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), kind, headers=error.headers).response()


def _is_field(part: str | int) -> bool:
    """Whether a pydantic error location part names a field or index, not a union member ("str", "list[str]")."""
    if isinstance(part, int):
        return True
    return part != "body" and part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict")


def _openapi_document(app: FastAPI) -> dict:
    """FastAPI's document, told two things it cannot infer.

    Bad bodies get a 400 with an OpenAI error, not the 422 FastAPI lists for every body; and a
    streamed 200 is server-sent events whose `data` is a chunk (or an error) in JSON, or `[DONE]`.
    """
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        components = schema["components"]["schemas"]
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for path, chunk in (
            ("/v1/chat/completions", protocol.ChatCompletionChunk),
            ("/v1/completions", protocol.Completion),
        ):
            definition = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(definition.pop("$defs", {}))
            components[chunk.__name__] = definition
            refs = [{"$ref": f"#/components/schemas/{kind}"} for kind in (chunk.__name__, "ErrorResponse")]
            payload = {"anyOf": refs}
            json_text = {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}
            data = {"anyOf": [{"const": "[DONE]"}, json_text]}
            event = {"type": "object", "required": ["data"], "properties": {"data": data}}
            schema["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"] = {"itemSchema": event}
        app.openapi_schema = schema
    return app.openapi_schema


def _check_model(requested: str, model_name: str) -> None:
    if requested != model_name:
        raise APIError(
            404, f"the model '{requested}' does not exist; this server has '{model_name}'", param="model",
            code="model_not_found",
        )  # fmt: skip


def _chat_prompt(lm: LM, messages: list[protocol.ChatMessage]) -> list[int]:
    """Render the conversation with the model folder's own template (sandboxed), assistant turn opened."""
    plain = []
    for number, message in enumerate(messages, start=1):
        content = message.content if isinstance(message.content, str) else "\n".join(p.text for p in message.content)
        # A control token typed into content would forge turns ("<|im_end|><|im_start|>system ...").
        for marker in SPECIAL_TOKENS:
            if marker in content:
                raise APIError(400, f"message {number} contains '{marker}', a control token of the chat format",
                               param=f"messages.{number - 1}.content")  # fmt: skip
        plain.append({"role": "system" if message.role == "developer" else message.role, "content": content})
    return lm.tokenizer.encode(render_chat(lm.tokenizer, check_messages(plain), add_generation_prompt=True))


class _Mailman:
    """Carries events from the engine thread into an event loop, waking the loop once per batch, not per event.

    One decode step emits an event for every live sequence; a wake-up per event would cost the
    loop more than the step itself once a few clients stream at once.
    """

    _by_loop: dict[asyncio.AbstractEventLoop, _Mailman] = {}

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.bag: list[tuple[asyncio.Queue, Event]] = []
        self.lock = threading.Lock()

    @classmethod
    def for_running_loop(cls) -> _Mailman:
        loop = asyncio.get_running_loop()
        if loop not in cls._by_loop:
            cls._by_loop = {known: mailman for known, mailman in cls._by_loop.items() if not known.is_closed()}
            cls._by_loop[loop] = cls(loop)
        return cls._by_loop[loop]

    def deliver(self, queue: asyncio.Queue, event: Event) -> None:  # on the engine thread
        with self.lock:
            self.bag.append((queue, event))
            first = len(self.bag) == 1
        if first:
            self.loop.call_soon_threadsafe(self._hand_out)

    def _hand_out(self) -> None:  # on the event loop
        with self.lock:
            bag, self.bag = self.bag, []
        for queue, event in bag:
            queue.put_nowait(event)


def _submit(
    engine: Engine, lm: LM, body: protocol._Sampling, prompt_ids: list[list[int]], max_tokens: int | None, context: int
) -> tuple[list[SequenceRequest], asyncio.Queue]:
    """Check the lengths, then queue `n` sequences per prompt; their events arrive on one asyncio queue."""
    longest = max(len(ids) for ids in prompt_ids)
    room = context - longest
    if room < 1:
        raise APIError(400, f"the prompt has {longest} tokens; this model's context holds {context}",
                       param="messages" if isinstance(body, protocol.ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")  # fmt: skip
    if max_tokens is not None and max_tokens > room:
        raise APIError(
            400,
            f"this model's context holds {context} tokens; the prompt takes {longest}, "
            f"so max_tokens can be at most {room}, not {max_tokens}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    queue: asyncio.Queue[Event] = asyncio.Queue()
    emit = functools.partial(_Mailman.for_running_loop().deliver, queue)

    sequences = []
    for prompt_number, ids in enumerate(prompt_ids):
        for choice in range(body.n):
            # Choices of one request differ, yet a seeded request repeats exactly.
            seed = None if body.seed is None else body.seed + choice
            sampling = lm.sampling(
                max_new_tokens=max_tokens or room,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                repetition_penalty=body.repetition_penalty,
                seed=seed,
            )
            stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
            sequences.append(SequenceRequest(ids, sampling, emit, stop, index=prompt_number * body.n + choice))
    try:
        engine.submit(sequences)
    except QueueFull as error:
        raise APIError(
            429, f"the server is busy ({error}); retry shortly", "rate_limit_error", code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        ) from None  # fmt: skip
    return sequences, queue


async def _events(request: Request, sequences: list[SequenceRequest], queue: asyncio.Queue) -> AsyncIterator[Event]:
    """The sequences' events until each has finished; a client that goes away cancels them all.

    Events that piled up while the client was being served are merged per sequence, so a busy
    server sends fewer, longer chunks instead of falling further behind.
    """
    remaining = len(sequences)
    try:
        while remaining:
            try:
                first = queue.get_nowait() if not queue.empty() else await asyncio.wait_for(queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            for event in _merged([first, *(queue.get_nowait() for _ in range(queue.qsize()))]):
                if event.error:
                    raise RuntimeError(event.error)
                if event.finish_reason:
                    remaining -= 1
                yield event
    finally:
        for sequence in sequences:  # a no-op for sequences that finished
            sequence.cancel()


def _merged(events: list[Event]) -> list[Event]:
    """One event per sequence: texts joined in order, the last event's ending kept."""
    merged: dict[int, Event] = {}
    for event in events:
        before = merged.get(event.index)
        merged[event.index] = dataclasses.replace(event, text=before.text + event.text) if before else event
    return list(merged.values())


async def _answer(body: protocol._Sampling, reply: Reply, events: AsyncIterator[Event], chunks_of, whole_of):
    """A server-sent-event stream of chunks (`stream: true`), or the whole reply once every sequence is done."""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(chunks_of(events, include_usage)), media_type="text/event-stream", headers=SSE_HEADERS
        )
    await reply.collect(events)
    return whole_of()


class Reply:
    """Builds one response (or its stream of chunks) in OpenAI's shapes from the engine's events."""

    def __init__(self, prefix: str, model: str, prompt_tokens: int, choices: int) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.texts = [""] * choices
        self.reasons: list[str | None] = [None] * choices
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def _record(self, event: Event) -> None:
        self.texts[event.index] += event.text
        if event.finish_reason:
            self.reasons[event.index] = event.finish_reason
            self.completion_tokens += event.completion_tokens

    def usage(self) -> protocol.Usage:
        total = self.prompt_tokens + self.completion_tokens
        return protocol.Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, total_tokens=total
        )

    async def collect(self, events: AsyncIterator[Event]) -> None:
        async for event in events:
            self._record(event)

    def chat_completion(self) -> protocol.ChatCompletion:
        choices = [
            protocol.ChatChoice(index=index, message=protocol.AssistantMessage(content=text), finish_reason=reason)
            for index, (text, reason) in enumerate(zip(self.texts, self.reasons))
        ]
        return protocol.ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
        )

    def completion(self) -> protocol.Completion:
        choices = [
            protocol.CompletionChoice(index=index, text=text, finish_reason=reason)
            for index, (text, reason) in enumerate(zip(self.texts, self.reasons))
        ]
        return protocol.Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=self.usage()
        )

    def _chunk(self, kind: str, choices: list[dict], include_usage: bool) -> dict:
        chunk = {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            chunk["usage"] = None  # OpenAI: null on every chunk but the last, which carries the counts
        return chunk

    async def chat_chunks(self, events: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[dict]:
        def chunk(index: int, delta: dict, finish_reason: str | None = None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._chunk("chat.completion.chunk", [choice], include_usage)

        for index in range(len(self.texts)):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for event in events:
            self._record(event)
            if event.text:
                yield chunk(event.index, {"content": event.text})
            if event.finish_reason:
                yield chunk(event.index, {}, event.finish_reason)
        if include_usage:
            yield {**self._chunk("chat.completion.chunk", [], False), "usage": self.usage().model_dump()}

    async def completion_chunks(self, events: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[dict]:
        def chunk(index: int, text: str, finish_reason: str | None = None) -> dict:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return self._chunk("text_completion", [choice], include_usage)

        async for event in events:
            self._record(event)
            if event.text or event.finish_reason:
                yield chunk(event.index, event.text, event.finish_reason)
        if include_usage:
            yield {**self._chunk("text_completion", [], False), "usage": self.usage().model_dump()}


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """Server-sent events: one `data:` line per chunk, then `data: [DONE]`."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except RuntimeError as error:  # the engine failed mid-stream: the status line is gone, so say it in the stream
        detail = protocol.ErrorDetail(message=str(error), type="server_error")
        yield f"data: {protocol.ErrorResponse(error=detail).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"


@contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the app on uvicorn in a thread (port 0: any free port) and yield its base URL; stop it on exit.

    For notebooks, tests and benchmarks that need a live server beside other work in one process.
    """
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="lmforge-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def serve(
    model_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    cors_origins: Sequence[str] = (),
    device: str = "auto",
    model_name: str | None = None,
) -> None:
    """Load a decoder run folder and serve it until interrupted (`lmforge serve`)."""
    import uvicorn

    import lmforge

    lm = lmforge.load(model_dir, device=device)
    if not hasattr(lm.model, "new_cache"):
        raise UserError(f"{model_dir} is not a decoder-only model; `lmforge serve` serves decoders")
    name = model_name or Path(model_dir).resolve().name
    app = create_app(
        lm, model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue, cors_origins=cors_origins
    )
    where = f"http://{host}:{port}"
    print(f"serving {name} ({lm.model.num_parameters():,} parameters) at {where}: chat page {where}/, API {where}/v1")
    if api_key:
        print("API key required: Authorization: Bearer <key>")
    uvicorn.run(app, host=host, port=port, log_level="info")
