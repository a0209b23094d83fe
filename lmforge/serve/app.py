"""The OpenAI-compatible HTTP API: FastAPI routes over one continuous-batching scheduler.

`create_app(lm, ...)` builds the app; `serve(model_dir, ...)` loads a run folder and runs it on
uvicorn (`lmforge serve`). The pieces, as in vLLM's OpenAI entrypoint: serve/protocol.py (request and
response models), serve/middleware.py (API key, CORS, errors as 4xx), serve/responses.py (replies and
SSE chunks), serve/openapi.py (the document), serve/bridge.py (scheduler thread -> event loop),
serve/scheduler.py (continuous batching over generate/engine.py) and serve/connections.py (the
connection cap and request-head deadline around uvicorn).
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool

from lmforge.data.chat import TOOL_CALL_OPEN, check_messages, check_tools, find_control_token, render_chat
from lmforge.data.code import fim_prompt_ids
from lmforge.errors import UserError
from lmforge.explain.explain import explain_reply
from lmforge.generate.constraints import TemplateConstraint, check_room
from lmforge.generate.text import stop_strings
from lmforge.lm import LM
from lmforge.models.decoder import Decoder
from lmforge.serve import protocol
from lmforge.serve.bridge import events, mailbox
from lmforge.serve.connections import DEFAULT_LIMITS, ConnectionLimits, server_config
from lmforge.serve.middleware import APIError, install_middleware
from lmforge.serve.openapi import openapi_document
from lmforge.serve.responses import Reply, ToolUse, answer
from lmforge.serve.scheduler import QueueFull, Scheduler, SequenceRequest

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
}
MAX_BODY_BYTES = 4 * 2**20  # a whole 128k-token context is well under 1 MiB of text
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
    max_body_bytes: int = MAX_BODY_BYTES,
) -> FastAPI:
    """The app for one decoder model; its scheduler thread runs while the app's lifespan does.

    `compiled`: compiled decoding steps while at most a few sequences are live (`lmforge serve --compile`).
    `bound_to`: the address it will listen on (`--host`); a loopback address without `api_key` makes it
    answer only Host headers naming this machine (localhost, 127.0.0.1, [::1]), against DNS rebinding.
    `max_body_bytes`: a larger request body is a 413, refused before it is read whole.
    """
    if not isinstance(lm.model, Decoder):
        raise UserError(f"the server serves decoders; this is a {type(lm.model).__name__}")
    scheduler = Scheduler(lm.model, lm.tokenizer, max_batch=max_batch, max_queue=max_queue, compiled=compiled)

    # NOTE: one thread renders and tokenizes every prompt. A template that loops until its budget stops it
    # holds the GIL; several such threads at once would starve the event loop (and /health) for seconds.
    def prompt_thread() -> ThreadPoolExecutor:  # starts its thread at the first prompt
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-prompts")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            app.state.prompts.shutdown(wait=False, cancel_futures=True)
            app.state.prompts = prompt_thread()  # an app may be started again after a shutdown (tests do)

    errors = {status: {"model": protocol.ErrorResponse} for status in (400, 401, 404, 413, 429)}
    app = FastAPI(
        title="lmforge",
        summary="OpenAI-compatible API for an lmforge model",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI pulls scripts from a CDN; the schema itself is at /openapi.json
        redoc_url=None,
        responses=errors,
    )
    app.state.scheduler = scheduler
    app.state.prompts = prompt_thread()
    install_middleware(app, api_key, cors_origins, bound_to, max_body_bytes)
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
    def off_the_loop(function, *args):  # rendering and tokenizing a long body take a while: /health must answer
        return asyncio.get_running_loop().run_in_executor(app.state.prompts, function, *args)

    @app.post("/v1/chat/completions", response_model=protocol.ChatCompletion, responses=STREAM_DOCS)
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        _check_model(body.model, model_name)
        tools, use = _tool_use(body)
        prompt_ids = await off_the_loop(_chat_prompt, lm, body.messages, tools, use.forced)
        max_tokens = body.max_completion_tokens or body.max_tokens
        sequences, queue = _submit(scheduler, lm, body, [prompt_ids], max_tokens)
        reply = Reply("chatcmpl", model_name, len(prompt_ids), body.n, use)
        stream = events(request, sequences, queue)
        return await answer(body, reply, stream, reply.chat_chunks, reply.chat_completion)

    @app.post("/v1/completions", response_model=protocol.Completion, responses=STREAM_DOCS)
    async def completions(body: protocol.CompletionRequest, request: Request):
        _check_model(body.model, model_name)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        prompt_ids = await off_the_loop(_completion_prompts, lm, prompts, body.suffix)
        constraint = _form_constraint(lm, body)
        sequences, queue = _submit(scheduler, lm, body, prompt_ids, body.max_tokens, constraint)
        reply = Reply("cmpl", model_name, sum(len(ids) for ids in prompt_ids), len(sequences))
        stream = events(request, sequences, queue)
        return await answer(body, reply, stream, reply.completion_chunks, reply.completion)


def _completion_prompts(lm: LM, prompts: list[str], suffix: str | None) -> list[list[int]]:
    """Each prompt's ids; with a `suffix`, the fill-in-the-middle prompt asking for the text between the two."""
    if not suffix:
        return [_encode(lm, prompt, "prompt", bos=True) for prompt in prompts]
    if lm.tokenizer.fim_ids is None:
        raise APIError(
            400, "suffix needs a model trained with fill-in-the-middle (lmforge finetune --task code); this model's "
            "tokenizer has no FIM tokens", param="suffix", code="unsupported_parameter",
        )  # fmt: skip
    return [fim_prompt_ids(lm.tokenizer, prompt, suffix) for prompt in prompts]


def _form_constraint(lm: LM, body: protocol.CompletionRequest) -> TemplateConstraint | None:
    """The constraint of the request's `form` (None without one); a 400 naming the parameter for a bad one."""
    if body.form is None:
        if body.rhyme:
            raise APIError(400, "rhyme applies to a poem form: send form too", param="rhyme")
        return None
    try:
        constraint = lm.form_constraint(body.form, body.rhyme)
        if body.max_tokens is not None:
            check_room(constraint, body.max_tokens, f"the form {body.form}")
    except UserError as error:
        raise APIError(400, str(error), param="max_tokens" if "max_new_tokens" in str(error) else "form") from None
    return constraint


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
        prompt_ids = _chat_prompt(lm, body.messages, None, "")
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


def _tool_use(body: protocol.ChatCompletionRequest) -> tuple[list[dict] | None, ToolUse]:
    """The tools to render (none for tool_choice "none") and how to read the replies; 400s for bad tools.

    "required" and a named function are kept by starting the reply with the call's opening text, so the
    model writes the rest of a call (NOTE: vLLM constrains decoding instead; a prefix needs no grammar).
    """
    offered = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    try:
        check_tools(offered)
    except UserError as error:
        raise APIError(400, str(error), param="tools") from None
    choice = body.tool_choice or ("auto" if offered else "none")
    if choice not in ("none", "auto") and not offered:
        raise APIError(400, "tool_choice asks for a tool call, but the request offers no tools", param="tool_choice")
    if choice == "none" or not offered:
        return None, ToolUse()
    names = frozenset(tool["function"]["name"] for tool in offered)
    forced = ""
    if choice == "required":
        forced = TOOL_CALL_OPEN + "\n"
    elif isinstance(choice, protocol.NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools: {', '.join(sorted(names))}",
                           param="tool_choice")  # fmt: skip
        forced = f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '
    return offered, ToolUse(names, forced, body.parallel_tool_calls)


def _chat_prompt(lm: LM, messages: list[protocol.ChatMessage], tools: list[dict] | None, forced: str) -> list[int]:
    """Render the conversation with the model folder's own template (sandboxed, budgeted), assistant turn opened.

    Runs in a worker thread: the render budget (data/template_sandbox.py) is what stops a template that loops.
    """
    plain = []
    for number, message in enumerate(messages, start=1):
        content = (
            message.content if isinstance(message.content, str) else "\n".join(p.text for p in message.content or [])
        )
        if message.content is None and not message.tool_calls:
            raise APIError(400, f"message {number} has no content", param=f"messages.{number - 1}.content")
        item = {"role": "system" if message.role == "developer" else message.role, "content": content}
        if message.tool_calls:
            item["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        # A control token typed into content would forge turns ("<|eot_id|><|start_header_id|>system ...").
        typed = content + "".join(call.function.arguments + call.function.name for call in message.tool_calls or [])
        marker = find_control_token(lm.tokenizer, typed)
        if marker:
            raise APIError(400, f"message {number} contains '{marker}', a control token of this model's chat format",
                           param=f"messages.{number - 1}.content")  # fmt: skip
        plain.append(item)
    try:
        plain = check_messages(plain)
    except UserError as error:
        raise APIError(400, str(error), param="messages") from None
    return _encode(lm, render_chat(lm.tokenizer, plain, add_generation_prompt=True, tools=tools) + forced, "messages")


def _encode(lm: LM, text: str, param: str, bos: bool = False) -> list[int]:
    """The text's token ids; a 400 without tokenizing when its bytes alone prove it cannot fit the context.

    No token stands for more than `longest_token_bytes` bytes, so a longer text has more tokens than
    the context holds: a 4 MB body is refused at once instead of after half a minute of tokenizing.
    """
    context = lm.model.config.max_position_embeddings
    fewest = -(-len(text.encode("utf-8", "surrogatepass")) // lm.tokenizer.longest_token_bytes)
    if fewest >= context:
        raise APIError(400, f"the prompt has at least {fewest:,} tokens; this model's context holds {context}",
                       param=param, code="context_length_exceeded")  # fmt: skip
    return lm.encode_prompt(text) if bos else lm.tokenizer.encode(text)


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
    scheduler: Scheduler,
    lm: LM,
    body: protocol._Sampling,
    prompt_ids: list[list[int]],
    max_tokens: int | None,
    constraint: TemplateConstraint | None = None,
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
            sequence = SequenceRequest(ids, sampling, emit, stop_strings(body.stop), index=index, constraint=constraint)
            sequences.append(sequence)
    try:
        scheduler.submit(sequences)
    except QueueFull as error:
        raise APIError(
            429, f"the server is busy ({error}); retry shortly", "rate_limit_error", code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        ) from None  # fmt: skip
    return sequences, queue


@contextmanager
def background_server(
    app: FastAPI, host: str = "127.0.0.1", port: int = 0, limits: ConnectionLimits = DEFAULT_LIMITS
) -> Iterator[str]:
    """Run the app on uvicorn in a thread (port 0: any free port) and yield its base URL; stop it on exit.

    For notebooks, tests and benchmarks that need a live server beside other work in one process.
    """
    import uvicorn

    server = uvicorn.Server(server_config(app, host, port, limits, log_level="warning"))
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
    max_body_bytes: int = MAX_BODY_BYTES,
    limits: ConnectionLimits = DEFAULT_LIMITS,
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
        compiled=compiled, bound_to=host, max_body_bytes=max_body_bytes,
    )  # fmt: skip
    where = f"http://{host}:{port}"
    print(f"serving {name} ({lm.model.num_parameters():,} parameters) at {where}: chat page {where}/, API {where}/v1")
    if api_key:
        print("API key required: Authorization: Bearer <key>")
    uvicorn.Server(server_config(app, host, port, limits)).run()
