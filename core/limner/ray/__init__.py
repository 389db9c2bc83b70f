"""limner on a Ray cluster: the same models and calls, served by Ray Serve.

::

    import limner
    from limner.ray import RayRuntime

    async with RayRuntime(address="auto") as runtime:
        model = limner.embedder("openai/clip-vit-base-patch32").using(runtime)
        vectors = await model.embed_images(["cat.jpg"])

Each model key is one Serve application whose replicas each run a limner
:class:`~limner.Pool` over a backend built on the replica. Importing this module imports
no ray: that happens when a runtime starts (``pip install 'limner[ray]'``).
:func:`http_ingress` serves limner's HTTP API from Serve replicas over the same runtime. See
docs/distributed.md.
"""

from __future__ import annotations

from limner._exports import present_as_public

from ._ingress import http_ingress
from ._placement import GPU_MB, NoRoomInCluster, RayKeyOptions, ReplicaResources
from ._runtime import RayRuntime

__all__ = [
    "GPU_MB",
    "NoRoomInCluster",
    "RayKeyOptions",
    "RayRuntime",
    "ReplicaResources",
    "http_ingress",
]

present_as_public(__name__, globals(), __all__)
