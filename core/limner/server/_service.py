"""The per-app runtime: the pool, the fetch client, and the models bound to the pool."""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import httpx

from limner import (
    Capability,
    ImageEmbedder,
    ImageGenerator,
    LoraEntry,
    Model,
    ModelEntry,
    Pool,
    Registry,
    Runtime,
)
from limner.errors import InvalidInput, UnknownModelError

from ._errors import APIError
from ._guard import GuardedTransport, URLGuard
from ._limits import generation_limits
from ._schemas import GenerationLimits
from ._settings import ServerSettings

__all__ = ["Service"]

log = logging.getLogger("limner.server")


@dataclass
class Service:
    """What the routes share. ``pool`` (the runtime: a :class:`~limner.Pool` unless the
    settings make another) exists only while the app's lifespan runs."""

    registry: Registry
    settings: ServerSettings
    served: frozenset[str] | None
    """Canonical keys of the allow-list; None serves every key."""
    preload: tuple[str, ...]
    created: int = field(default_factory=lambda: int(time.time()))
    guard: URLGuard = field(init=False)
    pool: Runtime | None = None
    client: httpx.AsyncClient | None = None
    fetch_slots: anyio.CapacityLimiter | None = None
    ready: bool = False
    preload_errors: dict[str, str] = field(default_factory=dict)
    _bound: dict[str, Model] = field(default_factory=dict)
    _limits: dict[str, GenerationLimits | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.guard = URLGuard(
            allow_private=self.settings.allow_private_urls,
            trusted_hosts=self.settings.trusted_hosts,
            fetch_hosts=self.settings.fetch_hosts,
        )

    @classmethod
    def create(cls, registry: Registry, settings: ServerSettings) -> Service:
        """Resolve the allow-list and preloads now, so a typo fails at startup, not later."""
        served = None
        if settings.models is not None:
            served = frozenset(registry.spec(name).key for name in settings.models)
        preload = tuple(dict.fromkeys(registry.spec(name).key for name in settings.preload))
        for key in preload:
            if served is not None and key not in served:
                raise InvalidInput(
                    f"{key} is preloaded but not among the models served", field="preload"
                )
        return cls(registry=registry, settings=settings, served=served, preload=preload)

    # -- lifespan ---------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Start the pool and the fetch client, preload in the background, stop both after."""
        timeout = httpx.Timeout(self.settings.image_limits.fetch_timeout)
        # trust_env=False: no proxy from the environment, so the guard sees the real target;
        # the transport connects only to addresses the guard checked.
        client = httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=False,
            trust_env=False,
            transport=GuardedTransport(self.guard),
        )
        runtime = (
            self.settings.runtime()
            if self.settings.runtime is not None
            else Pool(**self.settings.pool_arguments(self.preload))
        )
        async with runtime as pool, client:
            self.pool, self.client = pool, client
            self.fetch_slots = anyio.CapacityLimiter(self.settings.max_concurrent_fetches)
            self._bound.clear()
            self.preload_errors.clear()
            try:
                async with anyio.create_task_group() as group:
                    group.start_soon(self._preload_all)
                    yield
                    group.cancel_scope.cancel()
            finally:
                self.ready = False
                self.pool = self.client = None
                self._bound.clear()

    def _announce(self) -> None:
        """Say at start-up what is served and how to call it: the first lines of the log."""
        keys = [entry.key for entry in self.entries()]
        scope = "every installed model" if self.served is None else "models"
        log.info("serving %s (%d): %s", scope, len(keys), ", ".join(keys) or "none")
        if self.settings.api_key is not None:
            log.info(
                "API key required: send 'Authorization: Bearer KEY' (the probes and the "
                "playground's files need none)"
            )
        else:
            log.info("no API key: any client that can connect may call every route")
        if self.preload:
            log.info("preloading %s; /readyz answers 503 until done", ", ".join(self.preload))

    async def _preload_all(self) -> None:
        self._announce()
        started = time.perf_counter()
        for key in self.preload:
            try:
                model = await self.model(key)
                assert self.pool is not None
                # The pool loads on first use; this is that first use without a request.
                await self.pool.load(model.backend)
            except Exception as error:
                self.preload_errors[key] = str(error)
                log.error("preloading %s failed: %s", key, " ".join(str(error).split()))
        self.ready = not self.preload_errors
        if self.ready and self.preload:
            log.info(
                "ready: %s preloaded in %.1f s",
                ", ".join(self.preload),
                time.perf_counter() - started,
            )
        elif self.preload_errors:
            log.error("not ready: /readyz answers 503 (%s failed)", ", ".join(self.preload_errors))

    def unavailable(self) -> str | None:
        """Why the runtime cannot serve now, if it says (a Ray runtime whose cluster's
        control plane does not answer); None otherwise."""
        says = getattr(self.pool, "unavailable", None)
        reason: str | None = says() if callable(says) else None
        return reason

    def serving(self) -> bool:
        """Ready: the preloads loaded and the runtime able to serve."""
        return self.ready and self.unavailable() is None

    # -- models -----------------------------------------------------------------------------

    def entries(self) -> list[ModelEntry]:
        entries = self.registry.entries()
        return [e for e in entries if self.served is None or e.key in self.served]

    async def loras(self) -> list[LoraEntry]:
        """The registry's LoRA adapters and which served models each fits (their headers
        are read in a thread, and building the models' fronts may import their plugins)."""
        keys = [e.key for e in self.entries() if e.capability is Capability.TEXT_TO_IMAGE]
        return await anyio.to_thread.run_sync(lambda: self.registry.loras(keys))

    def resolve(self, name: str) -> str:
        """The canonical key for a served key or alias; 404 (with suggestions) otherwise."""
        try:
            key = self.registry.spec(name).key
        except UnknownModelError:
            if self.served is None:
                raise
            key = None
        if self.served is not None and key not in self.served:
            names = sorted(
                {n for e in self.entries() for n in (e.key, *e.spec.aliases)}, key=str.lower
            )
            suggestions = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            raise APIError(
                404,
                f"Unknown model {name!r}."
                + (f" Did you mean: {', '.join(suggestions)}?" if suggestions else "")
                + " GET /v1/models lists the models this server serves.",
                param="model",
                code="model_not_found",
            )
        assert key is not None
        return key

    async def model(self, name: str) -> Model:
        """The model for a key or alias, bound to this server's pool; 404 when not served."""
        if self.pool is None:
            raise APIError(503, "the server is shutting down", type="server_error")
        key = self.resolve(name)
        bound = self._bound.get(key)
        if bound is None:
            # Building a front may import the plugin's heavy modules: never on the loop.
            model = await anyio.to_thread.run_sync(self.registry.get, key)
            bound = model.using(self.pool)
            if isinstance(bound, ImageEmbedder):  # the server's limits, not the registry's
                bound = bound.with_limits(self.settings.image_limits)
                bound.max_text_chars = self.settings.max_text_chars
            elif isinstance(bound, ImageGenerator):  # an edit's images, within them too
                bound = bound.with_limits(self.settings.image_limits)
            bound = self._bound.setdefault(key, bound)
        return bound

    async def limits(self, key: str) -> GenerationLimits | None:
        """A served text-to-image key's limits (see :func:`generation_limits`), worked out
        once; None for an embedding model, or when the plugin cannot tell (logged)."""
        if key not in self._limits:
            try:
                # Building a front may import the plugin's heavy modules: never on the loop.
                self._limits[key] = await anyio.to_thread.run_sync(self._work_out_limits, key)
            except Exception as error:
                log.warning("cannot tell %s's request limits: %s", key, error)
                self._limits[key] = None
        return self._limits[key]

    def _work_out_limits(self, key: str) -> GenerationLimits | None:
        model = self.registry.get(key)
        return generation_limits(model) if isinstance(model, ImageGenerator) else None

    async def embedder(self, name: str) -> ImageEmbedder:
        model = await self.model(name)
        if not isinstance(model, ImageEmbedder):
            raise _wrong_capability(model.key, "text-to-image", "/v1/images/generations")
        return model

    async def generator(self, name: str) -> ImageGenerator:
        model = await self.model(name)
        if not isinstance(model, ImageGenerator):
            raise _wrong_capability(model.key, "image-embedding", "/v1/embeddings")
        return model


def _wrong_capability(key: str, capability: str, route: str) -> APIError:
    return APIError(
        400,
        f"{key} is {'an' if capability[0] in 'aeiou' else 'a'} {capability} model; "
        f"use POST {route}",
        param="model",
        code="wrong_capability",
    )
