"""Responses in OpenAI's shapes, built from serve/protocol.py's models: whole replies and streamed SSE chunks.

`Reply` collects one request's events (serve/bridge.py) into a `ChatCompletion` / `Completion`, or
turns them into chunks as they come. A chat reply is read with `data/chat.parse_reply`: a leading
<think> trace becomes `reasoning_content`, and, when the request offered tools, well-formed
<tool_call> blocks become `tool_calls` with `finish_reason: "tool_calls"` (a malformed one leaves the
whole text as content). Streamed, content and trace go out as soon as more text cannot change them;
each tool call goes out whole, in one chunk, when the reply ends. Streams follow OpenAI's rules: one
id in every chunk, `role` only in the first delta, a last chunk per choice with `finish_reason` and an
empty delta, a usage chunk (`choices: []`) when asked for, then `data: [DONE]`. A chunk carries
`usage: null` only when usage was asked for, so chunks are written with only the fields set on them (`exclude_unset`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from lmforge.data.chat import ParsedReply, parse_reply
from lmforge.serve import protocol
from lmforge.serve.scheduler import Event

CLIENT_GONE = 499  # nginx's "client closed request", for the access log
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ToolUse:
    """How a chat request's replies are read for tool calls."""

    names: frozenset[str] = frozenset()  # the tools offered; none: calls are not read (tool_choice "none")
    forced: str = ""  # text the reply was made to start with (tool_choice "required" or a named function)
    parallel: bool = True  # false: only the first call is kept


class Reply:
    """One response (or its stream of chunks) for `choices` sequences, from the scheduler's events."""

    def __init__(self, prefix: str, model: str, prompt_tokens: int, choices: int, tools: ToolUse = ToolUse()) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.texts = [""] * choices
        self.reasons: list[str | None] = [None] * choices
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.tools = tools
        self.sent = [("", "")] * choices  # (trace, content) streamed so far, per choice

    def parsed(self, index: int, final: bool = True) -> ParsedReply:
        tools = self.tools
        text = tools.forced + self.texts[index]
        reply = parse_reply(text, bool(tools.names), final, tools.names)
        if not tools.parallel:
            reply.tool_calls = reply.tool_calls[:1]
        return reply

    def finish_reason(self, index: int) -> str:
        return "tool_calls" if self.parsed(index).tool_calls else self.reasons[index]

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

    def message(self, index: int) -> protocol.AssistantMessage:
        reply = self.parsed(index)
        calls = [_tool_call(call) for call in reply.tool_calls] or None
        content = None if calls and not reply.content else reply.content
        return protocol.AssistantMessage(content=content, reasoning_content=reply.reasoning, tool_calls=calls)

    def chat_completion(self) -> protocol.ChatCompletion:
        choices = [
            protocol.ChatChoice(index=index, message=self.message(index), finish_reason=self.finish_reason(index))
            for index in range(len(self.texts))
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
            final = bool(event.finish_reason)
            delta = self._new_text(event.index, final)
            if delta is not None:
                yield self._chat_chunk(event.index, delta, None, include_usage)
            if final:
                reply = self.parsed(event.index)
                if reply.tool_calls:
                    calls = [protocol.DeltaToolCall(index=number, **_tool_call(call).model_dump())
                             for number, call in enumerate(reply.tool_calls)]  # fmt: skip
                    yield self._chat_chunk(event.index, protocol.Delta(tool_calls=calls), None, include_usage)
                yield self._chat_chunk(event.index, protocol.Delta(), self.finish_reason(event.index), include_usage)
        if include_usage:
            yield protocol.ChatCompletionChunk(**self._header("chat.completion.chunk"), choices=[], usage=self.usage())

    def _new_text(self, index: int, final: bool) -> protocol.Delta | None:
        """The trace and content of choice `index` that more text can no longer change and were not sent yet."""
        reply = self.parsed(index, final)
        trace, content = reply.reasoning or "", reply.content
        sent_trace, sent_content = self.sent[index]
        # NOTE: each partial parse is a prefix of the later ones (parse_reply's promise); if not, send nothing.
        new_trace = trace[len(sent_trace) :] if trace.startswith(sent_trace) else ""
        new_content = content[len(sent_content) :] if content.startswith(sent_content) else ""
        if not (new_trace or new_content):
            return None
        self.sent[index] = (sent_trace + new_trace, sent_content + new_content)
        return protocol.Delta(reasoning_content=new_trace or None, content=new_content or None)

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


def _tool_call(call: dict) -> protocol.ToolCallOut:
    arguments = json.dumps(call["arguments"], ensure_ascii=False)
    return protocol.ToolCallOut(
        id=f"call_{uuid.uuid4().hex[:24]}", function=protocol.FunctionCallOut(name=call["name"], arguments=arguments)
    )


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
