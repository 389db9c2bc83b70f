"""litellm, as a user of an OpenAI-compatible server would call it (``openai/<model>`` with
``api_base``), against a real server on 127.0.0.1 on the tiny FLUX: generations and edits,
not streamed. litellm 1.110 passes ``stream`` and ``partial_images`` on but cannot parse a
streamed image answer (it holds no image event types), so streaming is the ``openai``
package's (test_openai_images.py); docs/http.md says so.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

from limner import Registry
from limner.server import ServerSettings, create_app

if TYPE_CHECKING:
    from tests.server.conftest import Serve, Served

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list
litellm = pytest.importorskip("litellm")

TINY_FLUX = "limner/tiny-flux"

# litellm's own types, built when it is imported and called: not limner's to mend.
pytestmark = pytest.mark.filterwarnings("ignore:Items? .* `ReadOnly` qualifier:UserWarning")


@pytest.fixture(scope="module")
def flux_server(serve: Serve, hf_cache: Path) -> Iterator[Served]:
    limner_flux = pytest.importorskip("limner_flux")
    registry = Registry(entry_points=False)
    registry.register_plugin(limner_flux)
    settings = ServerSettings(models=[TINY_FLUX])
    with serve(create_app(registry=registry, settings=settings), registry) as served:
        yield served


def named(data: bytes, name: str) -> io.BytesIO:
    """A file object with a name: what litellm's image_edit sends (it fails on tuples)."""
    file = io.BytesIO(data)
    file.name = name
    return file


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def decoded(b64: str | None) -> Image.Image:
    assert b64
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_image_generation_through_litellm(flux_server: Served) -> None:
    response = litellm.image_generation(
        model=f"openai/{TINY_FLUX}",
        prompt="a lighthouse",
        n=2,
        size="64x48",
        api_base=f"{flux_server.url}/v1",
        api_key="unused",
        extra_body={"seed": 7, "steps": 2},
    )
    assert len(response.data) == 2
    for item in response.data:
        assert decoded(item.b64_json).size == (64, 48)


def test_image_edit_through_litellm(flux_server: Served) -> None:
    source = Image.fromarray(np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 48))  # edit the left half
    response = litellm.image_edit(
        model=f"openai/{TINY_FLUX}",
        prompt="a red hat",
        image=named(png(source), "fox.png"),
        mask=named(png(mask), "mask.png"),
        api_base=f"{flux_server.url}/v1",
        api_key="unused",
        extra_body={"seed": 3, "steps": 2, "strength": 0.9},
    )
    assert len(response.data) == 1
    edited = decoded(response.data[0].b64_json)
    assert edited.size == (64, 48)
    pixels, original = np.asarray(edited.convert("RGB")), np.asarray(source)
    assert np.array_equal(pixels[:, 32:], original[:, 32:])  # kept outside the mask
    assert not np.array_equal(pixels[:, :32], original[:, :32])
