"""POST /v1/images/generations: whole answers, server-sent events, errors, and cancellation."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from PIL import Image

from limner import Registry
from limner.testing import FakeTextToImageBackend, fake_generation_spec

if TYPE_CHECKING:
    from pathlib import Path

    from tests.server.conftest import ErrorOf, Served, ServerFactory, WaitFor


@dataclass
class Event:
    name: str
    data: Any


def parse_events(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events from a line iterator, as a browser's EventSource reads them."""
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                text = "\n".join(data)
                yield Event(name, text if text == "[DONE]" else json.loads(text))
            name, data = "message", list[str]()
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))


def generate(served: Served, **body: Any) -> httpx.Response:
    with served.client() as client:
        return client.post("/v1/images/generations", json=body)


def stream(served: Served, **body: Any) -> list[Event]:
    """limner's own stream (``stream_format: "limner"``) unless ``body`` says otherwise."""
    request = {"stream_format": "limner", **body, "stream": True}
    with (
        served.client() as client,
        client.stream("POST", "/v1/images/generations", json=request) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_events(response.iter_lines()))


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generation_returns_base64_images_and_the_seed(main: Served) -> None:
    response = generate(
        main, model="fake/generator", prompt="a lighthouse", n=2, size="32x24", seed=7
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seed"] == 7
    assert body["model"] == "fake/generator"
    assert body["size"] == "32x24"
    assert isinstance(body["created"], int)
    assert len(body["data"]) == 2
    for item in body["data"]:
        assert item["revised_prompt"] is None
        image = decode(item["b64_json"])
        assert image.format == "PNG"
        assert image.size == (32, 24)
    again = generate(main, model="fake/generator", prompt="a lighthouse", size="32x24", seed=7)
    # The same pixels; the PNGs' text chunks differ, since they record n.
    first, repeated = (decode(b["data"][0]["b64_json"]) for b in (body, again.json()))
    assert repeated.tobytes() == first.tobytes()
    drawn = generate(main, model="fake/generator", prompt="a lighthouse")
    assert isinstance(drawn.json()["seed"], int)  # a drawn seed is reported back


@pytest.mark.parametrize(
    "extras",
    [{"quality": "hd", "style": "vivid"}, {"quality": "high"}, {"style": "natural"}],
)
def test_what_openai_clients_send_is_accepted(main: Served, extras: dict[str, str]) -> None:
    """quality and style, sent by OpenAI's clients, are accepted and leave the image as is."""
    plain = generate(main, model="fake/generator", prompt="p", size="32x24", seed=3)
    response = generate(main, model="fake/generator", prompt="p", size="32x24", seed=3, **extras)
    assert response.status_code == 200, response.text
    image, reference = (decode(r.json()["data"][0]["b64_json"]) for r in (response, plain))
    assert image.tobytes() == reference.tobytes()


def test_output_format_jpeg_and_webp(main: Served) -> None:
    for name, magic in (("jpeg", "JPEG"), ("webp", "WEBP")):
        response = generate(main, model="fake/generator", prompt="p", output_format=name)
        assert decode(response.json()["data"][0]["b64_json"]).format == magic


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"response_format": "url"}, "response_format", "unsupported_response_format"),
        ({"size": "12x12"}, "size", "invalid_input"),
        ({"size": "big"}, "size", "invalid_request"),
        ({"steps": 51}, "steps", "invalid_input"),
        ({"n": 0}, "n", "invalid_request"),
        ({"n": 11}, "n", "invalid_request"),
        ({"prompt": ""}, "prompt", "invalid_request"),
        ({"prompt": "   "}, "prompt", "invalid_input"),
        ({"seed": -1}, "seed", "invalid_request"),
        ({"guidance": "NaN"}, "guidance", "invalid_request"),
        ({"model": "limner/tiny-clip"}, "model", "wrong_capability"),
        ({"style": "dramatic"}, "style", "invalid_request"),
        ({"quality": "ultra"}, "quality", "invalid_request"),
        ({"colour": "red"}, "colour", "invalid_request"),
        ({"stream": "no"}, "stream", "invalid_request"),
        ({"stream": "true"}, "stream", "invalid_request"),
        ({"stream": 0}, "stream", "invalid_request"),
        # Numbers are JSON numbers, strictly as stream is a JSON boolean: true is not 1.
        ({"seed": True}, "seed", "invalid_request"),
        ({"seed": "7"}, "seed", "invalid_request"),
        ({"steps": True}, "steps", "invalid_request"),
        ({"n": 1.0}, "n", "invalid_request"),
        ({"guidance": True}, "guidance", "invalid_request"),
    ],
)
def test_bad_generation_requests_are_400_naming_the_field(
    main: Served, error_of: ErrorOf, body: dict[str, Any], param: str, code: str
) -> None:
    response = generate(main, **{"model": "fake/generator", "prompt": "a cat", **body})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert (error["param"], error["code"]) == (param, code)


def test_streaming_sends_one_progress_event_per_step_then_the_images(main: Served) -> None:
    events = stream(main, model="fake/generator", prompt="a fox", steps=5, seed=3, size="16x16")
    names = [event.name for event in events]
    assert names == ["progress"] * 5 + ["completed", "done"]
    progress = [event.data for event in events[:5]]
    assert [p["step"] for p in progress] == [1, 2, 3, 4, 5]
    assert {p["total"] for p in progress} == {5}
    elapsed = [p["elapsed"] for p in progress]
    assert elapsed == sorted(elapsed)
    completed = events[5].data
    assert completed["seed"] == 3
    assert decode(completed["data"][0]["b64_json"]).size == (16, 16)
    assert events[6].data == "[DONE]"
    whole = generate(main, model="fake/generator", prompt="a fox", steps=5, seed=3, size="16x16")
    assert whole.json()["data"] == completed["data"]  # the same images either way


def test_a_failure_mid_stream_is_an_error_event(main: Served) -> None:
    events = stream(main, model="fake/failing", prompt="a fox", steps=4)
    assert [event.name for event in events] == ["progress", "error"]
    error = events[1].data
    assert error["status"] == 500
    assert error["error"]["code"] == "model_error"
    assert "injected failure at step 2" in error["error"]["message"]


def test_a_model_failure_is_a_500_in_the_error_shape(main: Served, error_of: ErrorOf) -> None:
    response = generate(main, model="fake/failing", prompt="a fox", steps=4)
    assert response.status_code == 500
    error = error_of(response)
    assert (error["type"], error["code"]) == ("server_error", "model_error")
    assert "injected failure at step 2" in error["message"]


def test_errors_before_the_first_step_keep_their_status(main: Served, error_of: ErrorOf) -> None:
    with main.client() as client:
        response = client.post(
            "/v1/images/generations",
            json={"model": "no/such", "prompt": "x", "stream": True},
        )
    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"


def slow_registry(step_seconds: float = 0.05) -> tuple[Registry, FakeTextToImageBackend]:
    registry = Registry(entry_points=False)
    registry.register(fake_generation_spec("fake/slow", options={"step_seconds": step_seconds}))
    backend = registry.generator("fake/slow").backend
    assert isinstance(backend, FakeTextToImageBackend)
    return registry, backend


def test_a_client_leaving_a_stream_stops_the_generation(
    make_server: ServerFactory, wait_for: WaitFor
) -> None:
    registry, backend = slow_registry()
    served = make_server(registry=registry)
    with (
        served.client() as client,
        client.stream(
            "POST",
            "/v1/images/generations",
            json={
                "model": "fake/slow",
                "prompt": "long",
                "steps": 50,
                "stream": True,
                "stream_format": "limner",
            },
        ) as response,
    ):
        events = parse_events(response.iter_lines())  # held: dropping it closes the stream
        first = next(events)
        assert first.name == "progress"
        assert served.pool("fake/slow")["in_flight"] == 1
    # The connection is closed: the pool stops the pipeline at its next step.
    wait_for(lambda: served.pool("fake/slow")["in_flight"] == 0, what="the generation to stop")
    stopped_at = backend.steps_run
    time.sleep(0.3)  # six more steps' time
    assert backend.steps_run == stopped_at
    assert stopped_at < 50
    # Counted as a client that left (499), though its answer had begun with a 200.
    metrics = served.app.state.limner_metrics.registry
    labels = {"method": "POST", "route": "/v1/images/generations"}

    def counted(status: str) -> float:
        value = metrics.get_sample_value("limner_http_requests_total", {**labels, "status": status})
        return value or 0.0

    wait_for(lambda: counted("499") == 1, what="the abandoned stream to be counted")
    assert counted("200") == 0
    stream(served, model="fake/slow", prompt="short", steps=2)  # one read to its end: a 200
    wait_for(lambda: counted("200") == 1, what="the whole stream to be counted")
    assert counted("499") == 1


def test_a_client_leaving_a_whole_generation_stops_it(
    make_server: ServerFactory, wait_for: WaitFor
) -> None:
    registry, backend = slow_registry()
    served = make_server(registry=registry)
    with served.client(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post(
            "/v1/images/generations", json={"model": "fake/slow", "prompt": "long", "steps": 50}
        )
    wait_for(lambda: served.pool("fake/slow")["in_flight"] == 0, what="the generation to stop")
    stopped_at = backend.steps_run
    time.sleep(0.3)
    assert backend.steps_run == stopped_at
    assert stopped_at < 50


def test_a_stream_past_request_timeout_ends_with_a_504_event(
    make_server: ServerFactory, wait_for: WaitFor
) -> None:
    registry, backend = slow_registry(step_seconds=0.1)
    served = make_server(registry=registry, request_timeout=0.6)
    events = stream(served, model="fake/slow", prompt="long", steps=50)
    assert events[0].name == "progress"
    assert events[-1].name == "error"
    assert events[-1].data["status"] == 504
    assert events[-1].data["error"]["code"] == "request_timeout"
    wait_for(lambda: served.pool("fake/slow")["in_flight"] == 0, what="the generation to stop")
    assert backend.steps_run < 50


def test_tiny_flux_generates_and_streams(make_server: ServerFactory, hf_cache: Path) -> None:
    limner_flux = pytest.importorskip("limner_flux")
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_flux)
    served = make_server(registry=registry, models=["limner/tiny-flux"])
    events = stream(served, model="limner/tiny-flux", prompt="a red fox", steps=2, size="64x64")
    assert [event.name for event in events] == ["progress", "progress", "completed", "done"]
    image = decode(events[2].data["data"][0]["b64_json"])
    assert image.size == (64, 64)
    assert image.getextrema() != ((0, 0), (0, 0), (0, 0))  # not a blank image


def test_a_stream_with_preview_sends_a_png_at_every_step(
    make_server: ServerFactory, hf_cache: Path
) -> None:
    limner_flux = pytest.importorskip("limner_flux")
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_flux)
    served = make_server(registry=registry, models=["limner/tiny-flux"])
    request = {"model": "limner/tiny-flux", "prompt": "a red fox", "size": "128x64", "steps": 3}
    events = stream(served, **request, preview=True)
    assert [event.name for event in events] == ["progress"] * 3 + ["completed", "done"]
    previews = [decode(event.data["preview"]) for event in events[:3]]
    assert all(preview.format == "PNG" for preview in previews)
    assert {preview.size for preview in previews} == {(16, 8)}  # one pixel per latent
    assert "preview" not in stream(served, **request)[0].data


def test_png_answers_carry_prompt_seed_model_and_settings(main: Served) -> None:
    body = {"model": "fake/generator", "prompt": "a lighthouse", "seed": 11, "steps": 2}
    whole = generate(main, **body).json()
    streamed = stream(main, **body)[-2].data
    for answer in (whole, streamed):
        text = decode(answer["data"][0]["b64_json"]).text  # type: ignore[attr-defined]
        assert text["prompt"] == "a lighthouse"
        assert text["seed"] == "11"
        assert text["model"] == "fake/generator"
        assert json.loads(text["limner"])["steps"] == 2
