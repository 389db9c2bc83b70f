"""What one HTTP server serves and how much it lets a client ask for."""

from __future__ import annotations

import dataclasses
import inspect
import ipaddress
import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from limner import DEFAULT_MAX_TEXT_CHARS, ImageLimits, Pool, PoolOptions, Runtime
from limner.errors import InvalidInput

from ._guard import canonical_host

__all__ = ["DEFAULT_SERVER_IMAGE_LIMITS", "ServerSettings"]

_POOL_FIELDS = frozenset(item.name for item in dataclasses.fields(PoolOptions))

_MIB = 1024 * 1024

DEFAULT_SERVER_IMAGE_LIMITS = ImageLimits(
    max_bytes=20 * _MIB, max_pixels=40_000_000, fetch_timeout=10.0, max_redirects=3
)
"""Tighter than the library's defaults: a server's inputs come from strangers on a network."""


def _names(value: Sequence[str] | None, field_name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):  # "a,b" by mistake would otherwise become ("a", ",", "b")
        raise InvalidInput("must be a sequence of names, not one string", field=field_name)
    names = tuple(value)
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise InvalidInput(f"{name!r} is not a name", field=field_name)
    return names


def _hosts(names: Sequence[str], field_name: str) -> tuple[str, ...]:
    """Host names as the URL guard compares them: ``Images.Example.`` is images.example."""
    try:
        return tuple(canonical_host(name) for name in names)
    except InvalidInput as error:
        raise InvalidInput(error.reason, field=field_name) from None


_HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")


def _allowed_hosts(names: Sequence[str]) -> tuple[str, ...]:
    """Names as a ``Host`` header gives them (IDNA, lower case), without a port; ``"*"``."""
    hosts = []
    for name in names:
        if name.strip() == "*":
            hosts.append("*")
            continue
        host = _hosts([name], "allowed_hosts")[0]
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOST_NAME.fullmatch(host):
                raise InvalidInput(
                    f"{name!r} is not a host name (a name or an IP address, without a port)",
                    field="allowed_hosts",
                ) from None
        hosts.append(host)
    return tuple(hosts)


def _check_api_key(key: str) -> None:
    """Refuse a key no request could match: the server trims the header's token, and HTTP
    headers cannot carry control characters, so such a key would lock every client out."""
    if not key.strip():
        raise InvalidInput("must not be empty; use None for no key", field="api_key")
    if key != key.strip():
        raise InvalidInput(
            "has whitespace at its start or end, which no Authorization header can match "
            "(the token is trimmed); remove it",
            field="api_key",
        )
    if any(ord(char) < 32 or ord(char) == 127 for char in key):
        raise InvalidInput(
            "holds a control character, which no HTTP header can carry; remove it",
            field="api_key",
        )


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Everything ``create_app`` needs besides the registry; validated on construction.

    Secure by default: no URL input may reach a private, loopback or link-local address, no
    cross-origin browser access, and bounded bodies, fetches and request times.
    """

    models: Sequence[str] | None = None
    """Keys or aliases served; ``None`` serves every key in the registry."""
    preload: Sequence[str] = ()
    """Keys loaded at startup; ``/readyz`` answers 200 once they all are. They are kept
    loaded (never evicted for idleness) unless ``pool_options`` sets their keep-alive."""
    api_key: str | None = field(default=None, repr=False)
    """When set, every route but ``/healthz``, ``/readyz`` and the playground page's files
    needs ``Authorization: Bearer``."""
    allow_private_urls: bool = False
    """Let URL inputs reach private, loopback, link-local and other non-public addresses."""
    trusted_hosts: Sequence[str] = ()
    """Host names (or IP literals) URL inputs may reach whatever they resolve to: an internal
    image store, say. Each redirect hop is checked on its own host."""
    fetch_hosts: Sequence[str] | None = None
    """When set, URL inputs (and their redirects) may only name these hosts; ``()`` turns URL
    inputs off."""
    max_body_bytes: int = 32 * _MIB
    """Largest request body accepted, counted while it is read (413 past it)."""
    request_timeout: float = 300.0
    """Seconds one request (a whole generation stream included) may take before a 504."""
    header_timeout: float = 10.0
    """Seconds a client has to send a request's line and headers, from its connection (or,
    on a kept-alive connection, the request's first byte); 408 and close past it."""
    body_timeout: float = 60.0
    """Seconds a client has to send a request's body once its headers are in; 408 and close
    past it. Also the longest the server reads and discards what a client still sends after
    an early answer (a 413) before closing."""
    max_connections: int = 512
    """Open connections at most (and at most half the open-file limit). Past it, the one
    waiting longest on its client (idle, or still sending its request) is closed for the new
    one; one being served never is."""
    image_limits: ImageLimits = DEFAULT_SERVER_IMAGE_LIMITS
    """Bounds on each image input: encoded bytes, pixels, fetch time, redirects."""
    max_inputs: int = 2048
    """Most items in one embeddings request."""
    max_text_chars: int = DEFAULT_MAX_TEXT_CHARS
    """Longest text item of an embeddings request, in characters (400 past it). CLIP reads
    only its first 77 tokens, a few hundred characters."""
    max_concurrent_fetches: int = 16
    """URL inputs fetched at once, across all requests."""
    cors_origins: Sequence[str] = ()
    """Origins allowed cross-origin browser access; empty turns CORS off."""
    allowed_hosts: Sequence[str] = ()
    """Names requests may give in their ``Host`` header besides loopback ones (``localhost``,
    ``127.0.0.1``, ``[::1]``); ``"*"`` is any. Checked when there is no ``api_key`` (a web page
    reaching the server through a rebinding domain has a foreign ``Host``), and with a key
    when set."""
    pool_options: Mapping[str, Any] | PoolOptions = field(default_factory=dict)
    """The server's :class:`~limner.Pool` settings: a :class:`~limner.PoolOptions`, or its
    keyword arguments as a mapping (``max_queue``, ...; ``memory`` and ``clock`` too)."""
    ui: bool = True
    """Serve the playground page at ``/``: a browser front end to this same API."""
    runtime: Callable[[], AbstractAsyncContextManager[Runtime]] | None = None
    """Makes the runtime the app serves through, entered for the app's lifespan (a
    :class:`limner.ray.RayRuntime`, say); ``None`` is a :class:`~limner.Pool` made of
    ``pool_options``."""

    def __post_init__(self) -> None:
        models = _names(self.models, "models")
        if models is not None and not models:
            raise InvalidInput("must name at least one model, or be None for all", field="models")
        object.__setattr__(self, "models", models)
        for name in ("preload", "trusted_hosts", "cors_origins", "allowed_hosts"):
            object.__setattr__(self, name, _names(getattr(self, name), name) or ())
        fetch_hosts = _names(self.fetch_hosts, "fetch_hosts")
        object.__setattr__(
            self,
            "fetch_hosts",
            None if fetch_hosts is None else _hosts(fetch_hosts, "fetch_hosts"),
        )
        object.__setattr__(self, "trusted_hosts", _hosts(self.trusted_hosts, "trusted_hosts"))
        object.__setattr__(self, "allowed_hosts", _allowed_hosts(self.allowed_hosts))
        if self.api_key is not None:
            _check_api_key(self.api_key)
        for name in (
            "max_body_bytes",
            "max_inputs",
            "max_text_chars",
            "max_concurrent_fetches",
            "max_connections",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"must be a positive integer, got {value!r}", field=name)
        for name in ("request_timeout", "header_timeout", "body_timeout"):
            seconds = getattr(self, name)
            if (
                isinstance(seconds, bool)
                or not isinstance(seconds, (int, float))
                or not (seconds > 0 and math.isfinite(seconds))
            ):
                raise InvalidInput(
                    f"must be a positive number of seconds, got {seconds!r}", field=name
                )
        if not isinstance(self.image_limits, ImageLimits):
            raise InvalidInput("must be an ImageLimits", field="image_limits")
        if not isinstance(self.pool_options, PoolOptions):
            options = dict(self.pool_options)
            try:
                inspect.signature(Pool).bind(**options)
            except TypeError as error:
                raise InvalidInput(f"not options of Pool: {error}", field="pool_options") from None
            settings = {name: value for name, value in options.items() if name in _POOL_FIELDS}
            try:
                PoolOptions(**settings)
            except InvalidInput as error:
                raise InvalidInput(str(error), field="pool_options") from None
            object.__setattr__(self, "pool_options", MappingProxyType(options))

    def pool_arguments(self, preloaded: Sequence[str]) -> dict[str, Any]:
        """The pool's keyword arguments: ``pool_options``, with preloaded keys kept alive."""
        given = self.pool_options
        options = given.keywords() if isinstance(given, PoolOptions) else dict(given)
        keep = dict(options.get("keep_alive_per_key") or {})
        for key in preloaded:
            keep.setdefault(key, math.inf)
        if keep:
            options["keep_alive_per_key"] = keep
        return options
