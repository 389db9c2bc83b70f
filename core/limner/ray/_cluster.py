"""The blocking calls to Ray and Serve, which the runtime runs in threads: joining the
cluster, each limner application's status, deploying and deleting one, and the nodes'
resources.

Kept apart so that every direct use of Ray's and Serve's APIs (and their private corners)
is in one place, with plain values (and :class:`~limner.ray._keys.KeyEntry`) in and out.
Ray is imported inside each function, never when this module is imported.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from limner.errors import LimnerError

from ._keys import KeyEntry
from ._usage import BOARD_NAME, BOARD_NAMESPACE, Board

__all__ = [
    "NOT_DEPLOYED",
    "AppStatus",
    "app_handle",
    "board",
    "connect",
    "control_plane",
    "delete_application",
    "disconnect",
    "import_ray",
    "nodes",
    "run_application",
    "statuses",
    "unreachable",
]

_DEPLOYMENT = "LimnerReplica"

_DEPLOYING = threading.Lock()
"""One deployment at a time per process: Serve registers and unregisters its request
router's module for pickling by value around each, process-wide, and two at once fail
(``... is not registered for pickle by value``)."""


def import_ray() -> Any:
    try:
        import ray
        import ray.serve  # Serve must be installed too
    except ImportError as error:
        raise LimnerError(
            f"the Ray runtime needs Ray Serve: pip install 'limner[ray]' ({error})"
        ) from None
    return ray


@dataclass(frozen=True)
class AppStatus:
    """One application as Serve last reported it."""

    status: str
    running: int
    message: str = ""


NOT_DEPLOYED = AppStatus(status="NOT_STARTED", running=0)


def connect(
    address: str | None, init_options: Mapping[str, Any], log_level: str
) -> tuple[bool, Any]:
    """Join Ray (starting it when this process is not connected) and Serve, and return
    whether Ray was started here (to shut it down at the end) and the cluster's board
    actor; Ray started here is shut down again if the rest fails."""
    ray = import_ray()
    from ray import serve

    started = False
    if not ray.is_initialized():
        ray.init(address=address, **init_options)
        started = True
    try:  # Serve's HTTP proxies are not needed: calls go through handles
        serve.start(proxy_location="Disabled", logging_config={"log_level": log_level})
        found = board()
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return started, found


def board() -> Any:
    """The cluster's board actor: the running one, else a new one (the first runtime's, or
    one made again after it died). Ray restarts it if its process dies."""
    ray = import_ray()
    return (
        ray.remote(Board)
        .options(
            name=BOARD_NAME,
            namespace=BOARD_NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
        )
        .remote()
    )


def control_plane() -> list[tuple[str, str, int]]:
    """What to probe to know the control plane answers, as ``(what, host, port)``: the GCS
    and this node's raylet. Nothing through Ray Client (its server is the one to watch)."""
    ray = import_ray()
    if ray.util.client.ray.is_connected():
        return []
    host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
    targets = [("the GCS", host, int(port))]
    node = getattr(ray._private.worker.global_worker, "node", None)
    if node is not None and node.node_manager_port:
        targets.append(("this node's raylet", node.node_ip_address, int(node.node_manager_port)))
    return targets


def unreachable(targets: Sequence[tuple[str, str, int]], timeout: float) -> str | None:
    """Why the first of ``targets`` that takes no TCP connection within ``timeout`` seconds
    does not (None: every one does)."""
    for what, host, port in targets:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as error:
            reason = errno.errorcode.get(error.errno or 0) or type(error).__name__
            return f"{what} at {host}:{port} takes no connection ({reason})"
    return None


def disconnect(
    apps: Collection[str],
    prefix: str,
    *,
    kill: Sequence[Any],
    shutdown: bool,
    reachable: bool = True,
) -> None:
    """Delete ``apps`` (waiting up to 30 s until Serve lists them no more) and kill the
    actors in ``kill``, unless the control plane is not ``reachable`` (they would hang); shut
    Ray down if ``shutdown`` (it was started here: only what it started ends), whatever
    failed before."""
    ray = import_ray()
    from ray import serve

    try:
        if not reachable:
            return
        for app in apps:
            serve.delete(app, _blocking=False)
        deadline = time.monotonic() + 30
        while set(apps) & set(statuses(prefix)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for actor in kill:
            ray.kill(actor)
    finally:
        if shutdown:
            ray.shutdown()


def run_application(entry: KeyEntry, log_level: str) -> Any:
    """Deploy the key's application without waiting for its replicas; return its handle."""
    from ray import cloudpickle, serve

    from ._replica import LimnerReplica

    assert entry.resources is not None
    arguments = (entry.spec, entry.settings, dict(entry.options.pool_options))
    try:
        cloudpickle.dumps(arguments)
    except Exception as error:
        raise LimnerError(
            f"{entry.key}'s spec, settings or pool options do not pickle, so they cannot "
            f"reach a replica: {error!r}"
        ) from None
    with warnings.catch_warnings():  # metrics_interval_s: deprecated, still what counts
        warnings.simplefilter("ignore", DeprecationWarning)
        deployment = serve.deployment(LimnerReplica).options(
            name=_DEPLOYMENT,
            ray_actor_options=entry.resources.ray_actor_options(),
            autoscaling_config=entry.options.autoscaling_config(),
            max_ongoing_requests=entry.options.max_ongoing_requests,
            logging_config={"log_level": log_level, "enable_access_log": False},
            graceful_shutdown_wait_loop_s=0.1,
        )
        with _DEPLOYING:
            return serve._run(
                deployment.bind(*arguments, True),
                name=entry.app,
                route_prefix=None,
                _blocking=False,
            )


def delete_application(app: str) -> None:
    from ray import serve

    serve.delete(app)


def app_handle(app: str) -> Any:
    from ray import serve

    return serve.get_app_handle(app)


def statuses(prefix: str) -> dict[str, AppStatus]:
    """Each application named ``prefix...`` as Serve sees it."""
    from ray import serve

    found: dict[str, AppStatus] = {}
    for name, status in serve.status().applications.items():
        if not name.startswith(prefix):
            continue
        deployments = status.deployments.values()
        running = sum(int(d.replica_states.get("RUNNING", 0)) for d in deployments)
        messages = [status.message] + [d.message for d in deployments]
        found[name] = AppStatus(
            status=str(getattr(status.status, "value", status.status)),
            running=running,
            message="; ".join(m for m in messages if m),
        )
    return found


def nodes(kind: str) -> list[dict[str, float]]:
    """Each live node's total or available resources."""
    from ray._private import state

    if kind == "total":
        per_node = state.total_resources_per_node()
    else:
        per_node = state.available_resources_per_node()
    return [dict(resources) for resources in per_node.values()]
