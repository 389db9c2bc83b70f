"""The server-side request forgery guard: which URLs a client may make the server fetch.

Two parts. ``URLGuard.__call__`` is the ``check_url`` hook ``fetch_image_bytes`` calls before
every hop, redirects included: it refuses a scheme, a host outside ``fetch_hosts`` or a
private IP literal without a lookup. :class:`GuardedTransport`, under the server's HTTP
client, is where every request is decided: it resolves the host once, refuses the request if
*any* address is not public, and connects to an address it checked, with the original
``Host`` header and TLS server name. The HTTP client never resolves the name itself, so a DNS
server that answers a public address to the check and a private one a moment later (DNS
rebinding) gains nothing.

Host names are compared and resolved in one canonical form (IDNA-encoded as httpx sends
them, lower case, without the trailing dot of a fully qualified name), so ``LOCALHOST.`` or a
Unicode spelling is the same host to every check as to the connection.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

import anyio
import httpx

from limner.errors import FetchError, InvalidInput

__all__ = ["GuardedTransport", "Resolver", "URLGuard", "canonical_host", "forbidden_reason"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``(host, port) -> addresses``; raises ``OSError`` when the name does not resolve."""

_SCHEMES = frozenset({"http", "https"})


async def resolve_with_getaddrinfo(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host``, as text."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def forbidden_reason(address: IPAddress) -> str | None:
    """Why the server must not connect to ``address``, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        # ::ffff:10.0.0.1 and 2002:a00:1:: reach the IPv4 address they carry.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is not None and (inner := forbidden_reason(embedded)) is not None:
            return inner
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        ("not globally routable", not address.is_global),
    )
    for name, applies in checks:
        if applies:
            return name
    return None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def _canonical(raw_host: bytes) -> str:
    host = raw_host.decode("ascii").lower()
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]  # "example.com." is the fully qualified spelling of example.com
    if not host or (_literal(host) is None and "" in host.split(".")):
        raise InvalidInput(f"{raw_host.decode('ascii')!r} is not a valid host name")
    return host


def canonical_host(name: str) -> str:
    """``name`` in the one form the guard compares and resolves: IDNA-encoded as httpx sends
    it, lower case, without a trailing dot. ``InvalidInput`` for a name no DNS could hold."""
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):  # an IPv6 literal as a URL writes it
        text = text[1:-1]
    try:
        raw_host = httpx.URL(scheme="http", host=text).raw_host
    except httpx.InvalidURL as error:
        raise InvalidInput(f"{name!r} is not a valid host name: {error}") from None
    return _canonical(raw_host)


class URLGuard:
    """Which hosts and addresses URL inputs may reach.

    ``allow_private`` turns the address check off; ``trusted_hosts`` skip it by host name;
    ``fetch_hosts`` (when not None) is the only hosts that may be named at all. Called as a
    ``check_url`` hook it checks what needs no lookup; :meth:`addresses` is the whole check.
    """

    def __init__(
        self,
        *,
        allow_private: bool = False,
        trusted_hosts: Sequence[str] = (),
        fetch_hosts: Sequence[str] | None = None,
        resolver: Resolver = resolve_with_getaddrinfo,
    ) -> None:
        self.allow_private = allow_private
        self.trusted_hosts = frozenset(canonical_host(host) for host in trusted_hosts)
        self.fetch_hosts = (
            None if fetch_hosts is None else frozenset(canonical_host(h) for h in fetch_hosts)
        )
        self.resolver = resolver

    async def __call__(self, url: httpx.URL) -> None:
        """Refuse what needs no lookup: the scheme, a host outside ``fetch_hosts``, a private
        IP literal. The addresses a name resolves to are checked when it is connected to."""
        host = self._host(url)
        literal = _literal(host)
        if literal is not None and not self._unchecked(host):
            self._refuse_forbidden(url, host, [literal], looked_up=False)

    async def addresses(self, url: httpx.URL) -> list[str] | None:
        """The addresses to connect to for ``url``, every one of them checked; ``None`` when
        the host may be connected to by name (``allow_private``, a trusted host).

        The name is resolved here, once; ``FetchError`` when it does not resolve or when any
        of its addresses is not public.
        """
        host = self._host(url)
        if self._unchecked(host):
            return None
        literal = _literal(host)
        if literal is not None:
            self._refuse_forbidden(url, host, [literal], looked_up=False)
            return [str(literal)]
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            resolved = await self.resolver(host, port)
        except OSError as error:
            raise FetchError(f"could not resolve {host!r}: {error}") from None
        addresses = [a for a in (_literal(text) for text in resolved) if a is not None]
        if not addresses:
            raise FetchError(f"could not resolve {host!r}: no addresses")
        self._refuse_forbidden(url, host, addresses, looked_up=True)
        return list(dict.fromkeys(str(address) for address in addresses))

    def _host(self, url: httpx.URL) -> str:
        """The URL's host in canonical form, after the scheme and ``fetch_hosts`` checks."""
        if url.scheme not in _SCHEMES:
            raise FetchError(f"refused: only http and https URLs are fetched, not {url.scheme!r}")
        if not url.raw_host:
            raise FetchError(f"refused {url}: no host")
        try:
            host = _canonical(url.raw_host)
        except InvalidInput as error:
            raise FetchError(f"refused {url}: {error.reason}") from None
        if self.fetch_hosts is not None and host not in self.fetch_hosts:
            if not self.fetch_hosts:
                raise FetchError("refused: this server does not fetch URL inputs")
            raise FetchError(f"refused {url}: host {host!r} is not one this server fetches from")
        return host

    def _unchecked(self, host: str) -> bool:
        return self.allow_private or host in self.trusted_hosts

    def _refuse_forbidden(
        self, url: httpx.URL, host: str, addresses: list[IPAddress], *, looked_up: bool
    ) -> None:
        for address in addresses:
            reason = forbidden_reason(address)
            if reason is not None:
                shown = f"{host} ({address})" if looked_up else host
                raise FetchError(
                    f"refused {url}: {shown} is a {reason} address; this server only fetches "
                    "from public addresses (see allow_private_urls)"
                )


class GuardedTransport(httpx.AsyncBaseTransport):
    """Sends each request to an address ``guard`` checked, never to a name resolved again.

    The URL's host becomes the checked IP address; the ``Host`` header stays the original, and
    for HTTPS the TLS server name (SNI, and the name the certificate must hold) is the
    original host. Connections are not kept alive: a pooled connection to an IP address could
    otherwise carry a request for another name than the one its certificate was checked for.
    """

    def __init__(self, guard: URLGuard, *, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.guard = guard
        self.inner = inner or httpx.AsyncHTTPTransport(
            trust_env=False, limits=httpx.Limits(max_keepalive_connections=0)
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        addresses = await self.guard.addresses(request.url)
        if addresses is None:
            return await self.inner.handle_async_request(request)
        host = _canonical(request.url.raw_host)
        failure: httpx.ConnectError | None = None
        for address in addresses:  # in the resolver's order, as a client would try them
            pinned = httpx.Request(
                request.method,
                request.url.copy_with(host=address),
                headers=request.headers,  # the Host header names the original host
                stream=request.stream,
                extensions={**request.extensions, "sni_hostname": host},
            )
            try:
                return await self.inner.handle_async_request(pinned)
            except httpx.ConnectError as error:
                failure = error
        assert failure is not None
        raise failure

    async def aclose(self) -> None:
        await self.inner.aclose()
