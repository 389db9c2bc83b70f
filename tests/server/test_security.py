"""API keys, CORS, and the guard that keeps URL inputs off private addresses."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio
import httpx
import pytest

import limner
from limner import ImageLimits, InvalidInput
from limner.errors import FetchError
from limner.server import ServerSettings
from limner.server._guard import GuardedTransport, URLGuard, forbidden_reason
from limner.testing import fake_embedding_spec

if TYPE_CHECKING:
    from tests.server.conftest import ErrorOf, Served, ServerFactory, WaitFor

    from tests.conftest import LocalHTTPServer as LocalServer


KEY = "s3cret-key"


@pytest.fixture
def keyed(make_server: ServerFactory) -> Served:
    return make_server(fake_embedding_spec("fake/embedder"), api_key=KEY)


@pytest.fixture
def guarded(make_server: ServerFactory) -> Served:
    """Default settings: the address guard on, nothing trusted."""
    return make_server(fake_embedding_spec("fake/embedder"))


def embed(served: Served, item: str) -> httpx.Response:
    with served.client() as client:
        return client.post("/v1/embeddings", json={"model": "fake/embedder", "input": item})


# -- API key ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing API key"),
        ({"Authorization": "Bearer wrong-key"}, "invalid API key"),
        ({"Authorization": f"Bearer {KEY}x"}, "invalid API key"),
        ({"Authorization": f"Basic {KEY}"}, "invalid API key"),
        ({"Authorization": KEY}, "invalid API key"),
    ],
)
def test_routes_refuse_a_missing_or_wrong_key(
    keyed: Served, error_of: ErrorOf, headers: dict[str, str], message: str
) -> None:
    with keyed.client(headers=headers) as client:
        for method, path in (
            ("GET", "/v1/models"),
            ("POST", "/v1/embeddings"),
            ("POST", "/v1/images/generations"),
            ("GET", "/v1/pool"),
            ("GET", "/metrics"),
            ("GET", "/openapi.json"),
            ("GET", "/v2/unknown"),
        ):
            response = client.request(method, path, json={"model": "fake/embedder", "input": "x"})
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer"
            error = error_of(response)
            assert error["code"] == "invalid_api_key"
            assert message in error["message"]


def test_the_right_key_works_and_probes_need_none(keyed: Served) -> None:
    with keyed.client(headers={"Authorization": f"Bearer {KEY}"}) as client:
        assert client.get("/v1/models").status_code == 200
        assert embed_with(client, "hello").status_code == 200
        schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    with keyed.client() as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_probes_without_the_key_say_only_not_ready(
    make_server: ServerFactory, error_of: ErrorOf, wait_for: WaitFor
) -> None:
    served = make_server(
        fake_embedding_spec("fake/broken", options={"fail_loads": 100}),
        preload=["fake/broken"],
        api_key=KEY,
    )
    with served.client() as client:
        wait_for(lambda: bool(served.app.state.limner.preload_errors), what="the preload to fail")
        anonymous = client.get("/readyz")
        keyed = client.get("/readyz", headers={"Authorization": f"Bearer {KEY}"})
        wrong = client.get("/readyz", headers={"Authorization": "Bearer wrong"})
    for answer in (anonymous, wrong):
        assert answer.status_code == 503
        assert error_of(answer) == {
            "message": "not ready",
            "type": "server_error",
            "param": None,
            "code": "not_ready",
        }
        assert "fake/broken" not in answer.text
    assert keyed.status_code == 503
    assert "fake/broken" in error_of(keyed)["message"]
    assert "injected load failure" in error_of(keyed)["message"]


class _UnavailablePool(limner.Pool):
    """A runtime that says it cannot serve, as a Ray runtime whose cluster's control plane
    is gone does."""

    def unavailable(self) -> str | None:
        return "lost the Ray cluster's control plane at 10.1.2.3:6379"


def test_probes_without_the_key_say_not_ready_when_the_runtime_is_gone(
    make_server: ServerFactory, error_of: ErrorOf
) -> None:
    served = make_server(
        fake_embedding_spec("fake/embedder"), api_key=KEY, runtime=_UnavailablePool
    )
    with served.client() as client:
        anonymous = client.get("/readyz")
        keyed = client.get("/readyz", headers={"Authorization": f"Bearer {KEY}"})
    assert anonymous.status_code == 503
    assert error_of(anonymous)["message"] == "not ready"
    assert "10.1.2.3" not in anonymous.text
    assert keyed.status_code == 503
    assert error_of(keyed)["code"] == "runtime_unavailable"
    assert "10.1.2.3" in error_of(keyed)["message"]


def test_probes_without_the_key_say_not_ready_while_loading(
    make_server: ServerFactory, error_of: ErrorOf
) -> None:
    gate = threading.Event()
    served = make_server(
        fake_embedding_spec("fake/slow-load", options={"gate": gate}),
        preload=["fake/slow-load"],
        api_key=KEY,
    )
    try:
        with served.client() as client:
            anonymous = client.get("/readyz")
            keyed = client.get("/readyz", headers={"Authorization": f"Bearer {KEY}"})
    finally:
        gate.set()
    assert error_of(anonymous)["message"] == "not ready"
    assert "retry-after" not in anonymous.headers  # loading looks as failed does
    assert "fake/slow-load" in error_of(keyed)["message"]


def embed_with(client: httpx.Client, item: str) -> httpx.Response:
    return client.post("/v1/embeddings", json={"model": "fake/embedder", "input": item})


# -- Host (DNS rebinding) ---------------------------------------------------------------------


def get_as(served: Served, host: str, path: str = "/v1/models") -> httpx.Response:
    """``path`` with a forged ``Host``, as a browser sends it for a rebinding domain."""
    with served.client(headers={"Host": host, **served.auth}) as client:
        return client.get(path)


def test_a_foreign_host_is_refused_without_a_key(guarded: Served, error_of: ErrorOf) -> None:
    for host in ("rebind.attacker.example", "rebind.attacker.example:8000", "10.0.0.5:8000"):
        for path in ("/v1/models", "/healthz", "/"):
            answer = get_as(guarded, host, path)
            assert answer.status_code == 400, (host, path)
            error = error_of(answer)
            assert error["code"] == "invalid_host"
            assert "--allowed-host" in error["message"]
    with guarded.client() as client:  # the refusals were counted like any answer
        metrics = client.get("/metrics").text
    assert 'route="/v1/models",status="400"' in metrics


def test_loopback_names_are_answered_without_a_key(guarded: Served) -> None:
    for host in ("127.0.0.1:8000", "localhost", "LOCALHOST.:80", "app.localhost", "[::1]:8000"):
        assert get_as(guarded, host).status_code == 200, host


def test_allowed_hosts_are_answered_and_others_still_refused(
    make_server: ServerFactory,
) -> None:
    served = make_server(fake_embedding_spec("fake/embedder"), allowed_hosts=["Models.Example"])
    assert get_as(served, "models.example:8000").status_code == 200
    assert get_as(served, "models.example.").status_code == 200
    assert get_as(served, "127.0.0.1").status_code == 200
    assert get_as(served, "rebind.attacker.example").status_code == 400
    anything = make_server(fake_embedding_spec("fake/embedder"), allowed_hosts=["*"])
    assert get_as(anything, "rebind.attacker.example").status_code == 200


def test_with_a_key_the_host_is_checked_only_as_configured(make_server: ServerFactory) -> None:
    keyed = make_server(fake_embedding_spec("fake/embedder"), api_key=KEY)
    assert get_as(keyed, "models.internal:8000").status_code == 200  # the key guards it
    both = make_server(
        fake_embedding_spec("fake/embedder"), api_key=KEY, allowed_hosts=["models.internal"]
    )
    assert get_as(both, "models.internal").status_code == 200
    assert get_as(both, "rebind.attacker.example").status_code == 400


def test_host_names_are_read_as_browsers_send_them() -> None:
    from limner.server._middleware import host_allowed, host_name

    assert host_name(b"Example.COM:8000") == "example.com"
    assert host_name(b"[::1]:8000") == "::1"
    assert host_name(b"[::1]") == "::1"
    assert host_name(b"localhost.") == "localhost"
    for bad in (b"", b"a:b:c", b"[::1", b"[::1]x", b"host:port", b"\xff"):
        assert host_name(bad) is None, bad
    assert host_allowed(None, ())  # HTTP/1.0 without a Host: no browser sends that
    assert host_allowed(b"127.9.9.9", ())
    assert not host_allowed(b"127.0.0.1.nip.io", ())
    assert not host_allowed(b"localhost.attacker.example", ())
    with pytest.raises(InvalidInput, match="allowed_hosts"):
        ServerSettings(allowed_hosts=["not a host"])


# -- CORS -------------------------------------------------------------------------------------

PREFLIGHT = {
    "Origin": "https://app.example",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_cors_is_off_by_default(guarded: Served) -> None:
    with guarded.client() as client:
        preflight = client.options("/v1/embeddings", headers=PREFLIGHT)
        simple = client.get("/v1/models", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in preflight.headers
    assert "access-control-allow-origin" not in simple.headers


def test_cors_allows_only_the_configured_origins(make_server: ServerFactory) -> None:
    served = make_server(
        fake_embedding_spec("fake/embedder"), cors_origins=["https://app.example"], api_key=KEY
    )
    with served.client() as client:
        allowed = client.options("/v1/embeddings", headers=PREFLIGHT)
        other = client.options(
            "/v1/embeddings", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
        real = client.get(
            "/v1/models",
            headers={"Origin": "https://app.example", "Authorization": f"Bearer {KEY}"},
        )
    assert allowed.status_code == 200  # a preflight needs no key: browsers send none
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in other.headers
    assert real.headers["access-control-allow-origin"] == "https://app.example"


# -- URL inputs: the address guard end to end -------------------------------------------------


def test_a_loopback_url_is_refused_by_default_without_a_request(
    guarded: Served, error_of: ErrorOf, http_server: LocalServer
) -> None:
    url = http_server.route("/guard/loopback.png", body=b"never served", content_type="image/png")
    for target in (url, url.replace("127.0.0.1", "localhost")):
        response = embed(guarded, target)
        assert response.status_code == 400
        error = error_of(response)
        assert (error["param"], error["code"]) == ("input", "fetch_failed")
        assert "loopback address" in error["message"]
    assert http_server.hits_for("/guard/") == []


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://10.1.2.3/cat.png", "private"),
        ("http://192.168.1.10:8080/cat.png", "private"),
        ("http://172.16.0.1/cat.png", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://[::1]/cat.png", "loopback"),
        ("http://[::ffff:10.0.0.1]/cat.png", "private"),
        ("http://0.0.0.0/cat.png", "unspecified"),
        ("http://224.0.0.1/cat.png", "multicast"),
        ("http://100.64.0.1/cat.png", "not globally routable"),
    ],
)
def test_private_literals_are_refused_before_any_connection(
    guarded: Served, error_of: ErrorOf, url: str, reason: str
) -> None:
    response = embed(guarded, url)
    assert response.status_code == 400
    message = error_of(response)["message"]
    assert f"is a {reason} address" in message
    # Refused by the guard, not by a failed connection (which no machine here should try).
    assert "timed out" not in message
    assert "connect" not in message.lower()


def test_file_urls_are_refused(guarded: Served, error_of: ErrorOf) -> None:
    response = embed(guarded, "file:///etc/passwd")
    assert response.status_code == 400
    assert "unsupported URL scheme 'file'" in error_of(response)["message"]


def test_a_redirect_from_a_trusted_host_into_loopback_is_refused(
    make_server: ServerFactory, error_of: ErrorOf, http_server: LocalServer
) -> None:
    # 127.0.0.1 is trusted by name; the redirect names localhost, which is checked on its own.
    served = make_server(fake_embedding_spec("fake/embedder"), trusted_hosts=["127.0.0.1"])
    image = http_server.route("/guard/target.png", body=_png(), content_type="image/png").replace(
        "127.0.0.1", "localhost"
    )
    hop = http_server.route("/guard/hop", status=302, location=image)
    direct = embed(served, http_server.url("/image.png"))
    assert direct.status_code == 200  # the trusted host itself is fetched
    response = embed(served, hop)
    assert response.status_code == 400
    error = error_of(response)
    assert error["code"] == "fetch_failed"
    assert "localhost" in error["message"] and "loopback" in error["message"]
    assert http_server.hits_for("/guard/hop") == ["/guard/hop"]
    assert http_server.hits_for("/guard/target") == []  # never requested


def test_a_redirect_to_a_fully_qualified_loopback_name_is_refused(
    make_server: ServerFactory, error_of: ErrorOf, http_server: LocalServer
) -> None:
    served = make_server(fake_embedding_spec("fake/embedder"), trusted_hosts=["127.0.0.1"])
    port = http_server.url("/").split(":")[-1].rstrip("/")
    for index, name in enumerate(("localhost.", "LOCALHOST.")):
        target = http_server.route(f"/guard/dot-{index}.png", body=_png(), content_type="image/png")
        hop = http_server.route(
            f"/guard/dot-hop-{index}",
            status=302,
            location=target.replace(f"127.0.0.1:{port}", f"{name}:{port}"),
        )
        response = embed(served, hop)
        assert response.status_code == 400, name
        assert "loopback" in error_of(response)["message"]
        assert http_server.hits_for(f"/guard/dot-{index}") == []  # never requested


class Rebinding:
    """A DNS server that answers a public address first and loopback afterwards."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        return ["93.184.215.14"] if len(self.asked) == 1 else ["127.0.0.1"]


def test_dns_rebinding_cannot_reach_loopback(
    make_server: ServerFactory, error_of: ErrorOf, http_server: LocalServer
) -> None:
    served = make_server(
        fake_embedding_spec("fake/embedder"),
        image_limits=ImageLimits(fetch_timeout=3.0, max_redirects=0),
    )
    resolver = Rebinding()
    served.app.state.limner.guard.resolver = resolver
    url = http_server.route("/guard/rebind.png", body=_png(), content_type="image/png")
    response = embed(served, url.replace("127.0.0.1", "localhost"))
    # The connection goes to the public address the check saw (unreachable from a test
    # machine, or no image server there), never to a second answer's loopback.
    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "fetch_failed"
    assert http_server.hits_for("/guard/rebind") == []
    assert resolver.asked == ["localhost"]  # resolved once, for the check and the connection


def test_fetch_hosts_empty_turns_url_inputs_off(
    make_server: ServerFactory, error_of: ErrorOf, http_server: LocalServer
) -> None:
    served = make_server(
        fake_embedding_spec("fake/embedder"), fetch_hosts=[], allow_private_urls=True
    )
    response = embed(served, http_server.url("/image.png"))
    assert response.status_code == 400
    assert "does not fetch URL inputs" in error_of(response)["message"]


def test_allow_private_urls_lets_loopback_through(
    make_server: ServerFactory, http_server: LocalServer
) -> None:
    served = make_server(fake_embedding_spec("fake/embedder"), allow_private_urls=True)
    assert embed(served, http_server.url("/image.png")).status_code == 200


def _png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


# -- the guard itself, with a scripted resolver -----------------------------------------------


class Resolver:
    """Answers from a table; records every lookup. No DNS traffic leaves the machine."""

    def __init__(self, table: dict[str, Sequence[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"{host}: name does not resolve")
        return self.table[host]


def check(guard: URLGuard, url: str) -> list[str] | None:
    """The whole check, as the transport makes it before connecting."""
    return anyio.run(guard.addresses, httpx.URL(url))


def test_guard_passes_public_names_and_refuses_any_private_answer() -> None:
    resolver = Resolver(
        {
            "images.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
            "mixed.example": ["93.184.215.14", "10.0.0.7"],
            "rebind.example": ["::ffff:127.0.0.1"],
        }
    )
    guard = URLGuard(resolver=resolver)
    check(guard, "https://images.example/cat.png")
    with pytest.raises(FetchError, match=r"mixed.example \(10.0.0.7\) is a private address"):
        check(guard, "http://mixed.example/cat.png")
    with pytest.raises(FetchError, match="loopback"):
        check(guard, "http://rebind.example/")
    with pytest.raises(FetchError, match=r"could not resolve 'nowhere\.example'"):
        check(guard, "http://nowhere.example/")
    assert resolver.asked == [
        "images.example",
        "mixed.example",
        "rebind.example",
        "nowhere.example",
    ]


def test_guard_literals_skip_the_resolver_and_settings_relax_it() -> None:
    def never(*args: Any) -> Any:
        raise AssertionError("the resolver must not be asked")

    strict = URLGuard(resolver=never)
    with pytest.raises(FetchError, match="private"):
        check(strict, "http://192.168.0.1/")
    check(URLGuard(allow_private=True, resolver=never), "http://192.168.0.1/")
    check(URLGuard(trusted_hosts=["Store.Internal"], resolver=never), "http://store.internal/")
    limited = URLGuard(fetch_hosts=["cdn.example"], resolver=Resolver({"cdn.example": ["1.1.1.1"]}))
    check(limited, "https://cdn.example/a.png")
    with pytest.raises(FetchError, match="not one this server fetches from"):
        check(limited, "https://other.example/a.png")
    with pytest.raises(FetchError, match="only http and https"):
        check(strict, "ftp://1.1.1.1/a.png")


def test_the_hook_refuses_what_needs_no_lookup_and_asks_no_resolver() -> None:
    def never(*args: Any) -> Any:
        raise AssertionError("the hook must not resolve: the transport does, once")

    guard = URLGuard(fetch_hosts=["cdn.example"], resolver=never)
    anyio.run(guard, httpx.URL("https://cdn.example/a.png"))
    with pytest.raises(FetchError, match="not one this server fetches from"):
        anyio.run(guard, httpx.URL("https://other.example/a.png"))
    strict = URLGuard(resolver=never)
    with pytest.raises(FetchError, match="loopback"):
        anyio.run(strict, httpx.URL("http://127.0.0.1./a.png"))


def test_host_names_are_compared_and_resolved_in_one_canonical_form() -> None:
    resolver = Resolver({"xn--bcher-kva.example": ["93.184.215.14"], "cdn.example": ["1.1.1.1"]})
    guard = URLGuard(
        trusted_hosts=["Store.Internal.", "BÜCHER.example"],
        fetch_hosts=["CDN.Example.", "store.internal", "xn--bcher-kva.example"],
        resolver=resolver,
    )
    for trusted in ("http://store.internal/", "http://STORE.INTERNAL./", "http://bücher.example/"):
        assert check(guard, trusted) is None, trusted  # connected by name, unchecked
    assert check(guard, "https://CDN.example./a.png") == ["1.1.1.1"]
    untrusted = URLGuard(resolver=resolver)
    assert check(untrusted, "http://Bücher.Example./") == ["93.184.215.14"]
    assert resolver.asked == ["cdn.example", "xn--bcher-kva.example"]  # as httpx sends it
    for bad in ("http://localhost../", "http://a..b/"):
        with pytest.raises(FetchError, match="not a valid host name"):
            check(untrusted, bad)
    settings = ServerSettings(trusted_hosts=["Store.Internal."], fetch_hosts=["BÜCHER.example"])
    assert settings.trusted_hosts == ("store.internal",)
    assert settings.fetch_hosts == ("xn--bcher-kva.example",)
    with pytest.raises(InvalidInput) as caught:
        ServerSettings(trusted_hosts=["bad..name"])
    assert caught.value.field == "trusted_hosts"


def test_the_transport_connects_to_the_checked_address_with_the_original_host(
    http_server: LocalServer,
) -> None:
    class Pinned(URLGuard):
        """Checked and found public (a test cannot own one): the local server's address."""

        async def addresses(self, url: httpx.URL) -> list[str] | None:
            return ["127.0.0.1"]

    port = http_server.url("/").split(":")[-1].rstrip("/")
    http_server.route("/guard/pinned.png", body=_png(), content_type="image/png")

    async def fetch() -> httpx.Response:
        async with httpx.AsyncClient(transport=GuardedTransport(Pinned())) as client:
            return await client.get(f"http://images.example:{port}/guard/pinned.png")

    response = anyio.run(fetch)
    assert response.status_code == 200 and response.content == _png()
    assert str(response.request.url) == f"http://images.example:{port}/guard/pinned.png"
    [hit] = [hit for hit in http_server.hits if hit.path == "/guard/pinned.png"]
    assert hit.headers["Host"] == f"images.example:{port}"


def test_the_transport_names_the_host_for_tls_and_tries_each_checked_address() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "93.184.215.14":
            raise httpx.ConnectError("unreachable", request=request)
        return httpx.Response(200, content=b"ok")

    guard = URLGuard(resolver=Resolver({"images.example": ["93.184.215.14", "1.1.1.1"]}))
    transport = GuardedTransport(guard, inner=httpx.MockTransport(answer))

    async def fetch() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport) as client:
            return await client.get("https://Images.Example./cat.png")

    assert anyio.run(fetch).content == b"ok"
    assert [str(request.url) for request in seen] == [
        "https://93.184.215.14/cat.png",
        "https://1.1.1.1/cat.png",
    ]
    for request in seen:
        assert request.headers["Host"] == "images.example."  # as the client sent it
        assert request.extensions["sni_hostname"] == "images.example"


def test_forbidden_reason_covers_the_special_ranges() -> None:
    import ipaddress

    cases = {
        "8.8.8.8": None,
        "2606:4700:4700::1111": None,
        "127.0.0.2": "loopback",
        "10.255.0.1": "private",
        "fd00::1": "private",
        "fe80::1": "link-local",
        "ff02::1": "multicast",
        "240.0.0.1": "reserved",
        "198.18.0.1": "private",  # benchmarking range
        "2002:7f00:1::": "loopback",  # 6to4 of 127.0.0.1
    }
    for text, reason in cases.items():
        assert forbidden_reason(ipaddress.ip_address(text)) == reason, text
