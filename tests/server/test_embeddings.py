"""POST /v1/embeddings on the tiny CLIP and fakes: every input kind, both encodings, errors."""

from __future__ import annotations

import base64
import io
import threading
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from limner.testing import FakeMemory, fake_embedding_spec

if TYPE_CHECKING:
    from tests.server.conftest import ErrorOf, Served, ServerFactory, WaitFor

    from tests.conftest import LocalHTTPServer as LocalServer


TINY_CLIP = "limner/tiny-clip"


def png(colour: tuple[int, int, int] = (200, 30, 40), size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + b64(data)


def embed(served: Served, model: str, items: Any, **extra: Any) -> httpx.Response:
    with served.client() as client:
        return client.post("/v1/embeddings", json={"model": model, "input": items, **extra})


def vectors(response: httpx.Response) -> npt.NDArray[np.float32]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    assert body["usage"] == {"prompt_tokens": 0, "total_tokens": 0}
    assert [row["index"] for row in body["data"]] == list(range(len(body["data"])))
    assert {row["object"] for row in body["data"]} == {"embedding"}
    return np.array([row["embedding"] for row in body["data"]], dtype=np.float32)


def test_text_embeds_on_clip_as_unit_vectors(main: Served) -> None:
    response = embed(main, TINY_CLIP, "a red fox")
    assert response.json()["model"] == TINY_CLIP
    [vector] = vectors(response)
    assert vector.shape == (64,)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-3)
    batch = vectors(embed(main, TINY_CLIP, ["a red fox", "a blue whale", "a red fox"]))
    assert np.allclose(batch[0], vector, atol=1e-5)
    assert np.allclose(batch[0], batch[2], atol=1e-5)
    assert not np.allclose(batch[0], batch[1], atol=1e-3)


def test_an_image_gives_the_same_vector_as_data_url_base64_and_url(
    main: Served, http_server: LocalServer
) -> None:
    image = png()
    url = http_server.route("/server-tests/red.png", body=image, content_type="image/png")
    response = embed(main, TINY_CLIP, [data_url(image), b64(image), url])
    rows = vectors(response)
    assert rows.shape == (3, 64)
    assert np.allclose(rows[0], rows[1], atol=1e-5)
    assert np.allclose(rows[0], rows[2], atol=1e-5)
    other = vectors(embed(main, TINY_CLIP, data_url(png(colour=(10, 200, 90)))))
    assert not np.allclose(rows[0], other[0], atol=1e-3)


def test_mixed_texts_and_images_keep_their_order(main: Served) -> None:
    image = data_url(png())
    alone_text = vectors(embed(main, TINY_CLIP, "a lighthouse"))[0]
    alone_image = vectors(embed(main, TINY_CLIP, image))[0]
    mixed = vectors(embed(main, TINY_CLIP, ["a lighthouse", image, "a lighthouse", image]))
    for index, expected in enumerate([alone_text, alone_image, alone_text, alone_image]):
        assert np.allclose(mixed[index], expected, atol=1e-5), index


def test_base64_encoding_is_little_endian_float32(main: Served) -> None:
    floats = vectors(embed(main, TINY_CLIP, ["a cat", "a dog"]))
    response = embed(main, TINY_CLIP, ["a cat", "a dog"], encoding_format="base64")
    assert response.status_code == 200
    encoded = [row["embedding"] for row in response.json()["data"]]
    assert all(isinstance(text, str) for text in encoded)
    decoded = np.stack([np.frombuffer(base64.b64decode(text), dtype="<f4") for text in encoded])
    assert decoded.shape == (2, 64)
    assert np.array_equal(decoded, floats)


def test_a_server_file_path_is_never_read(main: Served, error_of: ErrorOf, tmp_path: Any) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(png())
    # On a text model the path is just text: the same vector as that text, not the image's.
    as_text = vectors(embed(main, TINY_CLIP, str(path)))[0]
    image = vectors(embed(main, TINY_CLIP, data_url(png())))[0]
    assert not np.allclose(as_text, image, atol=1e-3)
    # On an image-only model it is neither an image nor usable text.
    refused = embed(main, "fake/images-only", ["data:image/png;base64," + b64(png()), str(path)])
    assert refused.status_code == 400
    error = error_of(refused)
    assert error["param"] == "input[1]"
    assert "neither an image" in error["message"]


def test_text_that_merely_looks_like_other_inputs_stays_text(main: Served) -> None:
    lookalikes = [
        "data: 3 apples, 2 pears",  # not a data URL: a data URL's header has no spaces
        b64(b"plain words, long enough to pass for base64"),  # base64, but not of an image
        "/etc/hostname",  # a path is text too
    ]
    rows = vectors(embed(main, TINY_CLIP, lookalikes))  # as images, each would be a 400
    for index, text in enumerate(lookalikes):
        alone = vectors(embed(main, TINY_CLIP, text))[0]
        # The same text: equal up to bf16 noise from padding to the batch's longest text.
        assert float(rows[index] @ alone) > 0.999


def _png_padded_with(padding: str) -> bytes:
    """A PNG (bytes after IEND are ignored) whose base64 ends in ``padding``."""
    data = png()
    while len(data) % 3 != {"": 0, "=": 2, "==": 1}[padding]:
        data += b"\x00"
    return data


@pytest.mark.parametrize(
    "item",
    [
        b64(_png_padded_with("=="))[:-1],  # one '=' where two are due
        b64(_png_padded_with("=")) + "=",  # two where one is due
        b64(_png_padded_with("")) + "==",  # padding where none is due
        b64(_png_padded_with(""))[:-3],  # a length no base64 can have
    ],
)
def test_base64_of_an_image_with_wrong_padding_is_400_never_text(
    main: Served, error_of: ErrorOf, item: str
) -> None:
    response = embed(main, TINY_CLIP, ["fine text", item])
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "input[1]"
    assert "not valid base64: wrong length or padding" in error["message"]


def test_base64_without_padding_is_the_same_image(main: Served) -> None:
    image = _png_padded_with("==")
    rows = vectors(embed(main, TINY_CLIP, [b64(image), b64(image).rstrip("=")]))
    assert np.allclose(rows[0], rows[1], atol=1e-5)


def test_webp_and_gif87a_in_base64_are_images(main: Served) -> None:
    def encoded(fmt: str, **params: Any) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), (200, 30, 40)).save(buffer, fmt, **params)
        return buffer.getvalue()

    gif = encoded("GIF")
    gif87a = b"GIF87a" + gif[6:]
    items = [b64(png()), b64(encoded("WEBP", lossless=True)), b64(gif87a)]
    rows = vectors(embed(main, TINY_CLIP, items))
    for row in rows[1:]:
        assert float(row @ rows[0]) > 0.99  # the same picture, not a text


@pytest.mark.parametrize(
    ("header", "refused"),
    [
        (b"RIFX\x30\x00\x00\x00WEBPVP8L", None),  # WEBP at 8 without RIFF: no WebP
        (b"RIFF\x30\x00\x00\x00WAVEfmt ", None),
        (b"\x00\x00\x00\x18ftypisom", None),  # an MP4: ftyp, but no image brand
        (b"\x00\x00\x00\x1cftypavif", "AVIF images are not accepted"),
        (b"\x00\x00\x00\x1cftypheic", "HEIC images are not accepted"),
        (b"qoif\x00\x00\x00\x10", "QOI images are not accepted"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 images are not accepted"),
    ],
)
def test_base64_is_an_image_exactly_when_it_starts_with_an_image_signature(
    main: Served, error_of: ErrorOf, header: bytes, refused: str | None
) -> None:
    item = b64(header + b"\x00" * 40)
    response = embed(main, TINY_CLIP, ["fine text", item])
    if refused is None:  # text, embedded as any other
        assert vectors(response).shape == (2, 64)
    else:  # an image of a format that is refused by name
        assert response.status_code == 400, response.text
        assert error_of(response)["param"] == "input[1]"
        assert refused in error_of(response)["message"]


def test_data_urls_are_decoded_however_short_or_percent_encoded(
    main: Served, error_of: ErrorOf
) -> None:
    image = png()
    payload = b64(image).replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    assert "%" in payload
    escaped = "data:image/png;base64," + payload
    rows = vectors(embed(main, TINY_CLIP, [data_url(image), escaped]))
    assert np.allclose(rows[0], rows[1], atol=1e-5)
    short = embed(main, TINY_CLIP, "data:image/png;base64," + b64(image[:8]))
    assert short.status_code == 400
    assert "not valid base64" not in error_of(short)["message"]  # decoded, then refused
    assert "PNG" in error_of(short)["message"]


def test_whitespace_around_a_url_or_data_url_is_ignored(
    main: Served, http_server: LocalServer
) -> None:
    image = png()
    url = http_server.route("/server-tests/padded.png", body=image, content_type="image/png")
    rows = vectors(embed(main, TINY_CLIP, [data_url(image), f" {data_url(image)}\n", f"\t{url} "]))
    assert np.allclose(rows[0], rows[1], atol=1e-5)
    assert np.allclose(rows[0], rows[2], atol=1e-5)


def test_text_on_an_image_only_model_is_400_naming_the_item(
    main: Served, error_of: ErrorOf
) -> None:
    single = embed(main, "fake/images-only", "a photo of a cat")
    assert single.status_code == 400
    assert error_of(single)["param"] == "input"
    assert "fake/images-only" in error_of(single)["message"]
    listed = embed(main, "fake/images-only", [data_url(png()), data_url(png()), "hello"])
    assert error_of(listed)["param"] == "input[2]"
    assert vectors(embed(main, "fake/images-only", data_url(png()))).shape == (1, 8)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("file:///etc/passwd", "unsupported URL scheme 'file'"),
        ("ftp://127.0.0.1/x.png", "unsupported URL scheme 'ftp'"),
        ("data:text/plain;base64,aGVsbG8=", "not image/*"),
        ("data:image/png,notbase64", "not base64"),
        ("data:image/png;base64,!!!!", "not valid base64"),
        (
            "data:image/png;base64," + b64(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40),
            "corrupt",
        ),
        (b64(b"\x89PNG\r\n\x1a\n" + bytes(range(64))), "corrupt"),
    ],
)
def test_bad_image_inputs_are_400_with_their_index(
    main: Served, error_of: ErrorOf, item: str, message: str
) -> None:
    response = embed(main, TINY_CLIP, ["fine text", item])
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "input[1]"
    assert error["type"] == "invalid_request_error"
    assert message in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x"}, "model"),
        ({"model": TINY_CLIP}, "input"),
        ({"model": TINY_CLIP, "input": []}, "input"),
        ({"model": TINY_CLIP, "input": [1, 2, 3]}, "input[0]"),
        ({"model": TINY_CLIP, "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": TINY_CLIP, "input": "x", "dimensions": 32}, "dimensions"),
        ({"model": TINY_CLIP, "input": "x", "dimensions": True}, "dimensions"),
        ({"model": TINY_CLIP, "input": "x", "dimensions": "512"}, "dimensions"),
        ({"model": TINY_CLIP, "input": "x", "temperature": 1}, "temperature"),
        ({"model": TINY_CLIP, "input": ["x"] * 65}, "input"),
        ({"model": "fake/generator", "input": "x"}, "model"),
        ({"model": TINY_CLIP, "input": ["ok", ""]}, "input[1]"),
    ],
)
def test_bad_requests_are_400_naming_the_field(
    main: Served, error_of: ErrorOf, body: dict[str, Any], param: str
) -> None:
    with main.client() as client:
        response = client.post("/v1/embeddings", json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_malformed_json_and_a_non_object_body_are_400(main: Served, error_of: ErrorOf) -> None:
    with main.client() as client:
        broken = client.post(
            "/v1/embeddings", content=b'{"model": ', headers={"Content-Type": "application/json"}
        )
        listed = client.post("/v1/embeddings", json=["not", "an", "object"])
        text = client.post(
            "/v1/embeddings", content=b"model=x", headers={"Content-Type": "text/plain"}
        )
        not_utf8 = client.post(
            "/v1/embeddings",
            content=b'{"model": "\xff"}',
            headers={"Content-Type": "application/json"},
        )
        too_deep = client.post(
            "/v1/embeddings", content=b"[" * 100_000, headers={"Content-Type": "application/json"}
        )
    assert "not valid JSON" in error_of(broken)["message"]
    for response in (broken, listed, text, not_utf8, too_deep):
        assert response.status_code == 400
        assert error_of(response)["code"] == "invalid_request", response.text


def test_a_body_without_a_json_content_type_says_so(main: Served, error_of: ErrorOf) -> None:
    body = b'{"model": "fake/embedder", "input": "hello"}'
    with main.client() as client:
        bare = client.post("/v1/embeddings", content=body)
        text = client.post("/v1/embeddings", content=body, headers={"Content-Type": "text/plain"})
        json_ = client.post(
            "/v1/embeddings", content=body, headers={"Content-Type": "application/json"}
        )
    assert bare.status_code == 400
    assert "Content-Type: application/json" in error_of(bare)["message"]
    assert "no Content-Type" in error_of(bare)["message"]
    assert text.status_code == 400
    assert "'text/plain'" in error_of(text)["message"]
    assert json_.status_code == 200


def test_texts_over_max_text_chars_are_400_naming_the_item(
    make_server: ServerFactory, error_of: ErrorOf
) -> None:
    served = make_server(fake_embedding_spec("fake/embedder"), max_text_chars=16)
    listed = embed(served, "fake/embedder", [data_url(png()), "short", "x" * 17])
    single = embed(served, "fake/embedder", "y" * 17)
    fits = embed(served, "fake/embedder", ["z" * 16, data_url(png())])
    assert listed.status_code == 400
    error = error_of(listed)
    assert (error["param"], error["code"]) == ("input[2]", "invalid_input")
    assert "17 characters, over the limit of 16" in error["message"]
    assert single.status_code == 400
    assert error_of(single)["param"] == "input"
    assert vectors(fits).shape == (2, 8)


def test_the_default_text_limit_holds_on_clip(main: Served, error_of: ErrorOf) -> None:
    response = embed(main, TINY_CLIP, ["a red fox", "fox " * 2_501])
    assert response.status_code == 400
    error = error_of(response)
    assert error["param"] == "input[1]"
    assert "over the limit of 10000" in error["message"]


def test_unknown_model_is_404_with_suggestions(main: Served, error_of: ErrorOf) -> None:
    response = embed(main, "limner/tiny-clipp", "x")
    assert response.status_code == 404
    error = error_of(response)
    assert error["code"] == "model_not_found"
    assert "limner/tiny-clip" in error["message"]


def test_bodies_over_max_body_bytes_are_413_declared_or_streamed(
    make_server: ServerFactory, error_of: ErrorOf
) -> None:
    served = make_server(fake_embedding_spec("fake/embedder"), max_body_bytes=2000)
    big = {"model": "fake/embedder", "input": "x" * 3000}
    with served.client() as client:
        declared = client.post("/v1/embeddings", json=big)

        def chunks() -> Any:
            for _ in range(10):
                yield b" " * 500  # whitespace: valid JSON padding, never parsed

        streamed = client.post(
            "/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"}
        )
        small = client.post("/v1/embeddings", json={"model": "fake/embedder", "input": "fits"})
    for response in (declared, streamed):
        assert response.status_code == 413
        assert error_of(response)["code"] == "body_too_large"
    assert "Content-Length" not in streamed.request.headers  # really sent chunked
    assert small.status_code == 200


def test_memory_exhausted_is_503(make_server: ServerFactory, error_of: ErrorOf) -> None:
    served = make_server(
        fake_embedding_spec("fake/huge", memory_mb=5000),
        pool_options={"memory": FakeMemory(total_mb=1000)},
    )
    response = embed(served, "fake/huge", "x")
    assert response.status_code == 503
    error = error_of(response)
    assert error["code"] == "memory_exhausted"
    assert error["type"] == "server_error"
    assert "Need 5000 MB" in error["message"]


def test_a_request_over_request_timeout_is_504_and_frees_the_pool(
    make_server: ServerFactory, error_of: ErrorOf, wait_for: WaitFor
) -> None:
    gate = threading.Event()  # holds every batch while clear
    gate.set()
    served = make_server(
        fake_embedding_spec("fake/held", options={"gate": gate}), request_timeout=0.5
    )
    assert embed(served, "fake/held", data_url(png())).status_code == 200  # loaded
    gate.clear()
    try:
        response = embed(served, "fake/held", data_url(png()))
    finally:
        gate.set()
    assert response.status_code == 504
    assert error_of(response)["code"] == "request_timeout"
    wait_for(lambda: served.pool("fake/held")["in_flight"] == 0, what="the batch to finish")
    assert embed(served, "fake/held", data_url(png())).status_code == 200
