"""Image inputs: every accepted kind decodes to the right RGB pixels, every bad one is refused
with an InvalidInput (or FetchError) that says what is wrong and names the input."""

from __future__ import annotations

import base64
import io
import math
import os
import re
import socket
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import httpx
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from limner._inputs._decode import (
    DEFAULT_LIMITS,
    ImageLimits,
    _decode_base64_exactly,
    _decode_plain_base64,
    _pixel_size_problem,
    decode_image,
    encoded_bytes,
)
from limner._inputs._fetch import fetch_image_bytes
from limner._inputs._kinds import (
    ACCEPTED_FORMATS,
    InputKind,
    classify_input,
    input_kind,
    without_whitespace,
)
from limner.errors import FetchError, InvalidInput

if TYPE_CHECKING:
    from tests.conftest import LocalHTTPServer

RGB = tuple[int, int, int]
RED: RGB = (255, 0, 0)
BLUE: RGB = (0, 0, 255)
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
GREY: RGB = (128, 128, 128)

# -- helpers ----------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def two_colour(size: tuple[int, int] = (4, 2)) -> Image.Image:
    """Left half red, right half blue: catches transposed or mirrored pixels."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image


def noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def pixel(image: Image.Image, xy: tuple[int, int]) -> RGB:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    assert len(value) == 3
    return (int(value[0]), int(value[1]), int(value[2]))


def assert_close(actual: RGB, expected: RGB, tolerance: int = 0) -> None:
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (
        actual,
        expected,
    )


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` but whose pixel data is junk.

    Refusing it on size (rather than as corrupt) proves the check runs before decoding.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def message(error: pytest.ExceptionInfo[InvalidInput]) -> str:
    return str(error.value)


# -- input_kind -------------------------------------------------------------------------------


def _png_with_every_base64_character() -> bytes:
    # A text chunk of 0xff bytes puts '/' into the base64, so URL-safe encoding differs.
    info = PngInfo()
    info.add_text("padding", "\xff" * 12)
    return encode(two_colour(), "PNG", pnginfo=info)


PNG = _png_with_every_base64_character()
B64 = base64.b64encode(PNG).decode()


def test_input_kind_of_objects(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    assert input_kind(Image.new("RGB", (1, 1))) is InputKind.PIL
    assert input_kind(PNG) is InputKind.BYTES
    assert input_kind(bytearray(PNG)) is InputKind.BYTES
    assert input_kind(memoryview(PNG)) is InputKind.BYTES
    assert input_kind(path) is InputKind.PATH
    assert input_kind(str(path)) is InputKind.PATH


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("http://example.com/cat.jpg", InputKind.URL),
        ("HTTPS://EXAMPLE.COM/cat.jpg", InputKind.URL),
        ("data:image/png;base64,iVBORw0KGgo=", InputKind.DATA_URL),
        ("DATA:image/png;base64,iVBORw0KGgo=", InputKind.DATA_URL),
        (B64, InputKind.BASE64),
        (base64.urlsafe_b64encode(PNG).decode().rstrip("="), InputKind.BASE64),
        (base64.encodebytes(PNG).decode(), InputKind.BASE64),
        ("missing.png", InputKind.PATH),
        ("cat", InputKind.PATH),
        ("images/with spaces/cat.jpeg", InputKind.PATH),
    ],
)
def test_input_kind_of_strings(text: str, kind: InputKind) -> None:
    assert input_kind(text) is kind


def test_an_existing_file_wins_over_base64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "A" * 40  # valid base64 text, but also a file in the working directory
    (tmp_path / name).write_bytes(PNG)
    monkeypatch.chdir(tmp_path)
    assert input_kind(name) is InputKind.PATH
    assert pixel(decode_image(name), (0, 0)) == RED


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/cat.png", "s3://b/k"])
def test_input_kind_refuses_other_url_schemes(url: str) -> None:
    with pytest.raises(InvalidInput, match="unsupported URL scheme") as error:
        input_kind(url)
    assert url in message(error)


@pytest.mark.parametrize(
    ("value", "type_name"), [(42, "int"), (None, "NoneType"), ([1, 2], "list"), (1.5, "float")]
)
def test_input_kind_refuses_other_types(value: object, type_name: str) -> None:
    with pytest.raises(InvalidInput, match=f"unsupported image input type {type_name}") as error:
        input_kind(value)
    assert repr(value)[:10] in message(error)


# -- classify_input: one classifier for the Python API and the server --------------------------


def server_kind(source: object) -> InputKind:
    """As the HTTP server classifies an item: never a path, and other strings are text."""
    return classify_input(source, allow_paths=False, texts=True)


def b64_of(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_input_kind_is_the_python_apis_classification(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    for source in (path, str(path), "missing.png", B64, "data:;base64,", "http://a.example/"):
        assert input_kind(source) is classify_input(source, allow_paths=True, texts=False)


def test_without_paths_an_existing_file_is_never_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret.png"
    path.write_bytes(PNG)
    base64_name = "A" * 40  # a file in the working directory, and valid base64
    (tmp_path / base64_name).write_bytes(PNG)
    monkeypatch.chdir(tmp_path)
    assert server_kind(str(path)) is InputKind.TEXT
    assert server_kind(base64_name) is InputKind.TEXT  # base64, but not of an image
    assert classify_input(base64_name, allow_paths=False, texts=False) is InputKind.BASE64
    with pytest.raises(InvalidInput, match="not an image: pass an http") as error:
        classify_input(str(path), allow_paths=False, texts=False)
    assert "a path" not in message(error)
    for texts in (False, True):
        with pytest.raises(InvalidInput, match="a file path is not accepted here"):
            classify_input(path, allow_paths=False, texts=texts)


def test_with_paths_and_texts_a_file_still_wins(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    assert classify_input(str(path), allow_paths=True, texts=True) is InputKind.PATH
    assert classify_input("missing.png", allow_paths=True, texts=True) is InputKind.TEXT


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("a red fox", InputKind.TEXT),
        ("", InputKind.TEXT),
        ("/etc/hostname", InputKind.TEXT),
        ("data: 3 apples, 2 pears", InputKind.TEXT),  # a data URL's header has no spaces
        ("data:image/png;base64" + B64, InputKind.TEXT),  # no comma: no data URL
        ("data:image/png;base64," + B64, InputKind.DATA_URL),
        ("DATA:,", InputKind.DATA_URL),
        (" \n data:image/png;base64," + B64 + "\n", InputKind.DATA_URL),
        ("https://example.com/cat.jpg", InputKind.URL),
        ("  https://example.com/cat.jpg\n", InputKind.URL),
        (B64, InputKind.BASE64),
        (base64.urlsafe_b64encode(PNG).decode().rstrip("="), InputKind.BASE64),
        (base64.encodebytes(PNG).decode(), InputKind.BASE64),
        (b64_of(b"plain words, long enough to pass for base64"), InputKind.TEXT),
        (b64_of(PNG[:8]), InputKind.TEXT),  # an image's signature, but under 32 characters
        ("QUJD" * 10 + "QQ=", InputKind.TEXT),  # bad padding, and not an image either
    ],
)
def test_with_texts_only_an_images_shape_is_an_image(text: str, kind: InputKind) -> None:
    assert server_kind(text) is kind


@pytest.mark.parametrize("url", ["file:///etc/passwd", " ftp://example.com/cat.png"])
def test_other_url_schemes_are_refused_with_texts_too(url: str) -> None:
    with pytest.raises(InvalidInput, match="unsupported URL scheme"):
        server_kind(url)


def test_whitespace_removed_from_base64_is_every_character_regex_s_matches() -> None:
    every_character = "".join(map(chr, range(0x110000)))
    assert without_whitespace(every_character) == re.sub(r"\s+", "", every_character)


def test_whitespace_around_a_url_or_data_url_is_no_part_of_it(tmp_path: Path) -> None:
    assert input_kind("  http://example.com/cat.jpg\n") is InputKind.URL
    padded = "\n data:image/png;base64," + B64 + " \n"
    assert input_kind(padded) is InputKind.DATA_URL
    assert pixel(decode_image(padded), (0, 0)) == RED
    spaced = tmp_path / " spaced.png"  # a path is taken as it is
    spaced.write_bytes(PNG)
    assert input_kind(str(spaced)) is InputKind.PATH


@pytest.mark.anyio
async def test_a_url_is_fetched_without_the_whitespace_around_it(
    http_server: LocalHTTPServer,
) -> None:
    data = await fetch_image_bytes("  " + http_server.url("/image.png") + "\n")
    assert pixel(decode_image(data), (0, 0)) == RED


def _every_format() -> dict[str, bytes]:
    image = two_colour((8, 4))
    encoded = {
        fmt: encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        for fmt in ACCEPTED_FORMATS
    }
    encoded["BigTIFF"] = encode(image, "TIFF", big_tiff=True)
    encoded["GIF87a"] = b"GIF87a" + encoded["GIF"][6:]
    return encoded


@pytest.mark.parametrize("fmt", [*ACCEPTED_FORMATS, "BigTIFF", "GIF87a"])
def test_base64_of_every_accepted_format_is_an_image_among_texts(fmt: str) -> None:
    data = _every_format()[fmt]
    assert server_kind(b64_of(data)) is InputKind.BASE64
    assert server_kind("data:image/x;base64," + b64_of(data)) is InputKind.DATA_URL
    image = decode_image(encoded_bytes(b64_of(data), kind=InputKind.BASE64))
    assert image.size == (8, 4)


FILLER = b"\x00" * 40


@pytest.mark.parametrize(
    ("data", "kind", "reason"),
    [
        # WebP: RIFF, then WEBP, then a VP8 chunk; WEBP alone at offset 8 is not one.
        (b"RIFF\x30\x00\x00\x00WEBPVP8L" + FILLER, InputKind.BASE64, "corrupt image header"),
        (b"RIFX\x30\x00\x00\x00WEBPVP8L" + FILLER, InputKind.TEXT, "not an image"),
        (b"RIFF\x30\x00\x00\x00WEBPJUNK" + FILLER, InputKind.TEXT, "not an image"),
        (b"RIFF\x30\x00\x00\x00WAVEfmt " + FILLER, InputKind.TEXT, "not an image"),
        # ISO media: an image brand in the ftyp box, not any ftyp (MP4, QuickTime, 3GP, ...).
        (b"\x00\x00\x00\x1cftypavif" + FILLER, InputKind.BASE64, "AVIF images are not accepted"),
        (b"\x00\x00\x00\x1cftypavis" + FILLER, InputKind.BASE64, "AVIF images are not accepted"),
        (b"\x00\x00\x00\x1cftypmif1" + FILLER, InputKind.BASE64, "HEIF images are not accepted"),
        (b"\x00\x00\x00\x1cftypheix" + FILLER, InputKind.BASE64, "HEIC images are not accepted"),
        (b"\x00\x00\x00\x18ftypisom" + FILLER, InputKind.TEXT, "not an image"),
        (b"\x00\x00\x00\x14ftypqt  " + FILLER, InputKind.TEXT, "not an image"),
        # GIF: GIF87a or GIF89a, as Pillow checks.
        (b"GIF89a" + FILLER, InputKind.BASE64, "corrupt GIF header"),
        (b"GIF80a" + FILLER, InputKind.TEXT, "not an image"),
        # Refused formats are still images: a 400 naming the format, never text.
        (b"\x00\x00\x01\x00\x01\x00" + FILLER, InputKind.BASE64, "ICO images are not accepted"),
        (b"qoif" + FILLER, InputKind.BASE64, "QOI images are not accepted"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + FILLER, InputKind.BASE64, "JPEG 2000 images"),
        (b"\x00\x00\x00\x0cjP  \x00\x00\x00\x00" + FILLER, InputKind.TEXT, "not an image"),
    ],
    ids=lambda value: repr(value[:16]) if isinstance(value, bytes) else None,
)
def test_one_signature_table_decides_images_and_names_formats(
    data: bytes, kind: InputKind, reason: str
) -> None:
    assert server_kind(b64_of(data)) is kind
    with pytest.raises(InvalidInput, match=reason):
        decode_image(data)


def _png_padded_with(padding: str) -> bytes:
    """PNG bytes (trailing bytes after IEND are ignored) whose base64 ends in ``padding``."""
    wanted = {"": 0, "=": 2, "==": 1}[padding]
    data = PNG
    while len(data) % 3 != wanted:
        data += b"\x00"
    text = b64_of(data)
    assert len(text) - len(text.rstrip("=")) == len(padding)
    return data


@pytest.mark.parametrize(
    ("mistake", "text"),
    [
        ("one '=' where two are due", b64_of(_png_padded_with("=="))[:-1]),
        ("two '=' where one is due", b64_of(_png_padded_with("=")) + "="),
        ("'=' where none is due", b64_of(_png_padded_with("")) + "=="),
        ("a length no base64 can have", b64_of(_png_padded_with(""))[:-3]),
    ],
)
def test_base64_padding_is_strict_for_every_caller(mistake: str, text: str) -> None:
    assert server_kind(text) is InputKind.BASE64, mistake  # an image, not text
    assert input_kind(text) is InputKind.BASE64, mistake
    with pytest.raises(InvalidInput, match="not valid base64: wrong length or padding"):
        encoded_bytes(text, kind=InputKind.BASE64)
    with pytest.raises(InvalidInput, match="not valid base64: wrong length or padding"):
        decode_image(text)


@pytest.mark.parametrize("padding", ["", "=", "=="])
def test_base64_with_its_padding_or_none_decodes(padding: str) -> None:
    data = _png_padded_with(padding)
    for text in (b64_of(data), b64_of(data).rstrip("=")):
        assert server_kind(text) is InputKind.BASE64
        assert encoded_bytes(text, kind=InputKind.BASE64) == data
        assert pixel(decode_image(text), (0, 0)) == RED


def test_the_plain_base64_path_decodes_only_what_the_exact_path_takes_and_the_same() -> None:
    """The fast path (ASCII, one alphabet, padded, strict) against the exact one, on
    well-formed base64 and every kind of mistake: where the fast path answers, the exact one
    gives the same bytes; where the exact one refuses, the fast path leaves it to it."""
    rng = np.random.default_rng(7)
    limits = ImageLimits(max_bytes=4096)
    texts: list[str] = []
    for size in (1, 2, 3, 4, 5, 47, 48, 100, 3000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        for encoded in (base64.b64encode(data).decode(), base64.urlsafe_b64encode(data).decode()):
            texts += [encoded, encoded.rstrip("="), encoded + "=", encoded + "==", encoded[:-1]]
            texts += ["=" + encoded, encoded + "===="]
            texts += [base64.encodebytes(data).decode(), " \t" + encoded + "\x1c\n"]
            texts += [encoded[:2] + "\u00a0" + encoded[2:], encoded + "!", encoded + "A"]
            middle = len(encoded) // 2
            texts += [encoded[:middle] + "=" + encoded[middle:], encoded[:middle] + "-+" + encoded]
    texts += ["", "====", "A", "AA", "AA=", "A===", "AAAA" * 2000]  # the last over the limit
    answered = 0
    for text in texts:
        plain = _decode_plain_base64(text, limits=limits)
        try:
            exact = _decode_base64_exactly(text, limits, text)
        except InvalidInput:
            assert plain is None, text
            continue
        if plain is not None:
            answered += 1
            assert plain == exact, text
    assert answered >= 40  # it does take the common forms


def test_a_data_urls_payload_is_decoded_however_short_and_percent_encoded() -> None:
    short = "data:image/png;base64," + b64_of(PNG[:8])  # under 32 characters
    assert server_kind(short) is InputKind.DATA_URL
    assert encoded_bytes(short, kind=InputKind.DATA_URL) == PNG[:8]
    encoded = "data:image/png;base64," + B64.replace("+", "%2B").replace("/", "%2F")
    assert "%2F" in encoded
    assert encoded_bytes(encoded, kind=InputKind.DATA_URL) == PNG
    with pytest.raises(InvalidInput, match="not valid base64: there is nothing to decode"):
        encoded_bytes("data:image/png;base64,", kind=InputKind.DATA_URL)


def test_encoded_bytes_reads_nothing_but_the_text(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(PNG)
    for kind in (InputKind.PATH, InputKind.URL, InputKind.TEXT, InputKind.BYTES):
        with pytest.raises(ValueError, match="takes a data URL or base64"):
            encoded_bytes(str(path), kind=kind)
    with pytest.raises(InvalidInput, match="over the limit") as error:
        encoded_bytes(B64, kind=InputKind.BASE64, limits=ImageLimits(max_bytes=10), name="it")
    assert error.value.input == "it"


def test_text_is_not_decoded_as_an_image() -> None:
    with pytest.raises(InvalidInput, match="text is not an image"):
        decode_image("a red fox", kind=InputKind.TEXT)


def test_decode_refuses_other_types() -> None:
    with pytest.raises(InvalidInput, match="int"):
        decode_image(42)
    with pytest.raises(InvalidInput, match="bytes input cannot be a int"):
        decode_image(42, kind=InputKind.BYTES)
    with pytest.raises(InvalidInput, match="PIL image input cannot be a bytes"):
        decode_image(PNG, kind=InputKind.PIL)


# -- every kind decodes to the right pixels ---------------------------------------------------


def _sources(tmp_path: Path) -> dict[str, object]:
    path = tmp_path / "two colour.png"
    path.write_bytes(PNG)
    urlsafe = base64.urlsafe_b64encode(PNG).decode()
    assert urlsafe != B64, "fixture must exercise the URL-safe alphabet"
    return {
        "path str": str(path),
        "pathlib.Path": path,
        "data URL": "data:image/png;base64," + B64,
        "data URL, no media type": "data:;base64," + B64,
        "data URL, percent-encoded": "data:image/png;base64," + B64.replace("+", "%2B"),
        "base64": B64,
        "base64 bytes": B64.encode(),
        "base64 unpadded": B64.rstrip("="),
        "base64 urlsafe": urlsafe,
        "base64 with newlines": base64.encodebytes(PNG).decode(),
        "base64 with unicode spaces": "\u2003".join(B64[i : i + 8] for i in range(0, len(B64), 8)),
        "bytes": PNG,
        "bytearray": bytearray(PNG),
        "memoryview": memoryview(PNG),
        "PIL": two_colour(),
    }


@pytest.mark.parametrize(
    "which",
    [
        "path str",
        "pathlib.Path",
        "data URL",
        "data URL, no media type",
        "data URL, percent-encoded",
        "base64",
        "base64 bytes",
        "base64 unpadded",
        "base64 urlsafe",
        "base64 with newlines",
        "base64 with unicode spaces",
        "bytes",
        "bytearray",
        "memoryview",
        "PIL",
    ],
)
def test_every_kind_decodes_to_rgb(tmp_path: Path, which: str) -> None:
    source = _sources(tmp_path)[which]
    kind = InputKind.BASE64 if which == "base64 bytes" else None
    image = decode_image(source, kind=kind)
    assert image.mode == "RGB"
    assert image.size == (4, 2)
    assert pixel(image, (0, 0)) == RED
    assert pixel(image, (3, 1)) == BLUE


@pytest.mark.anyio
async def test_url_fetch_then_decode(http_server: LocalHTTPServer) -> None:
    url = http_server.url("/image.png")
    assert input_kind(url) is InputKind.URL
    image = decode_image(await fetch_image_bytes(url), name=url)
    assert image.mode == "RGB"
    assert image.size == (8, 6)
    assert pixel(image, (7, 5)) == RED
    accept = http_server.hits[-1].headers.get("Accept", "")
    assert "image/*" in accept


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/image-octet", "/image-untyped", "/redirect-relative"])
async def test_fetch_accepts_octet_stream_untyped_and_relative_redirects(
    http_server: LocalHTTPServer, path: str
) -> None:
    data = await fetch_image_bytes(http_server.url(path))
    assert pixel(decode_image(data), (0, 0)) == RED


@pytest.mark.anyio
async def test_fetch_follows_redirects_up_to_the_limit(http_server: LocalHTTPServer) -> None:
    seen: list[str] = []

    async def check(url: httpx.URL) -> None:
        seen.append(url.path)

    limits = ImageLimits(max_redirects=3)
    data = await fetch_image_bytes(http_server.url("/redirect/3"), limits=limits, check_url=check)
    assert pixel(decode_image(data), (0, 0)) == RED
    assert seen == ["/redirect/3", "/redirect/2", "/redirect/1", "/image.png"]


@pytest.mark.anyio
async def test_check_url_can_refuse_a_later_hop(http_server: LocalHTTPServer) -> None:
    class Refused(Exception):
        pass

    async def check(url: httpx.URL) -> None:
        if url.path == "/redirect/1":
            raise Refused(str(url))

    before = len(http_server.hits_for("/redirect/1"))
    with pytest.raises(Refused, match="/redirect/1"):
        await fetch_image_bytes(http_server.url("/redirect/2"), check_url=check)
    assert len(http_server.hits_for("/redirect/1")) == before  # refused before it was requested


@pytest.mark.anyio
async def test_fetch_with_a_caller_client_leaves_it_open(http_server: LocalHTTPServer) -> None:
    async with httpx.AsyncClient() as client:
        first = await fetch_image_bytes(http_server.url("/image.png"), client=client)
        second = await fetch_image_bytes(http_server.url("/redirect/1"), client=client)
        assert first == second
        assert not client.is_closed


# -- draft, orientation, animation ------------------------------------------------------------


def test_draft_decodes_a_large_jpeg_at_reduced_scale() -> None:
    width, height, draft = 2000, 1600, 224
    jpeg = encode(noise((width, height)), "JPEG", quality=80)
    reduced = decode_image(jpeg, draft_size=draft)
    full = decode_image(jpeg)
    assert full.size == (width, height)
    scale = max(s for s in (1, 2, 4, 8) if width // s >= draft and height // s >= draft)
    assert scale > 1
    assert reduced.size == (math.ceil(width / scale), math.ceil(height / scale))
    assert min(reduced.size) >= draft
    assert reduced.mode == "RGB"


def test_draft_never_goes_below_the_request_and_skips_non_jpegs() -> None:
    jpeg = encode(noise((900, 500)), "JPEG")
    assert decode_image(jpeg, draft_size=300).size == (900, 500)  # 1/2 would make 250 < 300
    assert decode_image(jpeg, draft_size=250).size == (450, 250)
    png = encode(noise((900, 500)), "PNG")
    assert decode_image(png, draft_size=100).size == (900, 500)
    grey = encode(Image.new("L", (800, 800), 90), "JPEG")
    image = decode_image(grey, draft_size=100)
    assert image.size == (100, 100)
    assert image.mode == "RGB"
    assert_close(pixel(image, (50, 50)), (90, 90, 90), 2)


def test_draft_size_must_be_positive() -> None:
    with pytest.raises(InvalidInput, match="draft_size"):
        decode_image(PNG, draft_size=0)


def _rotated_jpeg(orientation: int | None) -> bytes:
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    return encode(two_colour((40, 20)), "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_is_applied() -> None:
    # Orientation 6: the camera was turned; display needs a 90 degree clockwise turn, which
    # brings the left (red) half to the top.
    image = decode_image(_rotated_jpeg(6))
    assert image.size == (20, 40)
    assert_close(pixel(image, (10, 5)), RED, 12)
    assert_close(pixel(image, (10, 34)), BLUE, 12)
    upright = decode_image(_rotated_jpeg(None))
    assert upright.size == (40, 20)
    assert_close(pixel(upright, (5, 10)), RED, 12)


def test_exif_orientation_is_applied_to_pil_input_without_touching_it() -> None:
    opened = Image.open(io.BytesIO(_rotated_jpeg(6)))
    image = decode_image(opened)
    assert image.size == (20, 40)
    assert_close(pixel(image, (10, 5)), RED, 12)
    assert opened.size == (40, 20)
    assert opened.getexif()[0x0112] == 6


def test_animated_images_give_their_first_frame() -> None:
    frames = [Image.new("RGB", (6, 6), colour) for colour in (RED, BLUE, WHITE)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert getattr(Image.open(io.BytesIO(gif)), "n_frames", 1) == 3
    image = decode_image(gif)
    assert image.mode == "RGB"
    assert pixel(image, (3, 3)) == RED


# -- mode conversions -------------------------------------------------------------------------


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (4, 1), 0)
    image.putpalette([0, 255, 0, *RED] + [0, 0, 0] * 254)
    image.putpixel((2, 0), 1)
    image.putpixel((3, 0), 1)
    if transparent:
        image.info["transparency"] = 0
    return image


def _with(mode: str, left: float | tuple[int, ...], right: float | tuple[int, ...]) -> Image.Image:
    image = Image.new(mode, (4, 1), left)
    image.paste(right, (2, 0, 4, 1))
    return image


MODE_CASES: dict[str, tuple[Callable[[], Image.Image], RGB, RGB, int]] = {
    # name: (image, left pixel, right pixel, tolerance)
    "RGBA over white": (
        lambda: _with("RGBA", (255, 0, 0, 0), (0, 0, 255, 128)),
        WHITE,
        (127, 127, 255),
        1,
    ),
    "RGBa premultiplied": (
        lambda: _with("RGBa", (0, 0, 0, 0), (128, 0, 0, 128)),
        WHITE,
        (255, 127, 127),
        2,
    ),
    "LA over white": (lambda: _with("LA", (0, 0), (0, 255)), WHITE, BLACK, 0),
    "PA over white": (lambda: _pa(), WHITE, RED, 0),
    "P with transparency": (lambda: _palette(True), WHITE, RED, 0),
    "P opaque": (lambda: _palette(False), (0, 255, 0), RED, 0),
    "L": (lambda: _with("L", 100, 200), (100, 100, 100), (200, 200, 200), 0),
    "1": (lambda: _with("1", 0, 1), BLACK, WHITE, 0),
    "CMYK": (lambda: _with("CMYK", (0, 255, 255, 0), (0, 0, 0, 255)), RED, BLACK, 0),
    "YCbCr": (lambda: two_colour().convert("YCbCr"), RED, BLUE, 3),
    "LAB": (lambda: two_colour().convert("LAB"), RED, BLUE, 25),  # Pillow clips the gamut
    "I;16 mid-grey": (lambda: _with("I;16", 32768, 65535), GREY, WHITE, 0),
    "I;16B": (lambda: _with("I;16B", 32768, 0), GREY, BLACK, 0),
    "I as 16-bit": (lambda: _with("I", 32768, 65535), GREY, WHITE, 0),
    "I wider than 16 bits": (lambda: _with("I", -5, 100_000), BLACK, WHITE, 0),
    "F unit range": (lambda: _with("F", 0.5, 1.0), GREY, WHITE, 0),
    "F wider": (lambda: _with("F", -1.0, 3.0), BLACK, WHITE, 0),
}


def _pa() -> Image.Image:
    image = Image.new("PA", (4, 1), (0, 0))
    image.putpalette([*RED] + [0, 0, 0] * 255)
    image.paste((0, 255), (2, 0, 4, 1))
    return image


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_modes_convert_to_rgb(case: str) -> None:
    make, left, right, tolerance = MODE_CASES[case]
    source = make()
    before = (source.mode, source.size, source.tobytes())
    image = decode_image(source)
    assert image.mode == "RGB"
    assert image is not source
    assert_close(pixel(image, (0, 0)), left, tolerance)
    assert_close(pixel(image, (3, 0)), right, tolerance)
    assert (source.mode, source.size, source.tobytes()) == before, "caller's image changed"


def test_rgb_pil_input_is_copied() -> None:
    source = two_colour()
    image = decode_image(source)
    image.putpixel((0, 0), WHITE)
    assert pixel(source, (0, 0)) == RED


@pytest.mark.parametrize(
    ("make", "fmt", "left", "right"),
    [
        (lambda: _with("I;16", 32768, 65535), "PNG", GREY, WHITE),
        (lambda: _with("RGBA", (255, 0, 0, 0), (0, 0, 255, 255)), "PNG", WHITE, BLUE),
        (lambda: _with("LA", (9, 0), (9, 255)), "PNG", WHITE, (9, 9, 9)),
        (lambda: _palette(True), "PNG", WHITE, RED),
        (lambda: _palette(True), "GIF", WHITE, RED),
        (lambda: _with("F", 0.5, 0.0), "TIFF", GREY, BLACK),
        (lambda: _with("CMYK", (0, 255, 255, 0), (0, 0, 0, 0)), "TIFF", RED, WHITE),
    ],
    ids=["16-bit PNG", "RGBA PNG", "LA PNG", "P+tRNS PNG", "GIF transparency", "F TIFF", "CMYK"],
)
def test_encoded_modes_convert_to_rgb(
    make: Callable[[], Image.Image], fmt: str, left: RGB, right: RGB
) -> None:
    data = encode(make(), fmt)
    image = decode_image(data)
    assert image.mode == "RGB"
    assert pixel(image, (0, 0)) == left
    assert pixel(image, (3, 0)) == right


# -- bad images -------------------------------------------------------------------------------


def test_not_an_image() -> None:
    with pytest.raises(InvalidInput, match="not an image") as error:
        decode_image(b"this is plain text, not pixels")
    assert "<30 bytes>" in message(error)


def test_corrupt_png() -> None:
    png = encode(noise((64, 64)), "PNG")
    middle = len(png) // 2
    data = png[:middle] + bytes(b ^ 0x5A for b in png[middle : middle + 64]) + png[middle + 64 :]
    with pytest.raises(InvalidInput, match="corrupt or truncated image data") as error:
        decode_image(data)
    assert f"<{len(data)} bytes>" in message(error)


def test_corrupt_png_header() -> None:
    data = PNG[:16] + b"\xff" * 8 + PNG[24:]  # width and height in IHDR, its CRC now wrong
    with pytest.raises(InvalidInput, match="corrupt PNG header") as error:
        decode_image(data)
    assert f"<{len(data)} bytes>" in message(error)


def test_truncated_jpeg() -> None:
    jpeg = encode(noise((64, 64)), "JPEG")
    with pytest.raises(InvalidInput, match="truncated") as error:
        decode_image(jpeg[: len(jpeg) // 2])
    assert f"<{len(jpeg) // 2} bytes>" in message(error)


def test_empty_bytes_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        decode_image(b"")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty") as error:
        decode_image(empty)
    assert str(empty) in message(error)


def test_name_stands_for_the_input() -> None:
    with pytest.raises(InvalidInput) as error:
        decode_image(b"junk", name="https://example.com/cat.png")
    assert error.value.input == "https://example.com/cat.png"
    assert "https://example.com/cat.png" in message(error)
    assert "<4 bytes>" not in message(error)


def test_header_size_is_checked_before_decoding() -> None:
    data = png_claiming(5000, 5000)
    assert len(data) < 100
    # Within the default limit, decoding is tried and the junk pixel data fails...
    with pytest.raises(InvalidInput, match="corrupt or truncated"):
        decode_image(data)
    # ...but over a lower limit it is refused from the header alone.
    limits = ImageLimits(max_pixels=1_000_000)
    expected = f"5000 x 5000 = {5000 * 5000} pixels is over the limit of 1000000"
    with pytest.raises(InvalidInput, match=expected) as error:
        decode_image(data, limits=limits)
    assert f"<{len(data)} bytes>" in message(error)


def test_decompression_bomb_under_default_limits() -> None:
    side = 9000  # over DEFAULT_LIMITS.max_pixels, under Pillow's own warning threshold
    assert side * side > DEFAULT_LIMITS.max_pixels
    with pytest.raises(InvalidInput, match=f"{side} x {side} = {side * side} pixels"):
        decode_image(png_claiming(side, side))
    with pytest.raises(InvalidInput, match="pixels") as error:  # so large Pillow itself refuses
        decode_image(png_claiming(100_000, 100_000))
    assert "bytes>" in message(error)


def test_real_solid_colour_bomb() -> None:
    bomb = encode(Image.new("L", (2000, 2000), 7), "PNG")
    assert len(bomb) < 20_000
    limits = ImageLimits(max_pixels=1_000_000)
    with pytest.raises(InvalidInput, match="2000 x 2000 = 4000000 pixels is over the limit"):
        decode_image(bomb, limits=limits)
    assert decode_image(bomb).size == (2000, 2000)


def test_pil_input_over_the_pixel_limit() -> None:
    with pytest.raises(InvalidInput, match="30 x 20 = 600 pixels is over the limit of 500") as e:
        decode_image(Image.new("RGB", (30, 20)), limits=ImageLimits(max_pixels=500))
    assert "PIL.Image.Image" in message(e)


@pytest.mark.parametrize("size", [(0, 0), (0, 7), (7, 0)])
def test_an_image_without_pixels_is_refused(size: tuple[int, int]) -> None:
    with pytest.raises(InvalidInput, match=f"{size[0]} x {size[1]} has no pixels") as error:
        decode_image(Image.new("RGB", size))
    assert "PIL.Image.Image" in message(error)


@pytest.mark.parametrize("size", [(0, 0), (0, 5), (5, 0), (-3, 5), (5, -3)])
def test_the_pixel_check_refuses_sides_below_one(size: tuple[int, int]) -> None:
    assert "has no pixels" in str(_pixel_size_problem(*size, DEFAULT_LIMITS))
    assert _pixel_size_problem(1, 1, DEFAULT_LIMITS) is None


def test_bytes_over_the_size_limit() -> None:
    limits = ImageLimits(max_bytes=len(PNG) - 1)
    with pytest.raises(InvalidInput, match=f"{len(PNG)} bytes, over the limit of"):
        decode_image(PNG, limits=limits)
    with pytest.raises(InvalidInput, match="over the limit"):
        decode_image(base64.b64encode(PNG * 2).decode(), limits=limits)


# -- formats: only those whose size is checked before any pixel is decoded -------------------


def ico_around(inner: bytes, claimed: int = 16) -> bytes:
    """An ICO whose directory claims ``claimed`` x ``claimed`` but which holds ``inner``."""
    directory = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", claimed, claimed, 0, 0, 1, 32, len(inner), 6 + 16)
    return directory + entry + inner


def tiled_tiff(width: int, height: int, tile: int) -> bytes:
    """An RGB TIFF of ``width`` x ``height`` stored as one deflated ``tile`` x ``tile`` tile of
    zeros: a few kilobytes, however large the tile."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (tile * 3)
    data = b"".join(compressor.compress(row) for _ in range(tile)) + compressor.flush()
    short, long = 3, 4
    count = 11
    tile_offset = 8 + 2 + count * 12 + 4  # header, entry count, entries, next-IFD offset
    entries = [  # (tag, type, value): one value each, in tag order
        (256, long, width),
        (257, long, height),
        (258, short, 8),  # bits per sample
        (259, short, 8),  # deflate
        (262, short, 2),  # RGB
        (277, short, 3),  # samples per pixel
        (284, short, 1),  # chunky
        (322, long, tile),
        (323, long, tile),
        (324, long, tile_offset),
        (325, long, len(data)),
    ]
    assert len(entries) == count
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, kind, value in entries:
        packed = struct.pack("<HH", value, 0) if kind == short else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, kind, 1) + packed
    return out + struct.pack("<I", 0) + data


def gif_with_first_frame(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF whose first frame's extent is ``frame``, on a logical screen of ``screen``."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0, 0, 0)
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return header + descriptor + b"\x02\x02\x44\x01\x00;"


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_every_accepted_format_decodes(fmt: str) -> None:
    lossless = {"WEBP": {"lossless": True}}.get(fmt, {})
    image = decode_image(encode(two_colour((8, 4)), fmt, **lossless))
    assert image.size == (8, 4)
    assert_close(pixel(image, (1, 1)), RED, 8 if fmt == "JPEG" else 0)
    assert_close(pixel(image, (6, 2)), BLUE, 8 if fmt == "JPEG" else 0)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF", "MPO"])
def test_multi_frame_formats_give_their_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE)]
    lossless = {"WEBP": {"lossless": True}}.get(fmt, {})
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **lossless)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert_close(pixel(decode_image(data), (4, 4)), RED, 2)


def test_later_pages_are_never_decoded() -> None:
    first, huge = Image.new("RGB", (4, 2), RED), Image.new("L", (2000, 2000))
    data = encode(first, "TIFF", save_all=True, append_images=[huge])
    image = decode_image(data, limits=ImageLimits(max_pixels=1000))
    assert image.size == (4, 2)


def test_a_gif_frame_larger_than_its_screen_is_the_size_checked() -> None:
    data = gif_with_first_frame(screen=(8, 8), frame=(3000, 3000))
    with pytest.raises(InvalidInput, match="3000 x 3000 = 9000000 pixels is over the limit"):
        decode_image(data, limits=ImageLimits(max_pixels=1_000_000))


def test_containers_are_refused_by_name() -> None:
    expected = "ICO images are not accepted: only JPEG, PNG, GIF, WEBP, BMP and TIFF"
    with pytest.raises(InvalidInput, match=expected) as e:
        decode_image(encode(Image.new("RGB", (32, 32), RED), "ICO"))
    assert "bytes>" in message(e)
    for magic, name in [(b"icns\0\0\1\0", "ICNS"), (b"8BPS\0\1", "PSD")]:
        with pytest.raises(InvalidInput, match=f"{name} images are not accepted"):
            decode_image(magic + b"\0" * 64)


def test_an_ico_bomb_is_refused_before_its_inner_image_is_decoded() -> None:
    # The directory says 16 x 16; Pillow would decode the 3000 x 3000 PNG inside while
    # opening it, before any size check (the memory this costs is measured in
    # test_image_memory.py).
    bomb = ico_around(encode(Image.new("L", (3000, 3000)), "PNG"))
    with pytest.raises(InvalidInput, match="ICO images are not accepted") as error:
        decode_image(bomb, limits=ImageLimits(max_pixels=1_000_000))
    assert f"<{len(bomb)} bytes>" in message(error)


def test_tiff_tiles_count_against_the_pixel_limit() -> None:
    bomb = tiled_tiff(16, 16, tile=2048)  # libtiff would decode a 2048 x 2048 tile
    assert len(bomb) < 20_000
    expected = "TIFF tiles of 2048 x 2048 = 4194304 pixels are over the limit of 1000000"
    with pytest.raises(InvalidInput, match=expected) as error:
        decode_image(bomb, limits=ImageLimits(max_pixels=1_000_000))
    assert f"<{len(bomb)} bytes>" in message(error)
    image = decode_image(tiled_tiff(100, 100, tile=256))  # tiles larger than a small image
    assert image.size == (100, 100)
    assert pixel(image, (50, 50)) == BLACK


# -- bad base64 and data URLs -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "this is not base64 at all!",
        "QUJD" * 10 + "Q",  # a length no base64 can have
        "QUJD" * 10 + "QQ=",  # one '=' where two are due
        "ab+_" * 10,  # both alphabets at once
        "QUJD" * 10 + "=QUJD",  # padding in the middle
        "QUJDéQUJD" * 5,
    ],
)
def test_bad_base64(text: str) -> None:
    with pytest.raises(InvalidInput, match="not valid base64") as error:
        decode_image(text, kind=InputKind.BASE64)
    assert text[:20] in message(error)


def test_inferred_bad_base64() -> None:
    text = "QUJD" * 10 + "Q"
    assert input_kind(text) is InputKind.BASE64
    with pytest.raises(InvalidInput, match="not valid base64"):
        decode_image(text)


def test_base64_of_something_else() -> None:
    text = base64.b64encode(b"a perfectly fine sentence, not a picture").decode()
    with pytest.raises(InvalidInput, match="not an image") as error:
        decode_image(text)
    assert text[:30] in message(error)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("data:text/plain;base64,aGVsbG8gd29ybGQ=", "'text/plain', not an image"),
        ("data:application/pdf;base64," + B64, "'application/pdf', not an image"),
        ("data:image/png," + B64, "not base64"),
        ("data:image/png;base64" + B64, "no ','"),
        ("data:image/png;base64,%%%", "not valid base64"),
    ],
)
def test_bad_data_urls(url: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason) as error:
        decode_image(url)
    assert url[:30] in message(error)


# -- bad paths --------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "cat.png"
    for source in (missing, str(missing)):
        with pytest.raises(InvalidInput, match="no such file") as error:
            decode_image(source)
        assert str(missing) in message(error)
        assert "PosixPath" not in message(error)


def test_missing_file_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(PNG)
    with pytest.raises(InvalidInput, match="no such file"):
        decode_image(tmp_path / "file" / "cat.png")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="directory") as error:
        decode_image(tmp_path)
    assert str(tmp_path) in message(error)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(InvalidInput, match="not a regular file"):
        decode_image(fifo)


def test_file_over_the_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(PNG)
    with pytest.raises(InvalidInput, match=f"file is {len(PNG)} bytes, over the limit of 10 "):
        decode_image(path, limits=ImageLimits(max_bytes=10))


def test_decode_refuses_urls() -> None:
    with pytest.raises(InvalidInput, match="fetch_image_bytes") as error:
        decode_image("https://example.com/cat.png")
    assert "https://example.com/cat.png" in message(error)


@pytest.mark.parametrize(
    "field",
    ["max_bytes", "max_pixels", "fetch_timeout", "max_redirects", "max_concurrent_decodes"],
)
def test_limits_are_validated(field: str) -> None:
    with pytest.raises(InvalidInput) as error:
        ImageLimits(**{field: -1})
    assert error.value.field == field


@pytest.mark.parametrize("value", [0, 1.5, True])
def test_concurrent_decodes_is_a_positive_integer(value: object) -> None:
    with pytest.raises(InvalidInput, match="positive integer") as error:
        ImageLimits(max_concurrent_decodes=value)  # type: ignore[arg-type]
    assert error.value.field == "max_concurrent_decodes"


# -- bad fetches ------------------------------------------------------------------------------

FAST = ImageLimits(fetch_timeout=0.3)
SMALL = ImageLimits(max_bytes=1024 * 1024, fetch_timeout=5.0)


async def _fetch_error(
    url: str, match: str, limits: ImageLimits = FAST, within: float = 3.0
) -> FetchError:
    started = anyio.current_time()
    with pytest.raises(FetchError, match=match) as error:
        await fetch_image_bytes(url, limits=limits)
    assert anyio.current_time() - started < within
    assert url in str(error.value), "the message must name the URL"
    assert error.value.input == url
    assert not isinstance(error.value.__cause__, httpx.HTTPError)
    return error.value


@pytest.mark.anyio
async def test_fetch_404(http_server: LocalHTTPServer) -> None:
    await _fetch_error(http_server.url("/missing"), "HTTP 404 Not Found")
    await _fetch_error(http_server.url("/never-registered"), "HTTP 404")


@pytest.mark.anyio
async def test_fetch_times_out_waiting_for_headers(http_server: LocalHTTPServer) -> None:
    error = await _fetch_error(http_server.url("/slow"), r"timed out after 0\.\d s", within=1.5)
    assert "0.3 s" in str(error)


@pytest.mark.anyio
async def test_fetch_timeout_bounds_the_whole_download(http_server: LocalHTTPServer) -> None:
    # Each chunk comes well within httpx's per-read timeout; only the total bound stops it.
    await _fetch_error(http_server.url("/drip"), "timed out", within=1.5)


@pytest.mark.anyio
async def test_fetch_timeout_applies_to_a_caller_client(http_server: LocalHTTPServer) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        with pytest.raises(FetchError, match="timed out"):
            await fetch_image_bytes(http_server.url("/slow"), limits=FAST, client=client)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("/large", "Content-Length is 2097152 bytes, over the limit of 1048576"),
        ("/large-chunked", "response body exceeds the limit of 1048576 bytes"),
        ("/endless", "response body exceeds the limit of 1048576 bytes"),
    ],
)
async def test_fetch_too_large(http_server: LocalHTTPServer, path: str, match: str) -> None:
    await _fetch_error(http_server.url(path), match, limits=SMALL, within=2.0)


@pytest.mark.anyio
async def test_fetch_not_an_image(http_server: LocalHTTPServer) -> None:
    await _fetch_error(http_server.url("/page.html"), "Content-Type 'text/html', not an image")


@pytest.mark.anyio
async def test_fetch_empty_body(http_server: LocalHTTPServer) -> None:
    url = http_server.route("/empty-image", body=b"", content_type="image/png")
    await _fetch_error(url, "empty body")


@pytest.mark.anyio
async def test_fetch_too_many_redirects(http_server: LocalHTTPServer) -> None:
    before = len(http_server.hits_for("/redirect/"))
    images_before = len(http_server.hits_for("/image.png"))
    limits = ImageLimits(max_redirects=5, fetch_timeout=5)
    await _fetch_error(http_server.url("/redirect/6"), "too many redirects: more than 5", limits)
    assert len(http_server.hits_for("/redirect/")) - before == 6
    assert len(http_server.hits_for("/image.png")) == images_before
    no_redirects = ImageLimits(max_redirects=0)
    await _fetch_error(http_server.url("/redirect/1"), "too many redirects", no_redirects)


@pytest.mark.anyio
@pytest.mark.parametrize(("path", "scheme"), [("/redirect-file", "file"), ("/redirect-ftp", "ftp")])
async def test_fetch_refuses_redirects_to_other_schemes(
    http_server: LocalHTTPServer, path: str, scheme: str
) -> None:
    await _fetch_error(http_server.url(path), f"unsupported URL scheme '{scheme}'.*after 1 redir")


@pytest.mark.anyio
@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/cat.png"])
async def test_fetch_refuses_other_schemes(url: str) -> None:
    await _fetch_error(url, "unsupported URL scheme")


@pytest.mark.anyio
async def test_fetch_connection_refused() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    await _fetch_error(f"http://127.0.0.1:{port}/cat.png", "could not connect: .+")


@pytest.mark.anyio
async def test_fetch_invalid_url() -> None:
    await _fetch_error("http://[::1/cat.png", "not a valid URL")
    await _fetch_error("http:///cat.png", "URL has no host")


@pytest.mark.anyio
async def test_fetch_refuses_non_strings() -> None:
    with pytest.raises(InvalidInput, match="must be a string, not bytes"):
        await fetch_image_bytes(b"http://example.com/", limits=FAST)  # type: ignore[arg-type]
