"""The playground: one static page at ``/`` that drives the public API from a browser.

The page holds no data and no secret (the browser sends the API key with each API call), so
it and its assets are served without the key. They are read once, when the app is made;
no request ever touches the file system.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import FastAPI
from fastapi.responses import Response

__all__ = ["UI_PATHS", "add_ui"]

_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/ui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/ui/edit.js": ("edit.js", "text/javascript; charset=utf-8"),
    "/ui/style.css": ("style.css", "text/css; charset=utf-8"),
}

UI_PATHS = frozenset(_FILES)
"""The page and its assets: open without the API key, like the probes."""

# Only this origin, no inline code: the page cannot load anything from elsewhere, and an
# injected string could not run. Images come back as base64, shown through data: and blob:.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self' blob:; "
        "img-src 'self' data: blob:; form-action 'none'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_ui(app: FastAPI) -> None:
    """Serve the playground page at ``/`` and its script and stylesheet under ``/ui/``."""
    static = resources.files("limner.server") / "static"
    for path, (name, media_type) in _FILES.items():
        app.add_api_route(
            path,
            _endpoint((static / name).read_bytes(), media_type),
            methods=["GET"],
            include_in_schema=False,
            name=f"ui:{name}",
        )


def _endpoint(content: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve_file() -> Response:
        return Response(content, media_type=media_type, headers=_HEADERS)

    return serve_file
