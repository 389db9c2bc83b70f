"""The server-side request forgery guard: which URLs a client may make the server fetch.

``fetch_image_bytes`` calls the guard before every hop, redirects included, so a public URL
that redirects to ``http://169.254.169.254/`` is refused at the redirect. The check resolves
the host itself and refuses if *any* address is not public. There is a residual window: the
HTTP client resolves the name again when it connects, so a DNS server that answers a public
address to the guard and a private one a moment later (DNS rebinding) can still get through;
deployments that must close it should also filter egress at the network level.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

import anyio
import httpx

from limner.errors import FetchError

__all__ = ["Resolver", "URLGuard", "forbidden_reason"]

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


class URLGuard:
    """An async ``check_url`` hook for :func:`limner.fetch_image_bytes`.

    ``allow_private`` turns the address check off; ``trusted_hosts`` skip it by host name;
    ``fetch_hosts`` (when not None) is the only hosts that may be named at all.
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
        self.trusted_hosts = frozenset(host.lower() for host in trusted_hosts)
        self.fetch_hosts = (
            None if fetch_hosts is None else frozenset(h.lower() for h in fetch_hosts)
        )
        self.resolver = resolver

    async def __call__(self, url: httpx.URL) -> None:
        if url.scheme not in _SCHEMES:
            raise FetchError(f"refused: only http and https URLs are fetched, not {url.scheme!r}")
        host = url.host.lower().rstrip(".")
        if not host:
            raise FetchError(f"refused {url}: no host")
        if self.fetch_hosts is not None and host not in self.fetch_hosts:
            if not self.fetch_hosts:
                raise FetchError("refused: this server does not fetch URL inputs")
            raise FetchError(f"refused {url}: host {host!r} is not one this server fetches from")
        if self.allow_private or host in self.trusted_hosts:
            return
        literal = _literal(host)
        if literal is not None:
            addresses: list[IPAddress] = [literal]
        else:
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                resolved = await self.resolver(host, port)
            except OSError as error:
                raise FetchError(f"could not resolve {host!r}: {error}") from None
            addresses = [a for a in (_literal(text) for text in resolved) if a is not None]
            if not addresses:
                raise FetchError(f"could not resolve {host!r}: no addresses")
        for address in addresses:
            reason = forbidden_reason(address)
            if reason is not None:
                shown = host if literal is not None else f"{host} ({address})"
                raise FetchError(
                    f"refused {url}: {shown} is a {reason} address; this server only fetches "
                    "from public addresses (see allow_private_urls)"
                )
