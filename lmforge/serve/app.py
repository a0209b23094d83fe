"""The OpenAI-compatible HTTP API: FastAPI routes over one continuous-batching scheduler.

`create_app(lm, ...)` builds the app; `serve(model_dir, ...)` loads a run folder and runs it on
uvicorn (`lmforge serve`). The pieces, as in vLLM's OpenAI entrypoint: serve/protocol.py (request and
response models), serve/middleware.py (API key, CORS, errors as 4xx), serve/responses.py (replies and
SSE chunks), serve/openapi.py (the document), serve/bridge.py (scheduler thread -> event loop) and
serve/scheduler.py (continuous batching over generate/engine.py).
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from lmforge.data.chat import check_messages, render_chat
from lmforge.data.tokenizer import SPECIAL_TOKENS
from lmforge.errors import UserError
from lmforge.explain.explain import explain_reply
from lmforge.generate.text import stop_strings
from lmforge.lm import LM
from lmforge.models.decoder import Decoder
from lmforge.serve import protocol
from lmforge.serve.bridge import events, mailbox
from lmforge.serve.middleware import APIError, install_middleware
from lmforge.serve.openapi import openapi_document
from lmforge.serve.responses import Reply, answer
from lmforge.serve.scheduler import QueueFull, Scheduler, SequenceRequest

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}
STREAM_DOCS = {200: {"content": {"text/event-stream": {}}}}  # its item schema: serve/openapi.py


def create_app(
    lm: LM,
    *,
    model_name: str,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    cors_origins: Sequence[str] = (),
    compiled: bool = False,
    bound_to: str | None = None,
) -> FastAPI:
    """The app for one decoder model; its scheduler thread runs while the app's lifespan does.

    `compiled`: compiled decoding steps while at most a few sequences are live (`lmforge serve --compile`).
    `bound_to`: the address it will listen on (`--host`); a loopback address without `api_key` makes it
    answer only Host headers naming this machine (localhost, 127.0.0.1, [::1]), against DNS rebinding.
    """
    if not isinstance(lm.model, Decoder):
        raise UserError(f"the server serves decoders; this is a {type(lm.model).__name__}")
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue, compiled=compiled)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    errors = {status: {"model": protocol.ErrorResponse} for status in (400, 401, 404, 429)}
    app = FastAPI(
        title="lmforge",
        summary="OpenAI-compatible API for an lmforge model",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI pulls scripts from a CDN; the schema itself is at /openapi.json
        redoc_url=None,
        responses=errors,
    )
    app.state.scheduler = scheduler
    install_middleware(app, api_key, cors_origins, bound_to)
    context = lm.model.config.max_position_embeddings
    _info_routes(app, scheduler, protocol.ModelCard(id=model_name, created=int(time.time()), max_model_len=context))
    _generation_routes(app, lm, scheduler, model_name)
    _explain_route(app, lm, model_name)
    app.openapi = lambda: openapi_document(app)
    return app


def _info_routes(app: FastAPI, scheduler: Scheduler, card: protocol.ModelCard) -> None:
    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        page = resources.files("lmforge.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.head("/", include_in_schema=False)
    @app.head("/health", include_in_schema=False)
    async def head() -> Response:  # monitors and load balancers probe with HEAD
        return Response()

    @app.get("/health", response_model=protocol.Health)
    async def health() -> protocol.Health:
        return protocol.Health(**scheduler.load)

    @app.get("/v1/models", response_model=protocol.ModelList)
    async def list_models() -> protocol.ModelList:
        return protocol.ModelList(data=[card])

    @app.get("/v1/models/{model_id}", response_model=protocol.ModelCard)
    async def get_model(model_id: str) -> protocol.ModelCard:
        _check_model(model_id, card.id)
        return card


def _generation_routes(app: FastAPI, lm: LM, scheduler: Scheduler, model_name: str) -> None:
    @app.post("/v1/chat/completions", response_model=protocol.ChatCompletion, responses=STREAM_DOCS)
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        _check_model(body.model, model_name)
        prompt_ids = _chat_prompt(lm, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        sequences, queue = _submit(scheduler, lm, body, [prompt_ids], max_tokens)
        reply = Reply("chatcmpl", model_name, len(prompt_ids), body.n)
        stream = events(request, sequences, queue)
        return await answer(body, reply, stream, reply.chat_chunks, reply.chat_completion)

    @app.post("/v1/completions", response_model=protocol.Completion, responses=STREAM_DOCS)
    async def completions(body: protocol.CompletionRequest, request: Request):
        _check_model(body.model, model_name)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompt_ids = [lm.encode_prompt(prompt) for prompt in prompts]
        sequences, queue = _submit(scheduler, lm, body, prompt_ids, body.max_tokens)
        reply = Reply("cmpl", model_name, sum(len(ids) for ids in prompt_ids), len(sequences))
        stream = events(request, sequences, queue)
        return await answer(body, reply, stream, reply.completion_chunks, reply.completion)


def _explain_route(app: FastAPI, lm: LM, model_name: str) -> None:
    """POST /v1/explain: attention and attributions of a reply, one request at a time, on a copy of the model.

    A copy, made at the first request, because explaining hooks the modules it runs through while the
    scheduler thread keeps decoding with the served ones.
    """
    busy = threading.Lock()
    copies: list[LM] = []

    def run(body: protocol.ExplainRequest) -> dict:
        if not copies:
            copies.append(LM(copy.deepcopy(lm.model), lm.tokenizer))
        prompt_ids = _chat_prompt(lm, body.messages)
        reply_ids = lm.tokenizer.encode(body.reply)
        if not reply_ids:
            raise APIError(400, "the reply tokenizes to nothing", param="reply")
        total, context = len(prompt_ids) + len(reply_ids), lm.model.config.max_position_embeddings
        if total > context:
            raise APIError(400, f"the conversation and the reply are {total} tokens; this model's context holds "
                           f"{context}", param="messages", code="context_length_exceeded")  # fmt: skip
        return explain_reply(copies[0].model, lm.tokenizer, prompt_ids, reply_ids, body.steps)

    @app.post("/v1/explain", response_model=protocol.Explanation)
    async def explain(body: protocol.ExplainRequest) -> protocol.Explanation:
        _check_model(body.model, model_name)
        if not busy.acquire(blocking=False):
            raise APIError(
                429, "an explanation is being computed; retry shortly", "rate_limit_error",
                code="rate_limit_exceeded", headers={"Retry-After": "1"},
            )  # fmt: skip
        try:
            found = await run_in_threadpool(run, body)
        finally:
            busy.release()
        numbers = {key: found[key].round(4).tolist() for key in ("attention", "attribution")}
        return protocol.Explanation(model=model_name, **{**found, **numbers})


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


def _check_room(body: protocol._Sampling, prompt_ids: list[list[int]], max_tokens: int | None, context: int) -> int:
    """The new tokens the longest prompt leaves room for; a 400 when it leaves none or fewer than max_tokens."""
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
    return room


def _check_fits(body: protocol._Sampling, prompts: int, max_queue: int) -> None:
    """A 400 for a request with more sequences than the queue holds: a 429 would have clients retry forever."""
    if prompts * body.n > max_queue:
        counted = f"{prompts} prompts x n={body.n}" if prompts > 1 else f"n={body.n}"
        raise APIError(
            400, f"this request asks for {prompts * body.n} sequences ({counted}); this server takes at most "
            f"{max_queue} in one request (its queue, lmforge serve --max-queue)", param="n" if body.n > 1 else "prompt",
        )  # fmt: skip


def _submit(
    scheduler: Scheduler, lm: LM, body: protocol._Sampling, prompt_ids: list[list[int]], max_tokens: int | None
) -> tuple[list[SequenceRequest], asyncio.Queue]:
    """Check the lengths, then queue `n` sequences per prompt; their events arrive on one asyncio queue."""
    room = _check_room(body, prompt_ids, max_tokens, lm.model.config.max_position_embeddings)
    _check_fits(body, len(prompt_ids), scheduler.max_queue)
    queue, emit = mailbox()
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
            index = prompt_number * body.n + choice
            sequences.append(SequenceRequest(ids, sampling, emit, stop_strings(body.stop), index=index))
    try:
        scheduler.submit(sequences)
    except QueueFull as error:
        raise APIError(
            429, f"the server is busy ({error}); retry shortly", "rate_limit_error", code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        ) from None  # fmt: skip
    return sequences, queue


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
    compiled: bool = False,
) -> None:
    """Load a decoder run folder and serve it until interrupted (`lmforge serve`)."""
    import uvicorn

    import lmforge

    lm = lmforge.load(model_dir, device=device)
    if not isinstance(lm.model, Decoder):
        raise UserError(f"{model_dir} is not a decoder-only model; `lmforge serve` serves decoders")
    name = model_name or Path(model_dir).resolve().name
    app = create_app(
        lm, model_name=name, api_key=api_key, max_batch=max_batch, max_queue=max_queue, cors_origins=cors_origins,
        compiled=compiled, bound_to=host,
    )  # fmt: skip
    where = f"http://{host}:{port}"
    print(f"serving {name} ({lm.model.num_parameters():,} parameters) at {where}: chat page {where}/, API {where}/v1")
    if api_key:
        print("API key required: Authorization: Bearer <key>")
    uvicorn.run(app, host=host, port=port, log_level="info")
