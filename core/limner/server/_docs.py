"""``/docs``: Swagger UI over the served schema, its script and stylesheet served from here.

FastAPI's own page loads Swagger UI from a CDN, so it is blank on a machine without the
internet, which is where many a model server runs. The two files come from the
``fastapi-offline`` package (a dependency of the server extra: Swagger UI 5, which reads
OpenAPI 3.1, MIT-licensed around Swagger UI's Apache-2.0 build), read once when the app is
made, like the playground's. The page asks for nothing else: no favicon, no validator badge.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response

__all__ = ["DOCS_PATH", "add_docs"]

DOCS_PATH = "/docs"
_ASSETS = {
    f"{DOCS_PATH}/swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript"),
    f"{DOCS_PATH}/swagger-ui.css": ("swagger-ui.css", "text/css"),
}
# The files change only with the package: a browser may keep them for an hour.
_ASSET_HEADERS = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"}


def add_docs(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` (``app`` made with ``docs_url=None``) and its two files
    under it. The schema's URL is taken relative to the app's root path, as FastAPI does."""
    static = resources.files("fastapi_offline") / "static"
    for path, (name, media_type) in _ASSETS.items():
        app.add_api_route(
            path,
            _asset((static / name).read_bytes(), media_type),
            methods=["GET"],
            include_in_schema=False,
            name=f"docs:{name}",
        )
    openapi_url = app.openapi_url or "/openapi.json"
    js_url, css_url = _ASSETS

    async def swagger_ui(request: Request) -> HTMLResponse:
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=root + js_url,
            swagger_css_url=root + css_url,
            swagger_favicon_url="data:,",  # no icon request: nothing to fetch from elsewhere
            # No badge from validator.swagger.io: that would be a request to the internet.
            swagger_ui_parameters={"validatorUrl": None},
        )

    app.add_api_route(DOCS_PATH, swagger_ui, methods=["GET"], include_in_schema=False)


def _asset(content: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve_asset() -> Response:
        return Response(content, media_type=media_type, headers=_ASSET_HEADERS)

    return serve_asset
