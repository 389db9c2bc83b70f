"""The server's ``image_limits`` govern decoding, for every input kind, over real HTTP."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

import httpx
from PIL import Image

from limner import ImageLimits
from limner.testing import fake_embedding_spec

if TYPE_CHECKING:
    from tests.server.conftest import ErrorOf, Served, ServerFactory

    from tests.conftest import LocalHTTPServer as LocalServer

MODEL = "fake/embedder"


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


def embed(served: Served, items: Any) -> httpx.Response:
    with served.client() as client:
        return client.post("/v1/embeddings", json={"model": MODEL, "input": items})


def test_a_custom_max_pixels_is_honoured_for_every_input_kind(
    make_server: ServerFactory, http_server: LocalServer, error_of: ErrorOf
) -> None:
    served = make_server(
        fake_embedding_spec(MODEL),
        image_limits=ImageLimits(max_pixels=1000),
        trusted_hosts=["127.0.0.1"],
    )
    small, large = png((20, 20)), png((64, 48))
    url = http_server.route("/image-limits/64x48.png", body=large, content_type="image/png")
    for item in (data_url(large), b64(large), url):
        response = embed(served, [data_url(small), item])
        assert response.status_code == 400, (item[:40], response.text)
        error = error_of(response)
        assert error["param"] == "input[1]"
        assert error["code"] == "invalid_input"
        assert "input #1" in error["message"]
        assert "64 x 48 = 3072 pixels is over the limit of 1000" in error["message"]
    small_url = http_server.route("/image-limits/20x20.png", body=small, content_type="image/png")
    within = embed(served, [data_url(small), b64(small), small_url])
    assert within.status_code == 200, within.text
    assert len(within.json()["data"]) == 3


def test_the_default_limits_refuse_over_40_megapixels(
    make_server: ServerFactory, error_of: ErrorOf
) -> None:
    served = make_server(fake_embedding_spec(MODEL))
    huge = png((7000, 7000), mode="1")  # a few kilobytes; 49 MP once decoded
    response = embed(served, data_url(huge))
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "input"
    assert error["code"] == "invalid_input"
    assert "7000 x 7000 = 49000000 pixels is over the limit of 40000000" in error["message"]


def test_refused_formats_are_named(make_server: ServerFactory, error_of: ErrorOf) -> None:
    served = make_server(fake_embedding_spec(MODEL))
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "ICO")
    response = embed(served, ["data:image/x-icon;base64," + b64(buffer.getvalue())])
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "input[0]"
    assert error["code"] == "invalid_input"
    assert "ICO images are not accepted" in error["message"]
