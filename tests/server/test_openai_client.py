"""The official ``openai`` package as a client: what OpenAI users would run, unchanged."""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from tests.server.conftest import Served

pytest.importorskip("openai")

import openai


def client_for(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)


def test_embeddings_through_the_openai_client(main: Served) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (250, 120, 0)).save(buffer, "PNG")
    image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    client = client_for(main)
    response = client.embeddings.create(model="limner/tiny-clip", input=["a red fox", image])
    assert response.model == "limner/tiny-clip"
    assert [row.index for row in response.data] == [0, 1]
    text, picture = (np.array(row.embedding) for row in response.data)
    assert text.shape == picture.shape == (64,)
    assert np.linalg.norm(text) == pytest.approx(1.0, abs=1e-3)
    as_floats = client.embeddings.create(
        model="limner/tiny-clip", input="a red fox", encoding_format="float"
    )
    assert np.allclose(as_floats.data[0].embedding, text, atol=1e-6)


def test_models_and_errors_through_the_openai_client(main: Served) -> None:
    client = client_for(main)
    ids = {model.id for model in client.models.list()}
    assert "limner/tiny-clip" in ids
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="limner/tiny-clp", input="x")
    assert "limner/tiny-clip" in str(missing.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.generate(model="fake/generator", prompt="x", response_format="url")
    assert "b64_json" in str(bad.value)


def test_images_through_the_openai_client(main: Served) -> None:
    client = client_for(main)
    response = client.images.generate(
        model="fake/generator",
        prompt="a lighthouse at dusk",
        n=2,
        size="32x16",  # any WxH the model takes
        response_format="b64_json",
        extra_body={"seed": 11, "steps": 3},
    )
    assert response.data is not None and len(response.data) == 2
    for item in response.data:
        assert item.b64_json is not None
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.size == (32, 16)
    assert (response.model_extra or {}).get("seed") == 11
