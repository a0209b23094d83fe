"""The chat page at GET / driven in a real headless Chromium against a live server (the `web_server` fixture).

Streaming, Stop, history, New chat, IME-safe Enter against the real server; error bubbles, the API key
and escaping against replies faked with `page.route`.
"""

import json
import re
import shutil

import pytest
import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.lm import LM
from lmforge.models.decoder import Decoder, DecoderConfig
from lmforge.serve.app import background_server, create_app

sync_api = pytest.importorskip("playwright.sync_api", reason="the web page test needs Playwright for Python")

CHROMIUM = "/usr/bin/chromium"
if shutil.which(CHROMIUM) is None:
    pytest.skip(f"the web page test needs Debian's Chromium at {CHROMIUM}", allow_module_level=True)

# NOTE: never let Playwright download a browser; these flags keep Chromium from reaching the network on its own.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
expect = sync_api.expect


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, web_server):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.set_default_timeout(10_000)
    expect.set_options(timeout=10_000)
    page.goto(web_server + "/")
    yield page
    context.close()


@pytest.fixture(scope="module")
def demo_sized_server(base_run):
    """A live server for a model with the demo chat model's context (256 tokens), whose replies end by themselves."""
    tokenizer = Tokenizer.load(base_run)
    torch.manual_seed(0)
    config = DecoderConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_position_embeddings=256,
    )  # fmt: skip
    lm = LM(Decoder(config), tokenizer)
    with background_server(create_app(lm, model_name="demo-sized")) as url:
        yield url, lm


def chat_bodies(page) -> list[dict]:
    """The JSON bodies of the page's chat requests, collected as they are sent."""
    bodies = []
    page.on("request", lambda request: bodies.append(request.post_data_json) if "/chat/" in request.url else None)
    return bodies


def test_streams_stops_and_keeps_history(page, web_server, tmp_path):
    urls = []
    page.on("request", lambda request: urls.append(request.url))
    bodies = chat_bodies(page)
    model_id = page.request.get(web_server + "/v1/models").json()["data"][0]["id"]
    expect(page.locator("#model")).to_have_text(model_id)
    messages, message = page.locator("#messages > *"), page.locator("#message")
    send, stop = page.locator("#send"), page.locator("#stop")
    expect(send).to_be_enabled()
    expect(stop).to_be_disabled()

    # Enter that confirms an IME candidate must not send: a real composition through the DevTools protocol,
    # then bare keydowns as Chrome (isComposing) and Safari (only keyCode 229) report them.
    message.focus()
    devtools = page.context.new_cdp_session(page)
    devtools.send("Input.imeSetComposition", {"text": "nihao", "selectionStart": 5, "selectionEnd": 5})
    message.press("Enter")
    devtools.send("Input.insertText", {"text": "你好"})
    page.wait_for_timeout(300)
    expect(messages).to_have_count(0)
    assert bodies == []
    message.fill("你好")
    page.evaluate(
        """() => {
            const box = document.getElementById("message");
            for (const init of [{isComposing: true}, {keyCode: 229}]) {
                const event = new KeyboardEvent("keydown", {key: "Enter", bubbles: true, cancelable: true, ...init});
                box.dispatchEvent(event);
            }
        }"""
    )
    message.press("Shift+Enter")
    page.wait_for_timeout(300)
    expect(messages).to_have_count(0)
    expect(message).to_have_value("你好\n")
    assert bodies == []

    question = "你好，请介绍一下北京"
    page.fill("#max-tokens", "1000")
    message.fill(question)
    message.press("Enter")
    expect(page.locator(".message.user")).to_have_text(question)
    expect(message).to_have_value("")
    answer = page.locator(".message.assistant").first
    answer_text = answer.locator(".content")
    expect(answer_text).not_to_be_empty()
    expect(send).to_be_disabled()
    expect(stop).to_be_enabled()
    early = answer_text.text_content()
    expect(answer_text).not_to_have_text(early)
    later = answer_text.text_content()
    assert later.startswith(early) and len(later) > len(early), "the answer should grow as it streams"

    stop.click()
    expect(send).to_be_enabled()
    expect(stop).to_be_disabled()
    partial = answer_text.text_content()
    page.wait_for_timeout(500)
    assert answer_text.text_content() == partial, "the answer kept growing after Stop"
    expect(answer).to_have_class(re.compile(r"\bstopped\b"))
    expect(answer.locator(".stats")).to_contain_text("stopped")

    system = "你是一个乐于助人的助手。"
    page.fill("#system", system)
    page.fill("#max-tokens", "5")
    message.fill("那上海呢？")
    send.click()
    stats = page.locator(".message.assistant").nth(1).locator(".stats")
    expect(stats).to_contain_text("tokens/s")
    assert re.search(r"\d+(\.\d+)? 词元/秒 tokens/s", stats.text_content()), stats.text_content()
    expect(stats).to_contain_text("length")
    body = bodies[-1]
    assert body["messages"] == [
        {"role": "system", "content": system},
        {"role": "user", "content": question},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "那上海呢？"},
    ]
    assert (body["model"], body["max_tokens"], body["temperature"]) == (model_id, 5, 0.7)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}

    page.screenshot(path=tmp_path / "chat.png")
    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "wider than a phone"
    page.screenshot(path=tmp_path / "chat-phone.png")

    page.click("#new-chat")
    expect(messages).to_have_count(0)
    message.fill("你好")
    message.press("Enter")
    expect(page.locator(".message.assistant .stats")).to_contain_text("tokens/s")
    assert [turn["role"] for turn in bodies[-1]["messages"]] == ["system", "user"]
    assert all(url.startswith(web_server) for url in urls), [url for url in urls if not url.startswith(web_server)]


def error_reply(status: int, message: str) -> dict:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    return {"status": status, "content_type": "application/json", "body": json.dumps({"error": error})}


def test_errors_api_key_and_escaping(page):
    bodies = chat_bodies(page)
    replies = [error_reply(401, "Invalid API key."), error_reply(400, "max_tokens is too large.")]
    authorizations = []

    def fake_chat(route):
        authorizations.append(route.request.headers.get("authorization"))
        route.fulfill(**replies.pop(0))

    page.route("**/v1/chat/completions", fake_chat)
    page.fill("#api-key", "sk-test-123")
    page.fill("#message", "你好")
    page.click("#send")
    error = page.locator(".message.error")
    expect(error).to_contain_text("API key")
    expect(error).to_contain_text("Invalid API key.")
    assert authorizations == ["Bearer sk-test-123"]
    # A failed turn is not kept: its text comes back to be sent again, and the next request has it once.
    expect(page.locator("#message")).to_have_value("你好")
    page.click("#send")
    expect(error.nth(1)).to_have_text("max_tokens is too large.")
    assert [len(body["messages"]) for body in bodies] == [1, 1]
    page.reload()
    expect(page.locator("#api-key")).to_have_value("sk-test-123")

    chunks = [{"role": "assistant"}, {"content": "<b>粗体</b>"}, {"content": " 🙂"}]
    events = [{"choices": [{"index": 0, "delta": delta, "finish_reason": None}]} for delta in chunks]
    events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    events.append({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}})
    stream = "".join(f"data: {json.dumps(event, ensure_ascii=False)}\n\n" for event in events) + "data: [DONE]\n\n"
    # Fed one byte at a time, so characters and lines arrive split: the page must decode and buffer across reads.
    page.evaluate(
        """(stream) => {
            const bytes = new TextEncoder().encode(stream);
            const body = new ReadableStream({
                start(controller) {
                    for (const byte of bytes) controller.enqueue(new Uint8Array([byte]));
                    controller.close();
                },
            });
            window.fetch = async () => new Response(body, {headers: {"Content-Type": "text/event-stream"}});
        }""",
        stream,
    )
    page.fill("#message", "写点 HTML")
    page.keyboard.press("Enter")
    answer = page.locator(".message.assistant")
    expect(answer.locator(".stats")).to_contain_text("stop")
    expect(answer.locator(".content")).to_have_text("<b>粗体</b> 🙂")
    expect(answer.locator("b")).to_have_count(0)
    expect(answer.locator(".stats")).to_contain_text("3 词元 tokens")


def test_default_settings_fit_the_served_models_context(browser, demo_sized_server):
    # The page used to ask for 256 new tokens whatever the model: the whole context of the demo chat model.
    url, lm = demo_sized_server
    context = browser.new_context()
    page = context.new_page()
    page.goto(url + "/")
    bodies = chat_bodies(page)
    expect(page.locator("#model")).to_have_text("demo-sized")
    expect(page.locator("#max-tokens")).to_have_value("128")  # half the context
    assert page.locator("#max-tokens").get_attribute("max") == "255"
    page.fill("#message", "你好")
    page.press("#message", "Enter")
    expect(page.locator(".message.assistant .stats")).to_contain_text("tokens/s", timeout=30_000)
    expect(page.locator(".message.error")).to_have_count(0)
    assert bodies[0]["max_tokens"] == 128
    # A question of about 150 tokens leaves fewer than 128 tokens of room: the page asks again for what fits.
    question = "第3句的颜色是什么？"
    while len(lm.encode_chat_prompt([{"role": "user", "content": question}], 1)) < 150:
        question += "第3句的颜色是什么？"
    page.click("#new-chat")
    page.fill("#message", question)
    page.press("#message", "Enter")
    expect(page.locator(".message.assistant .stats")).to_contain_text("tokens/s", timeout=30_000)
    expect(page.locator(".message.error")).to_have_count(0)
    assert bodies[-2]["max_tokens"] == 128 and "max_tokens" not in bodies[-1], [b.get("max_tokens") for b in bodies]
    page.click("#new-chat")
    page.fill("#max-tokens", "100000")
    page.fill("#message", "你好")
    page.press("#message", "Enter")
    expect(page.locator("#max-tokens")).to_have_value("255")  # held to the model's context
    expect(page.locator(".message.assistant .stats")).to_contain_text("tokens/s", timeout=30_000)
    assert bodies[-2]["max_tokens"] == 255 and "max_tokens" not in bodies[-1]
    context.close()


def test_explain_view_of_the_last_reply(page):
    page.fill("#max-tokens", "4")
    page.fill("#message", "你好")
    page.press("#message", "Enter")
    answer = page.locator(".message.assistant")
    expect(answer.locator(".stats")).to_contain_text("tokens/s")
    with page.expect_response("**/v1/explain") as response_info:
        answer.locator(".explain-button").click()
    found = response_info.value.json()
    assert response_info.value.request.post_data_json["reply"] == answer.locator(".content").text_content()
    rows = len(found["reply_tokens"])  # the reply's text tokenized again: four tokens or more
    columns = len(found["prompt_tokens"]) + rows - 1
    assert rows >= 4 and [len(row) for row in found["attention"]] == [columns] * rows
    view = answer.locator(".explain")
    expect(view.locator(".explain-cell")).to_have_count(rows * columns)  # a heat-map cell per reply token per column
    expect(view.locator(".row-label")).to_have_count(rows)
    expect(view.locator(".attribution span")).to_have_count(len(found["prompt_tokens"]))
    expect(view).to_contain_text("completeness error")
    # A second reply moves the button: only the last reply is explained.
    page.fill("#message", "再说一次")
    page.press("#message", "Enter")
    expect(page.locator(".message.assistant").nth(1).locator(".explain-button")).to_have_count(1)
    expect(page.locator(".explain-button")).to_have_count(1)
