"""limner's HTTP API as a Serve ingress: the FastAPI app on cheap CPU replicas.

Each ingress replica runs :func:`limner.server.create_app` over a
:class:`~limner.ray.RayRuntime`: decoding, the URL guard and the body limits run on the
ingress replicas, and only prepared arrays, texts and configs go on to the per-key model
applications. Serve's HTTP proxy hands requests to them, so the API is reached wherever Serve
listens. The app is built on each replica (``__serve_build_asgi_app__``), so nothing of it
(its registry, its plugins) has to pickle; the settings and the factories do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from limner import Registry
from limner.errors import InvalidInput

from ._cluster import import_ray
from ._runtime import RayRuntime

if TYPE_CHECKING:
    from limner.server import ServerSettings

__all__ = ["LimnerIngress", "http_ingress"]

INGRESS_DEPLOYMENT = "LimnerIngress"


class LimnerIngress:
    """A Serve ingress deployment's class: the app is built on the replica, entering the
    runtime with the app's lifespan (Serve runs it as uvicorn would)."""

    def __init__(
        self,
        settings: ServerSettings,
        registry: Callable[[], Registry] | None,
        runtime: Callable[[], RayRuntime],
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.runtime = runtime

    def __serve_build_asgi_app__(self) -> Any:
        from limner.server import create_app

        settings = dataclasses.replace(self.settings, runtime=self.runtime)
        registry = self.registry() if self.registry is not None else None
        return create_app(registry=registry, settings=settings)


def http_ingress(
    *,
    settings: ServerSettings | None = None,
    registry: Callable[[], Registry] | None = None,
    runtime: Callable[[], RayRuntime] = RayRuntime,
    num_cpus: float = 1,
    replicas: int = 1,
) -> Any:
    """A Serve application serving limner's HTTP API on ``replicas`` replicas of
    ``num_cpus`` each; run it with ``serve.run(http_ingress(), route_prefix="/")``.

    ``settings`` are the server's (without a ``runtime``: the ingress brings its own);
    ``registry`` makes the registry on each replica (default: the replica's plugins);
    ``runtime`` makes each replica's :class:`RayRuntime` (default ``RayRuntime()``, which
    joins the cluster the replica runs on). Replicas share the per-key applications: the
    first to need a key deploys it, the others use it.
    """
    if settings is not None and settings.runtime is not None:
        raise InvalidInput(
            "the ingress brings its own runtime: pass it as runtime=", field="settings.runtime"
        )
    if replicas < 1:
        raise InvalidInput("must be at least 1", input=replicas, field="replicas")
    if num_cpus < 0:
        raise InvalidInput("must be >= 0", input=num_cpus, field="num_cpus")
    from limner.server import ServerSettings

    import_ray()
    from ray import serve

    ingress = serve.ingress()(LimnerIngress)
    deployment = serve.deployment(ingress).options(
        name=INGRESS_DEPLOYMENT,
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus},
    )
    return deployment.bind(settings or ServerSettings(), registry, runtime)
