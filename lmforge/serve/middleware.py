"""What sits around the routes: the API key check, CORS, and error handlers that answer in OpenAI's shape.

Every error, bad input included, is an OpenAI-style `{"error": {message, type, param, code}}`
with a 4xx status: the official client retries each 5xx twice, so a 500 on bad input is felt
three times. Only a bug in the server itself answers 500.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lmforge.errors import UserError
from lmforge.serve import protocol

OPEN_PATHS = ("/health", "/")  # everything else needs the API key when one is set
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")  # bound here, only this machine can connect
LOCAL_NAMES = ("localhost", "127.0.0.1", "[::1]")  # the Host header names a keyless loopback server answers to


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        detail = protocol.ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return JSONResponse(
            protocol.ErrorResponse(error=detail).model_dump(), status_code=self.status, headers=self.headers
        )


class BearerAuth:
    """ASGI middleware: deny by default unless `Authorization: Bearer KEY` matches, compared in constant time.

    The only open routes are matched on the exact path the router sees, so no spelling of
    another path (`//v1/models`, `/v1/../v1/models`, `%2Fv1`, a forged Host) can pass as one.
    """

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan" or (
            scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope["path"] in OPEN_PATHS
        ):
            return await self.app(scope, receive, send)
        given = [value for name, value in scope.get("headers", []) if name == b"authorization"]
        # The scheme is case-insensitive (RFC 7235): "bearer KEY" is as good as "Bearer KEY".
        scheme, _, key = given[0].partition(b" ") if len(given) == 1 else (b"", b"", b"")
        # NOTE: compare_digest takes the same time wherever the strings differ, so timing leaks nothing.
        if scheme.lower() == b"bearer" and hmac.compare_digest(key, self.key):
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return  # a websocket is refused by closing it unanswered
        error = APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer YOUR_KEY'",
            "authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
        await error.response()(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a 413 for a request body over `max_bytes`, refused before it is read whole.

    A declared Content-Length over the limit is refused before a byte of the body is read; a chunked
    body is read up to the limit and refused as soon as it passes it. A body within the limit is
    read here and handed on, so no route ever parses more than `max_bytes` of JSON.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = [value for name, value in scope.get("headers", []) if name == b"content-length"]
        if declared and declared[0].isdigit() and int(declared[0]) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its whole body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():  # the body once, then the connection's own messages (a disconnect)
            nonlocal whole
            if whole is None:
                return await receive()
            message, whole = whole, None
            return message

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send) -> None:
        megabytes = self.max_bytes / 2**20
        error = APIError(
            413, f"the request body is larger than this server's limit of {megabytes:g} MiB "
            "(lmforge serve --max-body-mb)", code="request_too_large", headers={"Connection": "close"},
        )  # fmt: skip
        await error.response()(scope, receive, send)


class LocalHostsOnly:
    """ASGI middleware: answer only requests whose Host header names this machine (against DNS rebinding).

    A page on evil.example whose name is re-pointed at 127.0.0.1 reaches a keyless loopback server
    from the visitor's browser as the same origin; its requests still say `Host: evil.example`.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] in ("http", "websocket"):
            hosts = [_host_name(value) for name, value in scope.get("headers", []) if name == b"host"]
            if any(host not in LOCAL_NAMES for host in hosts):
                if scope["type"] == "websocket":
                    return  # refused by closing it unanswered
                error = APIError(
                    421, f"this server answers only to {', '.join(LOCAL_NAMES)} (it is bound to this machine "
                    f"without an API key), not to '{hosts[0]}'; use one of those names, or start it with --api-key",
                    code="host_not_allowed",
                )  # fmt: skip
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


def _host_name(header: bytes) -> str:
    """A Host header's name without its port, lower-cased: b"[::1]:8000" -> "[::1]", b"LocalHost:80" -> "localhost"."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.partition(":")[0]


def install_middleware(
    app: FastAPI, api_key: str | None, cors_origins: Sequence[str], bound_to: str | None, max_body_bytes: int
) -> None:
    """The body size limit, the API key check (when a key is set), CORS (when origins are given), error handlers.

    `bound_to`: the address the server listens on; a loopback one without an API key answers only
    Host headers naming this machine (`LocalHostsOnly`).
    """
    # Added first, so innermost: a request without the key is refused before its body is read.
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)
    if cors_origins:  # added after the key check, so it is an outer layer and answers preflight requests itself
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    if bound_to in LOOPBACK and not api_key:  # added last: the outermost layer
        app.add_middleware(LocalHostsOnly)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(UserError, _user_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _bug)


async def _api_error(request: Request, error: APIError) -> JSONResponse:
    return error.response()


async def _user_error(request: Request, error: UserError) -> JSONResponse:
    return APIError(400, str(error)).response()


async def _invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """pydantic's first problem (our own checks first) as a 400 naming the field (`param`), e.g. `messages.0.role`."""
    problems = error.errors()
    # Our own checks (value_error) are the most specific; a union's other members only report a type mismatch.
    problems = sorted(problems, key=lambda problem: problem.get("type") not in ("value_error", "unsupported_parameter"))
    first = problems[0] if problems else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON: {reason}", code="json_invalid").response()
    where = [str(part) for part in first.get("loc", ()) if _is_field(part)]
    param = ".".join(where) or None
    message = f"{param}: {first['msg']}" if param else str(first["msg"])
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problems)"
    return APIError(400, message, param=param, code=str(first.get("type", "invalid"))).response()


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return APIError(error.status_code, str(error.detail), kind, headers=error.headers).response()


async def _bug(request: Request, error: Exception) -> JSONResponse:
    return APIError(500, f"internal error: {error}", "server_error").response()


def _is_field(part: str | int) -> bool:
    """Whether a pydantic error location part names a field or index, not a union member ("str", "list[str]")."""
    if isinstance(part, int):
        return True
    return part != "body" and part.isidentifier() and part not in ("str", "int", "float", "bool", "list", "dict")
