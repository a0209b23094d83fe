"""Responses in OpenAI's shapes, built from serve/protocol.py's models: whole replies and streamed SSE chunks.

`Reply` collects one request's events (serve/bridge.py) into a `ChatCompletion` / `Completion`, or
turns them into chunks as they come. Streams follow OpenAI's rules: one id in every chunk, `role`
only in the first delta, a last chunk per choice with `finish_reason` and an empty delta, a usage
chunk (`choices: []`) when asked for, then `data: [DONE]`. A chunk carries `usage: null` only when
usage was asked for, so chunks are written with only the fields set on them (`exclude_unset`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from lmforge.serve import protocol
from lmforge.serve.scheduler import Event

CLIENT_GONE = 499  # nginx's "client closed request", for the access log
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Reply:
    """One response (or its stream of chunks) for `choices` sequences, from the scheduler's events."""

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

    def _header(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _chat_chunk(self, index: int, delta: protocol.Delta, finish_reason: str | None, usage: bool):
        choice = protocol.ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=None)
        # NOTE: usage=None only when asked for: OpenAI sends null on every chunk but the usage chunk then.
        extra = {"usage": None} if usage else {}
        return protocol.ChatCompletionChunk(**self._header("chat.completion.chunk"), choices=[choice], **extra)

    async def chat_chunks(self, events: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[BaseModel]:
        for index in range(len(self.texts)):
            yield self._chat_chunk(index, protocol.Delta(role="assistant", content=""), None, include_usage)
        async for event in events:
            self._record(event)
            if event.text:
                yield self._chat_chunk(event.index, protocol.Delta(content=event.text), None, include_usage)
            if event.finish_reason:
                yield self._chat_chunk(event.index, protocol.Delta(), event.finish_reason, include_usage)
        if include_usage:
            yield protocol.ChatCompletionChunk(**self._header("chat.completion.chunk"), choices=[], usage=self.usage())

    async def completion_chunks(self, events: AsyncIterator[Event], include_usage: bool) -> AsyncIterator[BaseModel]:
        extra = {"usage": None} if include_usage else {}
        async for event in events:
            self._record(event)
            if event.text or event.finish_reason:
                choice = protocol.CompletionChoice(
                    index=event.index, text=event.text, finish_reason=event.finish_reason, logprobs=None
                )
                yield protocol.Completion(**self._header("text_completion"), choices=[choice], **extra)
        if include_usage:
            yield protocol.Completion(**self._header("text_completion"), choices=[], usage=self.usage())


async def answer(
    body: protocol._Sampling,
    reply: Reply,
    events: AsyncIterator[Event],
    chunks_of: Callable[[AsyncIterator[Event], bool], AsyncIterator[BaseModel]],
    whole_of: Callable[[], BaseModel],
):
    """A server-sent-event stream of chunks (`stream: true`), or the whole reply once every sequence is done."""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            sse(chunks_of(events, include_usage)), media_type="text/event-stream", headers=SSE_HEADERS
        )
    await reply.collect(events)
    if None in reply.reasons:  # the client went away (serve/bridge.py cancelled its sequences): nobody reads this
        return Response(status_code=CLIENT_GONE)
    return whole_of()


async def sse(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events: one `data:` line per chunk, then `data: [DONE]`."""
    try:
        async for chunk in chunks:
            yield f"data: {chunk.model_dump_json(exclude_unset=True)}\n\n"
    except RuntimeError as error:  # the engine failed mid-stream: the status line is gone, so say it in the stream
        detail = protocol.ErrorDetail(message=str(error), type="server_error")
        yield f"data: {protocol.ErrorResponse(error=detail).model_dump_json()}\n\n"
    yield "data: [DONE]\n\n"
