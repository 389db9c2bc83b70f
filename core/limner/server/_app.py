"""``create_app``: the FastAPI application over a registry and a pool it owns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi

from limner import Capability, Registry, __version__, default_registry

from ._docs import add_docs
from ._errors import install_error_handlers
from ._metrics import Metrics
from ._middleware import (
    OPEN_PATHS,
    APIKeyMiddleware,
    BodyLimitMiddleware,
    HeadMiddleware,
    HostCheckMiddleware,
    MetricsMiddleware,
)
from ._routes import add_routes
from ._service import Service
from ._settings import ServerSettings
from ._ui import add_ui

__all__ = ["create_app"]

_DESCRIPTION = """OpenAI-compatible image embeddings and image generation over limner's models.

Errors use OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`."""


def create_app(
    *, registry: Registry | None = None, settings: ServerSettings | None = None
) -> FastAPI:
    """An app serving ``registry``'s models (the default registry's when None).

    The allow-list and preloads are checked here, so a typo fails before the server starts.
    The pool starts with the app's lifespan, and every served model is bound to it.
    """
    registry = registry if registry is not None else default_registry()
    settings = settings if settings is not None else ServerSettings()
    service = Service.create(registry, settings)
    metrics = Metrics(
        stats=lambda: dict(service.pool.stats()) if service.pool is not None else None,
        ready=service.serving,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with service.running():
            yield

    app = FastAPI(
        title="limner",
        version=__version__,
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # add_docs serves Swagger UI without a CDN
        redoc_url=None,
    )
    app.state.limner = service
    app.state.limner_metrics = metrics
    install_error_handlers(app)
    add_routes(app)
    add_docs(app)
    if settings.ui:
        add_ui(app)
    # Added innermost first: metrics see every answer, a foreign Host is refused before
    # anything else, CORS answers preflights before the key check, and the key is checked
    # before a body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        )
    app.add_middleware(HeadMiddleware)
    if settings.api_key is None or settings.allowed_hosts:
        app.add_middleware(HostCheckMiddleware, allowed_hosts=settings.allowed_hosts)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=lambda: app.routes)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi(app, service, with_key=settings.api_key is not None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI, service: Service, *, with_key: bool) -> dict[str, Any]:
    """FastAPI's schema, less its 422s (this server answers 400), plus the bearer scheme and
    the served model names as each request's ``model`` choices."""
    schema = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    names: dict[Capability, list[str]] = {capability: [] for capability in Capability}
    for entry in service.entries():
        names[entry.capability].extend((entry.key, *entry.spec.aliases))
    bodies = {
        "EmbeddingRequest": Capability.IMAGE_EMBEDDING,
        "ImageRequest": Capability.TEXT_TO_IMAGE,
    }
    for body, capability in bodies.items():
        model = schema.get("components", {}).get("schemas", {}).get(body, {})
        if names[capability] and "model" in model.get("properties", {}):
            model["properties"]["model"]["enum"] = sorted(names[capability])
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
            if with_key and path in OPEN_PATHS:
                operation["security"] = []
    components = schema.setdefault("components", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.get("schemas", {}).pop(name, None)
    if with_key:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
    return schema
