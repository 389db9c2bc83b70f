"""limner over HTTP: OpenAI-compatible embeddings and image generation.

Needs the ``server`` extra (``pip install 'limner[server]'``)::

    from limner.server import ServerSettings, create_app

    app = create_app(settings=ServerSettings(models=["limner/tiny-clip"], api_key="secret"))

or from a shell, ``limner serve --models limner/tiny-clip``. Under uvicorn, pass
``http=http_protocol(app)`` for the connection limits (slow clients, open connections, a
lingering close). See docs/http.md.
"""

from __future__ import annotations

from limner._exports import present_as_public

from ._app import create_app
from ._connections import http_protocol
from ._settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "http_protocol"]

present_as_public(__name__, globals(), __all__)
