"""The official `openai` client against a live server (serve/app.py): it reads every reply, stream and error."""

import json

import openai
import pytest
import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.lm import LM
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.serve.app import background_server, create_app

MODEL = "tiny"
QUESTION = [{"role": "user", "content": "第3句的颜色是什么？"}]
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 12}


def connect(url: str, api_key: str = "unused") -> openai.OpenAI:
    # max_retries=0: a retried request would hide a 5xx, and slow every expected 4xx.
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def client(served_lm):
    with background_server(create_app(served_lm, model_name=MODEL)) as url, connect(url) as client:
        yield client


def test_models(client):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_completion(client, served_lm):
    reply = client.chat.completions.create(messages=QUESTION, **GREEDY)
    assert reply.object == "chat.completion" and reply.model == MODEL
    [choice] = reply.choices
    # The server's greedy reply is the library's, text, ending and token counts alike.
    [expected] = served_lm.chat_complete([QUESTION], max_new_tokens=12, temperature=0)
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == expected.finish_reason
    usage = reply.usage
    assert usage.prompt_tokens == expected.prompt_tokens and usage.completion_tokens == expected.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_joins_to_the_plain_reply(client):
    plain = client.chat.completions.create(messages=QUESTION, **GREEDY)
    stream = client.chat.completions.create(
        messages=QUESTION, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    *chunks, last = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == plain.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices[0].finish_reason] == [
        plain.choices[0].finish_reason
    ]
    assert all(chunk.usage is None for chunk in chunks)
    assert last.choices == [] and last.usage == plain.usage


def test_legacy_completions(client):
    plain = client.completions.create(prompt="第3句的颜色", **GREEDY)
    [choice] = plain.choices
    assert plain.object == "text_completion" and isinstance(choice.text, str)
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    streamed = client.completions.create(prompt="第3句的颜色", stream=True, **GREEDY)
    assert "".join(chunk.choices[0].text for chunk in streamed) == choice.text


def test_n_returns_that_many_choices(client):
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, n=2, seed=1)
    assert [choice.index for choice in reply.choices] == [0, 1]
    assert all(isinstance(choice.message.content, str) for choice in reply.choices)


def test_bad_request_raises_with_the_servers_message(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1000)
    error = caught.value
    assert error.status_code == 400 and error.param == "max_tokens" and error.code == "context_length_exceeded"
    assert "max_tokens" in error.body["message"] and error.body["message"] in str(error)


def test_api_key(served_lm):
    with background_server(create_app(served_lm, model_name=MODEL, api_key="sk-test")) as url:
        with connect(url, api_key="sk-wrong") as wrong, pytest.raises(openai.AuthenticationError) as caught:
            wrong.models.list()
        assert caught.value.code == "invalid_api_key" and caught.value.body["message"]
        with connect(url, api_key="sk-test") as right:
            assert [model.id for model in right.models.list()] == [MODEL]
            reply = right.chat.completions.create(messages=QUESTION, **GREEDY)
            expected = served_lm.chat(QUESTION, max_new_tokens=12, temperature=0)
            assert reply.choices[0].message.content == expected


class _ScriptedDecoder(Decoder):
    """Writes `script` (token ids) whatever it is asked: the prefill gives its first token, each step the next."""

    script: list[int] = []
    steps = 0
    prompt: list[int] = []

    def forward(self, input_ids, *args, **kwargs):
        logits = super().forward(input_ids, *args, **kwargs)
        if input_ids.shape[1] > 1 or self.steps >= len(self.script):  # a prefill: a new reply starts
            self.steps, self.prompt = 0, input_ids[0].tolist()
        logits[..., :] = 0.0
        logits[..., self.script[self.steps]] = 100.0
        self.steps += 1
        return logits


TOOLS = [
    {"type": "function", "function": {"name": "calculator", "description": "计算算式",
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
    {"type": "function", "function": {"name": "date", "parameters": {"type": "object", "properties": {
        "start": {"type": "string"}, "end": {"type": "string"}}}}},
]  # fmt: skip
ASK = [{"role": "user", "content": "3乘以9是多少？"}]
CALL_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "3*9"}}\n</tool_call>'


@pytest.fixture(scope="module")
def scripted(base_run):
    """(a client of a server whose model writes what `say(text)` asks, say)."""
    tokenizer = Tokenizer.load(base_run)
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
                           intermediate_size=32, max_position_embeddings=1024)  # fmt: skip
    model = _ScriptedDecoder(config)

    def say(text: str) -> None:
        model.script = [*tokenizer.encode(text), tokenizer.im_end_id]
        model.steps = len(model.script)

    with background_server(create_app(LM(model, tokenizer), model_name=MODEL)) as url, connect(url) as client:
        yield client, say, model, tokenizer


def test_a_tool_call_is_returned_as_tool_calls(scripted):
    client, say, _, _ = scripted
    say(CALL_TEXT)
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=200)
    [choice] = reply.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "3*9"}
    # The call and its result go back in; the model's next reply is the answer.
    say("是27。")
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "27"}]  # fmt: skip
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=50)
    assert answer.choices[0].message.content == "是27。" and answer.choices[0].finish_reason == "stop"


def test_streamed_tool_calls_trace_and_content(scripted):
    client, say, _, _ = scripted
    say("<think>\n先乘\n</think>\n好的" + CALL_TEXT + CALL_TEXT.replace("3*9", "1+1"))
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=300, stream=True)
    chunks = [chunk.choices[0] for chunk in stream]
    assert "".join(c.delta.reasoning_content or "" for c in chunks if hasattr(c.delta, "reasoning_content")) == "先乘"
    assert "".join(c.delta.content or "" for c in chunks) == "好的"
    calls = [call for c in chunks for call in c.delta.tool_calls or []]
    assert [call.index for call in calls] == [0, 1]
    assert [json.loads(call.function.arguments)["expression"] for call in calls] == ["3*9", "1+1"]
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["tool_calls"]
    say("<think>\n先乘\n</think>\n好的" + CALL_TEXT + CALL_TEXT.replace("3*9", "1+1"))
    single = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=300,
                                            parallel_tool_calls=False)  # fmt: skip
    message = single.choices[0].message
    assert len(message.tool_calls) == 1 and message.content == "好的" and message.reasoning_content == "先乘"


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_calls_and_tool_choice_none_leave_the_text_as_content(scripted, stream):
    client, say, _, _ = scripted
    for text, options in [(CALL_TEXT.replace('"3*9"}', '"3*9"'), {"tools": TOOLS}),
                          (CALL_TEXT.replace("calculator", "shell"), {"tools": TOOLS}),
                          (CALL_TEXT, {"tools": TOOLS, "tool_choice": "none"})]:  # fmt: skip
        say(text)
        reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, stream=stream, **options)
        if stream:
            chunks = [chunk.choices[0] for chunk in reply]
            content = "".join(c.delta.content or "" for c in chunks)
            reasons = [c.finish_reason for c in chunks if c.finish_reason]
            assert not any(c.delta.tool_calls for c in chunks)
        else:
            content, reasons = reply.choices[0].message.content, [reply.choices[0].finish_reason]
            assert reply.choices[0].message.tool_calls is None
        assert content == text and reasons == ["stop"]


def test_required_and_named_tool_choice_start_the_call(scripted):
    client, say, model, tokenizer = scripted
    say('{"start": "1998-01-01", "end": "1998-02-01"}}\n</tool_call>')
    choice = {"type": "function", "function": {"name": "date"}}
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, max_tokens=200)
    assert tokenizer.decode(model.prompt, skip_special_tokens=False).endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "date", "arguments": '
    )
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "date" and json.loads(call.function.arguments)["end"] == "1998-02-01"
    say(CALL_TEXT.removeprefix("<tool_call>\n"))
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=200
    )
    assert reply.choices[0].message.tool_calls[0].function.name == "calculator"


BAD_TOOL_REQUESTS = {
    "tools": {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
    "clash": {"tools": [TOOLS[0], TOOLS[0]]},
    "name": {"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
    "tool_choice": {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "weather"}}},
    "no tools": {"tool_choice": "required"},
    "messages": {"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "27"}]},
    "call id": {"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_2", "content": "27"}]},
    "arguments": {"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "calculator", "arguments": "{3*9"}}]}]},
    "functions": {"functions": [{"name": "weather", "parameters": {"type": "object"}}]},
}  # fmt: skip
PARAMS = {"clash": "tools", "name": "tools.0.function.name", "no tools": "tool_choice", "call id": "messages",
          "arguments": "messages"}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_TOOL_REQUESTS))
def test_bad_tool_requests_are_400s(scripted, case):
    client, say, _, _ = scripted
    say("好")
    body = {"messages": ASK, **BAD_TOOL_REQUESTS[case]}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, max_tokens=5, **body)
    assert caught.value.status_code == 400 and caught.value.param == PARAMS.get(case, case)
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5).choices  # the server goes on
