"""The official `openai` client against a live server (serve/app.py): it reads every reply, stream and error."""

import openai
import pytest

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
