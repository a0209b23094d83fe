"""Fuzz the OpenAI-compatible API (serve/app.py) from its own OpenAPI document with schemathesis.

Every answer must be a documented status (never a 5xx) with a documented content type and body, and
requests that break the schema must be refused. Random model names mostly earn the 404 for an
unknown model, so a second run pins `model` to the served name and keeps replies short: those
requests reach the engine. A third runs against a server with an API key and sends none.

NOTE: `schemathesis.pytest.from_fixture` reads `Function._nodeid`, which pytest 9.2 no longer has,
so the tests draw cases from `APIOperation.as_strategy` under hypothesis themselves, one subtest
per operation.
"""

from collections import Counter
from collections.abc import Callable

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python.asgi import shutdown_lifespans

from lmforge.serve.app import create_app

MODEL = "tiny"
API_KEY = "sk-test"
CONFORMS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPEN_PATHS = ("/health",)  # "/" (the chat page) is left out of the OpenAPI document


def _fuzz(schema, subtests, mode: GenerationMode, max_examples: int, test: Callable, pin: Callable = lambda c: c):
    """Run `test` on cases hypothesis draws for each operation of `schema`, one subtest per operation."""
    if mode == GenerationMode.NEGATIVE:
        schema = schema.include(method="POST")  # a GET here has no input that can break its schema
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy(generation_mode=mode).map(pin)

        # database=None: every operation's `run` has the same source, so hypothesis would file them under one key.
        @settings(max_examples=max_examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            test(case)

        with subtests.test(msg=f"{operation.label} ({mode.value})"):
            run()


def _load(app, **request) -> schemathesis.BaseSchema:
    # Unsanitized, or a failure's curl line would read `"max_tokens": "[Filtered]"` (the name holds "token").
    config = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=config, **request)


@pytest.fixture(scope="module")
def open_schema(served_lm):
    # NOTE: schemathesis runs the app's lifespan (and so its engine thread) itself, once per app.
    yield _load(create_app(served_lm, model_name=MODEL))
    shutdown_lifespans()


@pytest.fixture(scope="module")
def locked_schema(served_lm):
    app = create_app(served_lm, model_name=MODEL, api_key=API_KEY)
    yield _load(app, headers={"Authorization": f"Bearer {API_KEY}"})  # the key only fetches the document
    shutdown_lifespans()


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
def test_api_conforms_to_its_schema(open_schema, subtests, mode):
    def test(case):
        case.call_and_validate(checks=[*CONFORMS, negative_data_rejection])

    _fuzz(open_schema, subtests, mode, 30, test)


def _served_and_short(case):
    """The served model, short replies, at most two choices: still valid by the schema, and quick to answer."""
    if case.method == "POST":
        case.body["model"] = MODEL
        for field in ("max_tokens", "max_completion_tokens"):
            if case.body.get(field) is not None:
                case.body[field] = min(case.body[field], 4)
        case.body["n"] = min(case.body.get("n", 1), 2)
        # A tool result answers a call of the message before it, which random messages seldom make: those are
        # 400s by design (tests/test_openai_client.py), so most generated conversations are kept plain here.
        for message in case.body.get("messages") or []:
            if isinstance(message, dict) and (message.get("role") == "tool" or message.get("content") is None):
                message.update(role="user", content=message.get("content") or "好")
                message.pop("tool_calls", None)
        if not case.body.get("tools"):
            case.body.pop("tool_choice", None)
    return case


def test_generation_conforms_to_its_schema(open_schema, subtests):
    replies = Counter()

    def test(case):
        response = case.call_and_validate(checks=CONFORMS)
        replies[case.path] += response.status_code == 200

    _fuzz(open_schema.include(method="POST"), subtests, GenerationMode.POSITIVE, 25, test, pin=_served_and_short)
    assert replies["/v1/chat/completions"] and replies["/v1/completions"], f"too few requests got a reply: {replies}"


def _strings(value, path=()):
    """Where the strings are in a JSON value: a list of key/index paths."""
    if isinstance(value, str):
        return [path]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    return [found for key, item in items for found in _strings(item, (*path, key))]


def _with_a_lone_surrogate(case):
    """The served model's short case with a lone surrogate (JSON "\\ud800") in one of its strings, or in all.

    Hypothesis draws only whole characters, so the surrogate is put in here: in the string the case's
    own size picks (a different field from case to case), or in every string of every third case.
    """
    case = _served_and_short(case)
    if case.method != "POST" or not isinstance(case.body, dict):
        return case
    places = _strings(case.body)
    size = len(str(case.body))
    for path in places if size % 3 == 0 else places[size % len(places) :][:1]:
        *parents, last = path
        holder = case.body
        for key in parents:
            holder = holder[key]
        holder[last] = holder[last][: size % 5] + "\ud800" + holder[last][size % 5 :]
    return case


def test_lone_surrogates_anywhere_are_refused_not_a_server_error(open_schema, subtests):
    statuses = Counter()

    def test(case):
        response = case.call_and_validate(checks=CONFORMS)
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text

    _fuzz(open_schema.include(method="POST"), subtests, GenerationMode.POSITIVE, 25, test, pin=_with_a_lone_surrogate)
    assert statuses[400] > 0, statuses  # the surrogates reached the server's checks


@pytest.mark.parametrize("mode", list(GenerationMode), ids=str)
def test_api_key_is_required(locked_schema, subtests, mode):
    def test(case):
        response = case.call_and_validate(checks=CONFORMS)
        if case.path in OPEN_PATHS:
            assert response.status_code == 200
        else:
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == ["Bearer"]

    _fuzz(locked_schema, subtests, mode, 15, test)
