"""limner over HTTP: OpenAI-compatible embeddings and image generation.

Needs the ``server`` extra (``pip install 'limner[server]'``)::

    from limner.server import ServerSettings, create_app

    app = create_app(settings=ServerSettings(models=["limner/tiny-clip"], api_key="secret"))

or from a shell, ``limner serve --models limner/tiny-clip``. See docs/http.md.
"""

from __future__ import annotations

from limner._exports import present_as_public

from ._app import create_app
from ._settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]

present_as_public(__name__, globals(), __all__)
