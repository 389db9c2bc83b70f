"""`limner serve`: the HTTP API."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import click

from limner._pool import PoolOptions
from limner._pool._budget import MemoryBudget, parse_memory_size
from limner._registry._registry import default_registry
from limner.errors import InvalidInput

from ._app import _lora_dirs_option, _memory_option, _names, _os_reason, cli, lora_registry


@cli.command(
    epilog="""\b
Examples:
  limner serve --models limner/tiny-clip,limner/tiny-flux --preload limner/tiny-clip
  LIMNER_API_KEY=change-me limner serve --host 0.0.0.0 --port 9000
  limner serve --models flux-schnell --memory-budget 90%
  limner serve --memory-budget 20GB --memory-floor 4GB --max-wait 30
  limner serve --models flux-dev --lora-dir ~/loras
"""
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Only this machine can connect by default; 0.0.0.0 opens it to the "
    "network (set an API key).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on; 0 picks a free one (printed).",
)
@click.option("--models", "models", help="Comma-separated keys or aliases to serve (default: all).")
@click.option("--preload", help="Comma-separated keys to load at startup; /readyz waits for them.")
@click.option(
    "--api-key",
    envvar="LIMNER_API_KEY",
    show_envvar=True,
    help="Require 'Authorization: Bearer KEY' on every route but /healthz and /readyz. Prefer "
    "the environment variable: a command line is visible to other users.",
)
@click.option(
    "--allow-private-urls",
    is_flag=True,
    help="Let URL inputs reach private, loopback and link-local addresses (off: SSRF guard).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Allow browsers on this origin to call the API (repeatable; default: no CORS).",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="A name clients may give in the Host header besides localhost, 127.0.0.1 and [::1] "
    "(repeatable; '*' for any). Without an API key other names are refused: a web page "
    "cannot reach the server through a domain it rebinds to this address.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(0, min_open=True),
    default=10.0,
    show_default=True,
    help="Seconds a client has to send a request's headers; 408 and close past it.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds a client has to send a request's body once its headers are in; 408 and "
    "close past it.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=512,
    show_default=True,
    help="Open connections at most; past it the one waiting longest on its client is closed.",
)
@click.option("--no-ui", is_flag=True, help="Do not serve the playground page at /.")
@_lora_dirs_option
@_memory_option
@click.option(
    "--memory-floor",
    "memory_floor",
    metavar="SIZE",
    help="Memory kept available to the rest of the machine on each device, besides the "
    "budget: megabytes (2048, 2GB; 0 turns it off). Default: 5% of the device's, at most 2 GB.",
)
@click.option(
    "--max-wait",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="Seconds a request may wait for its model's turn (while other models hold the "
    "memory) before a 503 with Retry-After.",
)
@click.option(
    "--log-level",
    type=click.Choice(["critical", "error", "warning", "info", "debug"]),
    default="info",
    show_default=True,
    help="Least severe log lines shown (info: start-up, loads, one line per request).",
)
@click.option(
    "--runtime",
    "runtime_name",
    type=click.Choice(["pool", "ray"]),
    default="pool",
    show_default=True,
    help="Where models run: this process's pool, or a Ray cluster (pip install 'limner[ray]').",
)
@click.option(
    "--address",
    help="With --runtime ray: the cluster, 'auto' or ray://HOST:PORT (default: RAY_ADDRESS, "
    "else a local cluster started for the server).",
)
def serve(
    host: str,
    port: int,
    models: str | None,
    preload: str | None,
    api_key: str | None,
    allow_private_urls: bool,
    cors_origins: tuple[str, ...],
    allowed_hosts: tuple[str, ...],
    header_timeout: float,
    body_timeout: float,
    max_connections: int,
    no_ui: bool,
    memory_budget: MemoryBudget | None,
    log_level: str,
    memory_floor: str | None = None,
    max_wait: float = 60.0,
    runtime_name: str = "pool",
    address: str | None = None,
    lora_dirs: tuple[str, ...] = (),
) -> None:
    """Serve the models over HTTP: OpenAI-compatible embeddings and image generation.

    Routes: /v1/models, /v1/embeddings, /v1/images/generations (stream: true for progress
    events; "loras" for adapters of the --lora-dir folders), /v1/loras, /v1/pool, /metrics,
    /healthz, /readyz; the OpenAPI schema at /openapi.json; a
    playground page at / to try the models in a browser. Start-up says which models are
    served, whether a key is needed, and when the preloads are loaded.
    """
    try:
        import uvicorn

        from limner.server import ServerSettings, create_app, http_protocol
        from limner.server._heap import limit_malloc_arenas
    except ImportError as error:
        raise click.ClickException(
            f"the server needs its extra: pip install 'limner[server]' ({error})"
        ) from None
    if address is not None and runtime_name != "ray":
        raise click.UsageError("--address needs --runtime ray")
    cluster_lost = _StopOnClusterLoss()
    options = _pool_options(memory_budget, memory_floor, max_wait)
    try:
        settings = ServerSettings(
            models=_names(models),
            preload=_names(preload) or (),
            api_key=api_key or None,
            allow_private_urls=allow_private_urls,
            cors_origins=cors_origins,
            allowed_hosts=allowed_hosts,
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            max_connections=max_connections,
            ui=not no_ui,
            pool_options=options,
            runtime=(
                _ray_runtime(address, _names(preload), options, cluster_lost)
                if runtime_name == "ray"
                else None
            ),
        )
    except InvalidInput as error:
        hints = {"api_key": "'--api-key' / LIMNER_API_KEY", "allowed_hosts": "'--allowed-host'"}
        if error.field not in hints:
            raise
        raise click.BadParameter(error.reason, param_hint=hints[error.field]) from None
    app = create_app(registry=lora_registry(lora_dirs), settings=settings)
    limit_malloc_arenas(2)  # before the worker threads start: a flat heap under steady load
    if settings.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        click.echo(
            f"Warning: serving on {host} without an API key (--api-key); only requests naming "
            "a loopback host or an --allowed-host are answered.",
            err=True,
        )
    listener = _listen(host, port)  # a port in use fails here, in one line
    server: uvicorn.Server | None = None
    try:
        with _log_to_stderr(log_level):
            config = uvicorn.Config(
                app, http=http_protocol(app), log_level=log_level, timeout_graceful_shutdown=30
            )
            server = _announcing_server(uvicorn.Server)(config)
            cluster_lost.server = server
            try:
                with _stopped_by_sigterm():
                    server.run(sockets=[listener])
            except (KeyboardInterrupt, _Terminated):
                pass  # uvicorn already stopped gracefully: Ctrl-C and SIGTERM are the ways
    finally:
        listener.close()
    if cluster_lost.reason is not None:
        raise click.ClickException(f"the server stopped: {cluster_lost.reason}")
    if server is None or not server.started:
        raise click.ClickException("the server failed to start; see the log above")


class _Terminated(Exception):
    """SIGTERM, once uvicorn has stopped gracefully and hands the signal on."""


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM stops the server as Ctrl-C does, and the command then exits 0.

    uvicorn catches SIGTERM to stop gracefully, then raises it again for the handler it
    found; the default one would end the process with 143 after a clean stop. This one
    raises :class:`_Terminated` instead, which the command takes for a normal end.
    """

    def terminated(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, terminated)
    except ValueError:  # not the main thread: signals are not this command's to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, for uvicorn to serve on; a one-line error if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        advice = ""
        if error.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            advice = "; another program listens there: pick another --port (0 picks a free one)"
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {_os_reason(error)}{advice}"
        ) from None
    listener.set_inheritable(True)
    return listener


def _announcing_server(base: type[Any]) -> type[Any]:
    """uvicorn's server, saying where it listens once it serves: it does not when given a
    socket bound by someone else."""

    class Server(base):  # type: ignore[misc]
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started and sockets:
                import logging

                bound_host, bound_port = sockets[0].getsockname()[:2]
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                logging.getLogger("limner.server").info(
                    "running on http://%s:%d (Ctrl-C to quit)", shown, bound_port
                )

    return Server


@contextlib.contextmanager
def _log_to_stderr(log_level: str) -> Iterator[None]:
    """limner's server log beside uvicorn's, in its format (``INFO:     serving ...``), while
    the server runs; the logger is as it was afterwards."""
    import logging

    from uvicorn.logging import DefaultFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(DefaultFormatter("%(levelprefix)s %(message)s", use_colors=None))
    logger = logging.getLogger("limner")
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(log_level.upper())
    logger.propagate = False  # not twice under --verbose, whose handler is the root's
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


_STOP_SECONDS = 30.0
"""How long the server may take to stop once its Ray cluster's control plane is lost,
before the process exits anyway."""


class _StopOnClusterLoss:
    """What the Ray runtime calls when it gives up on the cluster's control plane: the
    server stops (and `limner serve` exits with status 1, saying why); if it has not within
    ``_STOP_SECONDS``, the process exits at once."""

    def __init__(self) -> None:
        self.server: Any = None
        self.reason: str | None = None

    def __call__(self, reason: str) -> None:
        self.reason = reason
        if self.server is not None:
            self.server.should_exit = True
        watchdog = threading.Timer(_STOP_SECONDS, self._exit_now)
        watchdog.daemon = True
        watchdog.start()

    def _exit_now(self) -> None:
        logging.getLogger("limner.server").error(
            "the server did not stop within %g s of losing the Ray cluster (%s): exiting now",
            _STOP_SECONDS,
            self.reason,
        )
        os._exit(1)


def _pool_options(budget: MemoryBudget | None, floor: str | None, max_wait: float) -> PoolOptions:
    """The pool's settings from the flags; a bad one is a usage error naming its flag."""
    floor_mb = None
    if floor is not None:
        try:
            floor_mb = parse_memory_size(floor, field="--memory-floor")
        except InvalidInput as error:
            raise click.BadParameter(error.reason, param_hint="'--memory-floor'") from None
    return PoolOptions(**(budget or {}), memory_floor_mb=floor_mb, max_wait=max_wait)


def _ray_runtime(
    address: str | None,
    preload: tuple[str, ...] | None,
    options: PoolOptions,
    on_lost: Callable[[str], object],
) -> Callable[[], Any]:
    """What makes the server's Ray runtime, once Ray Serve is known to be installed.
    Preloaded keys keep a replica, as the pool keeps them loaded. The pool settings the
    flags changed go to every replica's pool. ``on_lost`` is called if the cluster's control
    plane is lost for good."""
    try:
        import ray.serve  # noqa: F401

        from limner.ray import RayKeyOptions, RayRuntime
    except ImportError as error:
        raise click.ClickException(
            f"--runtime ray needs Ray Serve: pip install 'limner[ray]' ({error})"
        ) from None

    defaults = PoolOptions().keywords()
    changed = {k: v for k, v in options.keywords().items() if v != defaults[k]}

    def make() -> RayRuntime:
        registry = default_registry()
        kept = {
            registry.spec(name).key: RayKeyOptions(min_replicas=1, pool_options=changed)
            for name in preload or ()
        }
        return RayRuntime(
            address=address,
            options=RayKeyOptions(pool_options=changed),
            options_per_key=kept,
            on_control_plane_lost=on_lost,
        )

    return make
