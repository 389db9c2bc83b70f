"""OpenAI's Images API as the official ``openai`` package sees it, against a real server on
127.0.0.1 serving the tiny FLUX (and fakes): edits with and without a mask, several images,
every output format, and the streamed events typed by the client.

The client accepts anything (it builds its models without validation), so every answer is
also validated strictly with the client's own types' ``model_validate``.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import numpy as np
import pytest
from PIL import Image

from limner import Registry
from limner.plugin import TextToImageBackend
from limner.server import ServerSettings, create_app
from limner.testing import FakeTextToImageBackend, fake_generation_spec

if TYPE_CHECKING:
    from tests.server.conftest import ErrorOf, Serve, Served

pytest.importorskip("openai")

import openai
from openai.types import (
    ImageEditCompletedEvent,
    ImageEditPartialImageEvent,
    ImageGenCompletedEvent,
    ImageGenPartialImageEvent,
    ImagesResponse,
)
from pydantic import TypeAdapter

TINY_FLUX = "limner/tiny-flux"
GenerateEvent = TypeAdapter(ImageGenPartialImageEvent | ImageGenCompletedEvent)
EditEvent = TypeAdapter(ImageEditPartialImageEvent | ImageEditCompletedEvent)
PARTIAL_EVENTS = (ImageGenPartialImageEvent, ImageEditPartialImageEvent)


class GenerateOnly(FakeTextToImageBackend):
    edit = TextToImageBackend.edit


@pytest.fixture(scope="module")
def images_server(serve: Serve, hf_cache: Path) -> Iterator[Served]:
    limner_flux = pytest.importorskip("limner_flux")
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_flux)
    registry.register(fake_generation_spec("fake/generator"))
    registry.register(
        dataclasses.replace(fake_generation_spec("fake/no-edits"), factory=GenerateOnly)
    )
    settings = ServerSettings(models=[TINY_FLUX, "fake/generator", "fake/no-edits"])
    with serve(create_app(registry=registry, settings=settings), registry) as served:
        yield served


def client_for(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


SOURCE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8))
INSIDE = (16, 8, 48, 40)  # left, top, right, bottom of the area to edit


def openai_mask(size: tuple[int, int] = (64, 48)) -> Image.Image:
    """OpenAI's mask: fully transparent where the image is edited, opaque elsewhere."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), INSIDE)
    return mask


def outside_mask() -> np.ndarray:
    outside = np.ones((48, 64), dtype=bool)
    left, top, right, bottom = INSIDE
    outside[top:bottom, left:right] = False
    return outside


def decoded(b64: str | None) -> Image.Image:
    assert b64, "no image data"
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def strictly(raw: Any) -> ImagesResponse:
    """The answer validated by the client's type, strictly (the client itself does not)."""
    return ImagesResponse.model_validate_json(raw.text)


# -- edits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("output_format", ["png", "jpeg", "webp"])
def test_edit_with_a_mask_in_each_output_format(
    images_server: Served, output_format: Literal["png", "jpeg", "webp"]
) -> None:
    client = client_for(images_server)
    raw = client.images.with_raw_response.edit(
        model=TINY_FLUX,
        image=("fox.png", png(SOURCE), "image/png"),
        mask=("mask.png", png(openai_mask()), "image/png"),
        prompt="a red hat",
        output_format=output_format,
        output_compression=90,
        extra_body={"seed": 7, "steps": 2, "strength": 0.8},
    )
    answer = strictly(raw)
    assert answer.output_format == output_format and answer.size == "64x48"
    assert answer.background == "opaque" and answer.usage is not None
    assert answer.data is not None and len(answer.data) == 1
    image = decoded(answer.data[0].b64_json)
    assert image.format == {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}[output_format]
    assert image.size == (64, 48)  # the source's size: none was given
    if output_format == "png":  # lossless: outside the mask, the source pixel for pixel
        pixels, original = np.asarray(image.convert("RGB")), np.asarray(SOURCE)
        assert np.array_equal(pixels[outside_mask()], original[outside_mask()])
        assert not np.array_equal(pixels[~outside_mask()], original[~outside_mask()])
        settings = json.loads(image.text["limner"])  # type: ignore[attr-defined]
        assert settings["strength"] == 0.8 and settings["edit"] == "inpaint"


def test_edit_without_a_mask_is_deterministic_by_seed(images_server: Served) -> None:
    client = client_for(images_server)

    def edit(seed: int) -> np.ndarray:
        answer = client.images.edit(
            model=TINY_FLUX,
            image=png(SOURCE),  # raw bytes: sent as "upload", application/octet-stream
            prompt="a snowy fox",
            size="32x32",
            extra_body={"seed": seed, "steps": 2, "strength": 0.6},
        )
        assert answer.data is not None
        image = decoded(answer.data[0].b64_json)
        assert image.size == (32, 32)  # the size asked for
        return np.asarray(image)

    first = edit(11)
    assert np.array_equal(first, edit(11))
    assert not np.array_equal(first, edit(12))


def test_several_images_are_each_edited(images_server: Served) -> None:
    client = client_for(images_server)
    other = SOURCE.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    raw = client.images.with_raw_response.edit(
        model=TINY_FLUX,
        image=[("a.png", png(SOURCE), "image/png"), ("b.png", png(other), "image/png")],
        prompt="a red hat",
        n=2,
        extra_body={"seed": 5, "steps": 1, "strength": 0.0},  # strength 0: the sources back
    )
    answer = strictly(raw)
    assert answer.data is not None and len(answer.data) == 4  # n images of each, in order
    expected = [SOURCE, SOURCE, other, other]
    for item, source in zip(answer.data, expected):
        assert np.array_equal(np.asarray(decoded(item.b64_json).convert("RGB")), np.asarray(source))


def test_the_fake_edits_through_the_client_with_its_own_mask_convention(
    images_server: Served,
) -> None:
    answer = client_for(images_server).images.edit(
        model="fake/generator",
        image=("in.png", png(SOURCE), "image/png"),
        mask=("mask.png", png(openai_mask()), "image/png"),
        prompt="p",
        extra_body={"seed": 1, "strength": 1.0},
    )
    assert answer.data is not None
    pixels = np.asarray(decoded(answer.data[0].b64_json).convert("RGB"))
    assert np.array_equal(pixels[outside_mask()], np.asarray(SOURCE)[outside_mask()])
    inside = pixels[~outside_mask()]
    assert (inside == inside[0]).all()  # the fake's flat colour, at strength 1


@pytest.mark.parametrize(
    ("files", "fields", "param"),
    [
        ({"mask": png(Image.new("L", (64, 48)))}, {}, "mask"),  # no alpha: OpenAI's needs one
        ({"mask": png(openai_mask((32, 32)))}, {}, "mask"),
        ({"image": b"not an image"}, {}, "image"),
        ({}, {"strength": "1.5"}, "strength"),
        ({}, {"strength": "strong"}, "strength"),
        ({}, {"n": "two"}, "n"),
        ({}, {"stream": "maybe"}, "stream"),
        ({}, {"colour": "red"}, "colour"),
        ({}, {"background": "transparent"}, "background"),
        ({}, {"response_format": "url"}, "response_format"),
        ({}, {"partial_images": "4"}, "partial_images"),
        ({}, {"model": "fake/no-edits"}, "model"),
        ({}, {"prompt": ""}, "prompt"),
        ({}, {"size": "12x12"}, "size"),
    ],
)
def test_bad_edits_are_400s_naming_the_field(
    images_server: Served,
    error_of: ErrorOf,
    files: dict[str, bytes],
    fields: dict[str, str],
    param: str,
) -> None:
    parts = {"image": png(SOURCE), **files}
    body = {"model": TINY_FLUX, "prompt": "p", **fields}
    with images_server.client() as client:
        response = client.post(
            "/v1/images/edits",
            data=body,
            files={name: (f"{name}.png", data, "image/png") for name, data in parts.items()},
        )
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == param


def test_an_edit_is_sent_as_a_form(images_server: Served, error_of: ErrorOf) -> None:
    with images_server.client() as client:
        as_json = client.post("/v1/images/edits", json={"model": TINY_FLUX, "prompt": "p"})
        mask_only = {"mask": ("m.png", png(openai_mask()), "image/png")}
        no_image = client.post(
            "/v1/images/edits", data={"model": TINY_FLUX, "prompt": "p"}, files=mask_only
        )
    assert as_json.status_code == 400 and "multipart/form-data" in error_of(as_json)["message"]
    assert no_image.status_code == 400 and error_of(no_image)["param"] == "image"


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # the client's, of DALL-E 2
def test_variations_are_a_clear_400(images_server: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(images_server).images.create_variation(image=png(SOURCE), model=TINY_FLUX)
    assert "POST /v1/images/edits" in str(caught.value)


# -- OpenAI's streams, typed by the client --------------------------------------------------


def test_a_streamed_generation_is_typed_events(images_server: Served) -> None:
    events = list(
        client_for(images_server).images.generate(
            model=TINY_FLUX,
            prompt="a lighthouse",
            size="64x48",
            stream=True,
            partial_images=2,
            output_format="webp",
            extra_body={"seed": 3, "steps": 4},
        )
    )
    assert [type(event) for event in events] == [
        ImageGenPartialImageEvent,
        ImageGenPartialImageEvent,
        ImageGenCompletedEvent,
    ]
    for index, event in enumerate(events[:2]):
        assert isinstance(event, ImageGenPartialImageEvent)
        assert event.type == "image_generation.partial_image"
        assert event.partial_image_index == index
        assert decoded(event.b64_json).size == (64, 48)  # the preview, scaled to the output
    completed = events[-1]
    assert isinstance(completed, ImageGenCompletedEvent)
    assert completed.type == "image_generation.completed" and completed.usage is not None
    image = decoded(completed.b64_json)
    assert (image.format, image.size) == ("WEBP", (64, 48))
    assert (completed.size, completed.output_format) == ("64x48", "webp")


def test_a_streamed_edit_is_typed_events(images_server: Served) -> None:
    events = list(
        client_for(images_server).images.edit(
            model=TINY_FLUX,
            image=("fox.png", png(SOURCE), "image/png"),
            mask=("mask.png", png(openai_mask()), "image/png"),
            prompt="a red hat",
            stream=True,
            partial_images=1,
            extra_body={"seed": 3, "steps": 4, "strength": 1.0},
        )
    )
    assert [type(event) for event in events] == [
        ImageEditPartialImageEvent,
        ImageEditCompletedEvent,
    ]
    partial, completed = events
    assert isinstance(partial, ImageEditPartialImageEvent)
    assert partial.type == "image_edit.partial_image" and partial.partial_image_index == 0
    assert isinstance(completed, ImageEditCompletedEvent)
    assert completed.type == "image_edit.completed"
    assert decoded(completed.b64_json).size == (64, 48)
    pixels = np.asarray(decoded(completed.b64_json).convert("RGB"))
    assert np.array_equal(pixels[outside_mask()], np.asarray(SOURCE)[outside_mask()])


def raw_events(served: Served, path: str, **request: Any) -> list[dict[str, Any]]:
    """Each event's JSON as sent, for strict validation."""
    with (
        httpx.Client(base_url=served.url, timeout=60) as client,
        client.stream("POST", path, **request) as response,
    ):
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    return [json.loads(line.removeprefix("data:")) for line in lines]


@pytest.mark.parametrize("partial_images", [0, 1, 3])
def test_every_event_has_every_field_the_clients_types_require(
    images_server: Served, partial_images: int
) -> None:
    body = {"model": TINY_FLUX, "prompt": "a fox", "size": "32x32", "stream": True, "n": 2,
            "partial_images": partial_images, "seed": 1, "steps": 6}  # fmt: skip
    generated = raw_events(images_server, "/v1/images/generations", json=body)
    kinds = [GenerateEvent.validate_python(event, strict=True) for event in generated]
    form = {key: str(value).lower() if isinstance(value, bool) else str(value)
            for key, value in body.items()}  # fmt: skip
    files = {"image": ("in.png", png(SOURCE), "image/png")}
    edited = raw_events(images_server, "/v1/images/edits", data=form, files=files)
    edits = [EditEvent.validate_python(event, strict=True) for event in edited]
    for events in (kinds, edits):
        partials = [e for e in events if isinstance(e, PARTIAL_EVENTS)]
        assert [p.partial_image_index for p in partials] == list(range(partial_images))
        assert len(events) - len(partials) == 2  # a completed event per image
    assert {event["quality"] for event in generated} == {"auto"}
    assert {event["background"] for event in generated} == {"auto"}


def test_partial_images_are_spread_over_the_steps_that_run() -> None:
    from limner.server._images import partial_steps

    assert partial_steps(4, 2) == [1, 3]
    assert partial_steps(10, 3) == [3, 5, 8]
    assert partial_steps(2, 3) == [1, 2]  # no more than there are steps
    assert partial_steps(5, 0) == []
    assert partial_steps(0, 2) == []


def test_limners_own_stream_stays_under_stream_format(images_server: Served) -> None:
    body = {"model": "fake/generator", "prompt": "p", "steps": 3, "stream": True,
            "stream_format": "limner", "preview": True}  # fmt: skip
    with (
        images_server.client() as client,
        client.stream("POST", "/v1/images/generations", json=body) as response,
    ):
        names = [line[6:].strip() for line in response.iter_lines() if line.startswith("event:")]
    assert names == ["progress"] * 3 + ["completed", "done"]
    with images_server.client() as client:
        mixed = client.post("/v1/images/generations", json={**body, "stream_format": "openai"})
        partial = client.post("/v1/images/generations", json={**body, "partial_images": 2})
    assert mixed.status_code == 400 and mixed.json()["error"]["param"] == "preview"
    assert partial.status_code == 400 and partial.json()["error"]["param"] == "partial_images"


def test_generation_answers_carry_openais_fields(images_server: Served) -> None:
    raw = client_for(images_server).images.with_raw_response.generate(
        model="fake/generator",
        prompt="p",
        size="auto",
        quality="high",
        background="opaque",
        moderation="low",
        output_format="jpeg",
        output_compression=20,
        user="u",
        extra_body={"seed": 2},
    )
    answer = strictly(raw)
    assert (answer.quality, answer.background, answer.output_format) == ("high", "opaque", "jpeg")
    assert answer.size == "16x16"  # auto: the model's default
    assert answer.usage is not None and answer.usage.total_tokens == 0
    assert (answer.model_extra or {}).get("seed") == 2
    with pytest.raises(openai.BadRequestError, match="cannot make transparent images"):
        client_for(images_server).images.generate(
            model="fake/generator", prompt="p", background="transparent"
        )
