"""Every failure as an OpenAI-style error body, so OpenAI clients report it as they would theirs.

One table maps limner's typed errors to HTTP statuses; the same mapping serves JSON responses
and the ``error`` events of a stream. Nothing about a request's input ever becomes a 500.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from limner import errors

__all__ = [
    "APIError",
    "ClientGone",
    "error_body",
    "install_error_handlers",
    "to_api_error",
    "validation_error",
]

log = logging.getLogger("limner.server")

# The config fields a backend names in InvalidInput, as the request fields a client sent.
_CONFIG_TO_REQUEST = {"width": "size", "height": "size", "num_images": "n", "guidance": "guidance"}


class APIError(Exception):
    """An error answer: status, OpenAI error fields, and any extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nobody is left to answer."""


def error_body(
    message: str, *, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def input_param(
    error: errors.InvalidInput, *, field: str | None = "input", indexed: bool = False
) -> str | None:
    """The request field an input error points at: ``input[3]`` for an item of a list."""
    if error.field is not None:
        return _CONFIG_TO_REQUEST.get(error.field, error.field)
    if indexed and error.index is not None:
        return f"{field}[{error.index}]"
    return field


_SERVER_ERRORS: tuple[tuple[type[errors.LimnerError], int, str], ...] = (
    (errors.MemoryExhausted, 503, "memory_exhausted"),
    (errors.ModelLoadError, 503, "model_load_failed"),
    (errors.Cancelled, 503, "cancelled"),
    (errors.ModelError, 500, "model_error"),
    (errors.PluginError, 500, "plugin_error"),
    (errors.LimnerError, 500, "limner_error"),
)
"""limner's errors that are the server's side, with their status and code."""


_RETRY_LATER: tuple[
    tuple[type[errors.PoolBusy | errors.WaitTimeout | errors.RuntimeUnavailable], int, str, str],
    ...,
] = (
    (errors.PoolBusy, 429, "rate_limit_error", "pool_busy"),
    (errors.WaitTimeout, 503, "server_error", "wait_timeout"),
    (errors.RuntimeUnavailable, 503, "server_error", "runtime_unavailable"),
)
"""limner's errors that say when to try again (``retry_after``), with their status, type and
code: the answer carries ``Retry-After``."""


def to_api_error(error: BaseException, *, param: str | None = None) -> APIError:
    """The answer for an exception raised while serving a request."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, errors.UnknownModelError):
        return APIError(404, str(error), param="model", code="model_not_found")
    if isinstance(error, errors.FetchError):
        return APIError(400, str(error), param=param, code="fetch_failed")
    if isinstance(error, errors.InvalidInput):
        return APIError(400, str(error), param=param, code="invalid_input")
    for later, status, error_type, code in _RETRY_LATER:
        if isinstance(error, later):
            headers = _retry_after(error.retry_after)
            return APIError(status, str(error), type=error_type, code=code, headers=headers)
    for kind, status, code in _SERVER_ERRORS:  # the most specific class first
        if isinstance(error, kind):
            return APIError(status, str(error), type="server_error", code=code)
    log.error("unexpected error while serving a request", exc_info=error)
    return APIError(500, "internal server error", type="server_error", code="internal_error")


def _retry_after(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds, at least one."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


# Union members pydantic names in an error's location: ("body", "input", "list[str]", 0);
# the others ("constrained-str", "function-after[...]") are not identifiers, as fields are.
_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _location(loc: Sequence[int | str]) -> str | None:
    """``("body", "input", "list[str]", 0)`` as ``input[0]``; None for the body as a whole."""
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
    text = ""
    for part in parts:
        if isinstance(part, str) and (part in _TYPE_TAGS or not part.isidentifier()):
            continue
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or None


# What pydantic says of a body that is not a JSON object: FastAPI parses a body as JSON
# only when its Content-Type says JSON, so a body sent without one arrives as bytes.
_NOT_AN_OBJECT = frozenset({"model_attributes_type", "dict_type", "model_type"})


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _token_ids(body: object) -> bool:
    """Whether an embeddings body's ``input`` holds token ids, OpenAI's other two shapes of it
    (a list of integers, or lists of them), as LangChain's ``OpenAIEmbeddings`` sends."""
    items = body.get("input") if isinstance(body, dict) else None
    if not isinstance(items, list) or not items:
        return False

    def integer(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    return all(map(integer, items)) or any(
        isinstance(item, list) and item and all(map(integer, item)) for item in items
    )


_TOKEN_IDS = (
    "{param} is token ids (integers, as OpenAI's tokenizer makes them); this server embeds "
    "texts and images, so send each input as a string. LangChain's OpenAIEmbeddings sends "
    "token ids unless it is made with check_embedding_ctx_length=False"
)


def validation_error(
    error: RequestValidationError, content_type: str | None, *, path: str = ""
) -> APIError:
    problems = error.errors()
    if not problems:
        return APIError(400, "invalid request", code="invalid_request")
    body_kind = next(
        (p.get("type") for p in problems if tuple(p.get("loc", ())) == ("body",)), None
    )
    if body_kind in _NOT_AN_OBJECT and not _is_json(content_type):
        sent = f"Content-Type {content_type!r}" if content_type else "no Content-Type"
        return APIError(
            400,
            f"the body must be a JSON object sent with Content-Type: application/json; this "
            f"request has {sent}",
            code="invalid_request",
        )
    # A union reports every member's complaint; the deepest one is about what was sent
    # (``input[1]`` of a list, not "input should be a string").
    first = max(problems, key=lambda p: len((_location(p.get("loc", ())) or "").split("[")))
    param = _location(first.get("loc", ()))
    if path.endswith("/v1/embeddings") and _token_ids(error.body):
        return APIError(
            400, _TOKEN_IDS.format(param=param), param=param, code="token_ids_not_supported"
        )
    kind = first.get("type", "")
    if kind == "json_invalid":
        message = "the body is not valid JSON"
        param = None
    elif kind == "missing":
        message = f"missing required field {param!r}" if param else "missing body"
    else:
        message = f"{param}: {first.get('msg', 'invalid')}" if param else first.get("msg", "")
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return APIError(400, message, param=param, code="invalid_request")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception the app can raise to an OpenAI-shaped answer."""

    async def on_api_error(request: Request, error: Exception) -> JSONResponse:
        return to_api_error(error).response()

    async def on_client_gone(request: Request, error: Exception) -> Response:
        return Response(status_code=499)  # never delivered; counted in the metrics as 499

    async def on_validation(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        content_type = request.headers.get("content-type")
        return validation_error(error, content_type, path=request.url.path).response()

    async def on_http(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        # FastAPI's own 400 is a body it could not parse (not UTF-8, nested too deep).
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed"}.get(
            error.status_code
        )
        return APIError(
            error.status_code,
            str(error.detail),
            type=kind,
            code=code,
            headers=dict(error.headers or {}),
        ).response()

    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(ClientGone, on_client_gone)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(errors.LimnerError, on_api_error)
    app.add_exception_handler(Exception, on_api_error)
