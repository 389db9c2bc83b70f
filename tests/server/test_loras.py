"""LoRA adapters over HTTP: GET /v1/loras, "loras" on POST /v1/images/generations (whole and
streamed, the same pixels as the Python API), and a 400 naming the field for each bad input,
after which the model serves on. The multipart form's JSON field is parsed by the same
function, tested here without a server."""

from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from limner import ImageGenerationConfig, InvalidInput, Registry
from limner.server import ServerSettings, create_app
from limner.server._loras import lora_pairs
from limner.server._schemas import LoraChoice
from limner.testing import fake_generation_spec

if TYPE_CHECKING:
    from tests.server.conftest import ErrorOf, Serve, Served

limner_flux = pytest.importorskip("limner_flux")
limner_sd35 = pytest.importorskip("limner_sd35")

FLUX, SD35 = "limner/tiny-flux", "limner/tiny-sd35"
SMALL = {"size": "32x32", "steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def folder(lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's adapters, and a file that is no adapter."""
    copy = tmp_path_factory.mktemp("served-loras") / "loras"
    shutil.copytree(lora_dir, copy)
    (copy / "junk.safetensors").write_bytes(b"\x10" + bytes(7) + b"not a header")
    return copy


def registry_of(folder: Path) -> Registry:
    registry = Registry(entry_points=False, lora_dirs=[folder])
    registry.register_plugin(limner_flux)
    registry.register_plugin(limner_sd35)
    registry.register(fake_generation_spec("fake/generator"))
    return registry


@pytest.fixture(scope="module")
def served(folder: Path, hf_cache: Path, serve: Serve) -> Iterator[Served]:
    registry = registry_of(folder)
    with serve(create_app(registry=registry, settings=ServerSettings()), registry) as running:
        yield running


def pixels_of(b64: str) -> npt.NDArray[np.int64]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return np.asarray(image.convert("RGB")).astype(np.int64)


def reference(folder: Path, key: str, loras: list[tuple[str, float]]) -> npt.NDArray[np.int64]:
    """The image the Python API makes, on a backend of its own."""
    backend: Any = registry_of(folder).generator(key).backend
    backend.load()
    try:
        config = backend.resolve_config(
            ImageGenerationConfig(width=32, height=32, steps=2, seed=7, loras=loras)
        )
        result = backend.generate("a lighthouse", config, on_step=lambda _: None)
        return np.asarray(result.images[0]).astype(np.int64)
    finally:
        backend.unload()


def generate(served: Served, **body: Any) -> Any:
    with served.client() as client:
        return client.post("/v1/images/generations", json={"prompt": "a lighthouse", **body})


def test_the_server_lists_its_adapters(served: Served) -> None:
    with served.client() as client:
        answer = client.get("/v1/loras")
    assert answer.status_code == 200
    body = answer.json()
    assert body["object"] == "list"
    cards = {card["name"]: card for card in body["data"]}
    assert sorted(cards) == ["ink", "junk", "moss", "oil", "tea"]
    assert cards["ink"] == {
        "object": "lora",
        "name": "ink",
        "family": "FLUX.1",
        "models": [FLUX],
        "rank": 4,
        "size_bytes": cards["ink"]["size_bytes"],
        "where": "ink/pytorch_lora_weights.safetensors",
        "reason": None,
    }
    assert cards["oil"]["size_bytes"] == 2 * cards["ink"]["size_bytes"] > 0
    assert (cards["moss"]["models"], cards["moss"]["family"]) == ([SD35], "SD3.5")
    junk = cards["junk"]
    assert junk["models"] == [] and junk["reason"].startswith("junk.safetensors is not")
    assert str(served.registry.lora_dirs[0]) not in answer.text  # no server paths


@pytest.mark.parametrize(
    ("key", "loras"),
    [
        (FLUX, [("ink", 0.8)]),
        (FLUX, [("oil", 1.0), ("ink", 0.5)]),
        (SD35, [("tea", 0.8)]),
        (SD35, []),
    ],
)
def test_a_generation_with_adapters_makes_the_python_apis_pixels(
    served: Served, folder: Path, key: str, loras: list[tuple[str, float]]
) -> None:
    chosen = [{"name": name, "scale": scale} for name, scale in loras]
    answer = generate(served, model=key, loras=chosen, **SMALL)
    assert answer.status_code == 200, answer.text
    made = pixels_of(answer.json()["data"][0]["b64_json"])
    assert np.array_equal(made, reference(folder, key, loras))


def test_a_streamed_generation_with_adapters_ends_with_the_same_image(served: Served) -> None:
    body = {"prompt": "a lighthouse", "model": FLUX, "stream": True, **SMALL}
    body["loras"] = [{"name": "ink", "scale": 0.8}]
    whole = generate(served, **{k: v for k, v in body.items() if k not in ("stream", "prompt")})
    with (
        served.client() as client,
        client.stream("POST", "/v1/images/generations", json=body) as events,
    ):
        assert events.status_code == 200
        lines = [line for line in events.iter_lines() if line.startswith("data:")]
    events_sent = [json.loads(line.removeprefix("data:").strip()) for line in lines]
    completed = [e for e in events_sent if e.get("type") == "image_generation.completed"]
    assert len(completed) == 1, events_sent  # OpenAI's stream: the image in its last event
    image = completed[0]["b64_json"]
    assert np.array_equal(pixels_of(image), pixels_of(whole.json()["data"][0]["b64_json"]))


def test_the_scale_defaults_to_one(served: Served) -> None:
    named = generate(served, model=FLUX, loras=[{"name": "ink"}], **SMALL)
    full = generate(served, model=FLUX, loras=[{"name": "ink", "scale": 1}], **SMALL)
    assert named.status_code == full.status_code == 200
    assert named.json()["data"] == full.json()["data"]


@pytest.mark.parametrize(
    ("model", "loras", "param", "words"),
    [
        (FLUX, [{"name": "inc", "scale": 1}], "loras[0].name", "Did you mean: ink"),
        (FLUX, [{"name": "ink", "scale": 9}], "loras[0].scale", "less than or equal to 4"),
        (FLUX, [{"name": "ink", "scale": "0.8"}], "loras[0].scale", "valid number"),
        (FLUX, [{"name": "ink"}, {"name": "oil", "scale": -5}], "loras[1].scale", "-4"),
        (FLUX, [{"name": "../ink", "scale": 1}], "loras[0].name", "never a path"),
        (FLUX, [{"name": "tea", "scale": 1}], "loras[0].name", "does not fit limner/tiny-flux"),
        (SD35, [{"name": "ink", "scale": 1}], "loras[0].name", "does not fit limner/tiny-sd35"),
        (FLUX, [{"name": "junk", "scale": 1}], "loras[0].name", "junk.safetensors is not"),
        (FLUX, [{"name": "ink"}, {"name": "ink"}], "loras[1].name", "given twice"),
        (FLUX, [{"name": "ink"}] * 5, "loras", "at most 4"),
        (FLUX, [{"name": "ink", "weight": 1}], "loras[0].weight", "Extra inputs"),
        (FLUX, {"ink": 1}, "loras", "valid list"),
        ("fake/generator", [{"name": "ink"}], "loras", "takes no LoRA adapters"),
    ],
)
def test_each_bad_adapter_is_a_400_naming_the_field(
    served: Served, error_of: ErrorOf, model: str, loras: Any, param: str, words: str
) -> None:
    answer = generate(served, model=model, loras=loras, **SMALL)
    assert answer.status_code == 400, answer.text
    error = error_of(answer)
    assert error["param"] == param
    assert words in error["message"] and "\n" not in error["message"]


def test_after_bad_adapters_the_model_serves_on(served: Served, folder: Path) -> None:
    for loras in ([{"name": "junk"}], [{"name": "tea"}], [{"name": "ink", "scale": 40}]):
        assert generate(served, model=FLUX, loras=loras, **SMALL).status_code == 400
    answer = generate(served, model=FLUX, **SMALL)
    assert answer.status_code == 200
    assert np.array_equal(
        pixels_of(answer.json()["data"][0]["b64_json"]), reference(folder, FLUX, [])
    )


def test_the_schema_documents_adapters(served: Served) -> None:
    with served.client() as client:
        schema = client.get("/openapi.json").json()
    assert "/v1/loras" in schema["paths"]
    request = schema["components"]["schemas"]["ImageRequest"]["properties"]["loras"]
    assert request["maxItems"] == 4


# -- the form field's JSON, as the edits route reads it ---------------------------------------


def test_a_form_field_is_parsed_as_the_json_body_is() -> None:
    assert lora_pairs('[{"name": "ink", "scale": 0.8}, {"name": "oil"}]') == (
        ("ink", 0.8),
        ("oil", 1.0),
    )
    assert lora_pairs([LoraChoice(name="ink", scale=0.5)]) == (("ink", 0.5),)
    assert lora_pairs("") == () and lora_pairs(None) == () and lora_pairs([]) == ()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("ink:0.8", "loras"),
        ('{"name": "ink"}', "loras"),
        ('[{"name": "ink", "scale": "x"}]', "loras[0].scale"),
        ('[{"name": "ink"}, {"scale": 1}]', "loras[1].name"),
        ('[{"name": "ink", "scale": 7}]', "loras[0].scale"),
        ('[{"name": "ink", "extra": 1}]', "loras[0].extra"),
    ],
)
def test_a_bad_form_field_names_the_field(text: str, field: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        lora_pairs(text)
    assert refused.value.field == field


# -- edits: the form's "loras" field, on the edit pipelines that share the adapters ------------


def scene_png() -> bytes:
    ramp = np.linspace(0, 255, 32, dtype=np.uint8)
    pixels = np.stack(
        [np.tile(ramp, (32, 1)), np.tile(ramp[:, None], (1, 32)), 255 - np.tile(ramp, (32, 1))], -1
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


EDIT = {"model": FLUX, "prompt": "a red hat", "size": "32x32", "steps": "2", "seed": "7"}


def edit(served: Served, **fields: str) -> Any:
    with served.client() as client:
        return client.post(
            "/v1/images/edits",
            data={**EDIT, "strength": "0.8", **fields},
            files={"image": ("scene.png", scene_png(), "image/png")},
        )


def edit_reference(folder: Path, loras: list[tuple[str, float]]) -> npt.NDArray[np.int64]:
    """The edit the Python API makes, on a backend of its own."""
    backend: Any = registry_of(folder).generator(FLUX).backend
    backend.load()
    try:
        config = backend.resolve_config(
            ImageGenerationConfig(width=32, height=32, steps=2, seed=7, strength=0.8, loras=loras)
        )
        with Image.open(io.BytesIO(scene_png())) as image:
            source = np.asarray(image.convert("RGB"), dtype=np.uint8)
        result = backend.edit("a red hat", config, source, None, on_step=lambda _: None)
        return np.asarray(result.images[0]).astype(np.int64)
    finally:
        backend.unload()


def test_an_edit_with_adapters_makes_the_python_apis_pixels(served: Served, folder: Path) -> None:
    answer = edit(served, loras=json.dumps([{"name": "ink", "scale": 0.8}]))
    assert answer.status_code == 200, answer.text
    with_ink = pixels_of(answer.json()["data"][0]["b64_json"])
    assert np.array_equal(with_ink, edit_reference(folder, [("ink", 0.8)]))
    plain = edit(served)
    assert plain.status_code == 200, plain.text
    assert not np.array_equal(with_ink, pixels_of(plain.json()["data"][0]["b64_json"]))


@pytest.mark.parametrize(
    ("text", "param"),
    [
        ('[{"name": "inc"}]', "loras[0].name"),
        ('[{"name": "ink", "scale": 9}]', "loras[0].scale"),
        ("ink:0.8", "loras"),
    ],
)
def test_a_bad_adapter_in_an_edit_is_a_400_naming_the_field(
    served: Served, error_of: ErrorOf, text: str, param: str
) -> None:
    answer = edit(served, loras=text)
    assert answer.status_code == 400, answer.text
    assert error_of(answer)["param"] == param
