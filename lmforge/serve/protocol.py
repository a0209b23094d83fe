"""Request, response and error bodies in OpenAI's shapes (Chat Completions and legacy Completions).

These pydantic models are the API's contract: FastAPI validates requests with
them and writes the OpenAPI document from them. Fields OpenAI has and we do
not implement (logprobs, functions, penalties, ...: `UNSUPPORTED`) are refused with
a 400 unless they hold their default, so no client believes they were honoured.
Fields no OpenAI client sends are ignored; in particular a `chat_template` or
template arguments in a request are never read: the model folder's own template
renders every conversation.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

# The largest integer a JSON number carries exactly everywhere (JavaScript's Number.MAX_SAFE_INTEGER).
MAX_INT = 2**53 - 1


SURROGATE = re.compile("[\ud800-\udfff]")


def _whole_characters(text: str) -> str:
    """JSON's `"\\ud800"` escape decodes to a lone surrogate: no character, and no UTF-8 encoding of it exists."""
    if found := SURROGATE.search(text):
        raise ValueError(f"holds a lone surrogate (\\u{ord(found.group()):04x}), not a character; send UTF-8 text")
    return text


# Every string a request carries: a lone surrogate would fail in the tokenizer or in the reply (a 500).
Text = Annotated[str, AfterValidator(_whole_characters)]


MAX_STOP = 4  # stop strings in one request, as OpenAI allows


def _stop_strings(stop: str | list[str]) -> str | list[str]:
    if isinstance(stop, list) and len(stop) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings, not {len(stop)}")
    if stop == "":
        raise ValueError("a stop string cannot be empty")
    return stop


class _Request(BaseModel):
    # strict: "1" is not 1, so a request that breaks the schema is refused, not guessed at.
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class FunctionCall(_Request):
    name: Text
    arguments: Text  # a JSON object, as text (OpenAI's shape)


class ToolCall(_Request):
    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant message that makes tool calls
    content: Text | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None  # the call a tool message answers
    reasoning_content: Text | None = None  # an earlier reply's trace: accepted, not shown to the model again


ToolName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's rule


class FunctionDefinition(_Request):
    name: ToolName
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON Schema for an object (checked by data/chat.check_tools)
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: ToolName


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    model: Text
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1, le=MAX_INT)] | None = None
    stop: Annotated[Text | list[Text], AfterValidator(_stop_strings)] | None = None
    seed: Annotated[int, Field(ge=-MAX_INT, le=MAX_INT)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Not in OpenAI's API; vLLM and llama.cpp take them too.
    top_k: Annotated[int, Field(ge=0, le=MAX_INT)] | None = None
    repetition_penalty: Annotated[float, Field(ge=0.01, le=100)] | None = None


# OpenAI's parameters this server does not implement, with the values that ask for nothing (clients send those).
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "echo": (None, False),
    "best_of": (None, 1),
    "audio": (None,),
}
_Unsupported = SkipJsonSchema[Any]  # left out of the OpenAPI document: only the defaults are accepted


class _Refusing(_Sampling):
    logprobs: _Unsupported = None
    top_logprobs: _Unsupported = None
    functions: _Unsupported = None
    function_call: _Unsupported = None
    response_format: _Unsupported = None
    logit_bias: _Unsupported = None
    presence_penalty: _Unsupported = None
    frequency_penalty: _Unsupported = None
    echo: _Unsupported = None
    best_of: _Unsupported = None
    audio: _Unsupported = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _refuse(cls, value: Any, info) -> Any:
        defaults = UNSUPPORTED[info.field_name]
        if not any(type(value) is type(default) and value == default for default in defaults):
            raise PydanticCustomError(
                "unsupported_parameter",
                "not supported by this server; leave it out or send {default}",
                {"default": " or ".join(json.dumps(default) for default in defaults)},
            )
        return value


class ChatCompletionRequest(_Refusing):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True  # false: at most one call per reply
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_INT)] | None = None  # OpenAI's newer name for max_tokens


class CompletionRequest(_Refusing):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=16)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_INT)] | None = 16  # the legacy API's default
    suffix: Text | None = None  # text after the completion: a fill-in-the-middle prompt (models trained with FIM)
    # Not in OpenAI's API: a poem form every choice fills exactly (五言绝句, 7-quatrain, ...), and a rhyme on it.
    form: Annotated[str, Field(max_length=32)] | None = None
    rhyme: bool = False


class ExplainRequest(_Request):
    model: Text
    messages: Annotated[list[ChatMessage], Field(min_length=1)]  # the conversation the reply answered
    reply: Annotated[Text, Field(min_length=1)]  # the assistant's reply to explain
    steps: Annotated[int, Field(ge=1, le=64)] = 16  # integrated-gradient steps: the cost grows with steps x tokens


class Explanation(BaseModel):
    object: Literal["explanation"] = "explanation"
    model: str
    prompt_tokens: list[str]  # the conversation as the model read it, its chat markers included
    reply_tokens: list[str]
    # (reply tokens) x (prompt + reply tokens - 1): the attention of the position that wrote each reply token over
    # everything before it, averaged over layers and heads
    attention: list[list[float]]
    attribution: list[float]  # integrated gradients of log p(reply | conversation), one per prompt token
    score: float  # log p(reply | conversation)
    completeness_error: float  # |sum(attribution) - (score - baseline score)| / |score - baseline score|
    steps: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the reply is only tool calls
    reasoning_content: str | None = None  # the <think> trace (DeepSeek's and vLLM's field)
    tool_calls: list[ToolCallOut] | None = None

    @model_serializer(mode="wrap")
    def _without_empty_extras(self, handler) -> dict:
        # A plain reply is {role, content}, as OpenAI writes it; the trace and the calls only when there are some.
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k not in ("reasoning_content", "tool_calls")}


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaToolCall(ToolCallOut):
    index: int  # which call of the reply (each call comes whole, in one chunk)


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: Text
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Completion(BaseModel):
    """A whole completion, or (object "text_completion" too, as OpenAI does) one streamed chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmforge"
    max_model_len: int  # vLLM's name for the context length


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    live: int
    waiting: int
    max_batch: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
