"""The server's OpenAPI document: FastAPI's, told two things it cannot infer from the routes.

Bad bodies get a 400 with an OpenAI error (serve/middleware.py), not the 422 FastAPI lists for every
body; and a streamed 200 is server-sent events whose `data` is a chunk (or an error) in JSON, or `[DONE]`.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from lmforge.serve import protocol

# Each streaming route and the protocol model of its chunks.
STREAMED_CHUNKS = (
    ("/v1/chat/completions", protocol.ChatCompletionChunk),
    ("/v1/completions", protocol.Completion),
)


def openapi_document(app: FastAPI) -> dict:
    """The document, built once and kept on the app."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for path, chunk in STREAMED_CHUNKS:
            _document_stream(schema, path, chunk)
        app.openapi_schema = schema
    return app.openapi_schema


def _document_stream(schema: dict, path: str, chunk: type[BaseModel]) -> None:
    components = schema["components"]["schemas"]
    definition = chunk.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(definition.pop("$defs", {}))
    components[chunk.__name__] = definition
    refs = [{"$ref": f"#/components/schemas/{kind}"} for kind in (chunk.__name__, "ErrorResponse")]
    json_text = {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": refs}}
    data = {"anyOf": [{"const": "[DONE]"}, json_text]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    schema["paths"][path]["post"]["responses"]["200"]["content"]["text/event-stream"] = {"itemSchema": event}
