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


def test_token_ids_are_refused_saying_what_to_change(main: Served) -> None:
    """OpenAI's API also takes token ids, which LangChain's OpenAIEmbeddings sends by default
    through this same client: the 400 says what to change rather than "not a string"."""
    client = client_for(main)
    for tokens, param in (([[64, 2579, 39935], [64, 23506]], "input[0]"), ([64, 2579], "input[0]")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model="limner/tiny-clip", input=tokens)
        error = refused.value.body
        assert isinstance(error, dict)
        assert error["param"] == param and error["code"] == "token_ids_not_supported"
        assert "send each input as a string" in error["message"]
        assert "check_embedding_ctx_length=False" in error["message"]
    # Strings beside them are not the problem: the message names token ids all the same.
    with pytest.raises(openai.BadRequestError) as mixed:
        client.embeddings.create(
            model="limner/tiny-clip",
            input=["a red fox", [64, 2579]],  # type: ignore[arg-type]
        )
    assert "check_embedding_ctx_length=False" in str(mixed.value)


def test_langchain_openai_embeddings_as_the_message_says(
    main: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """langchain-openai itself: by default it tokenizes with tiktoken and sends token ids,
    refused with the advice; with check_embedding_ctx_length=False it sends the strings, and
    gets the server's vectors for them."""
    langchain_openai = pytest.importorskip("langchain_openai")
    import tiktoken

    # tiktoken downloads its vocabularies from the internet, which no machine here reaches: a
    # byte-level encoding stands in for cl100k_base's. The request stays LangChain's own
    # (token ids, through the openai client); only the ids differ.
    by_bytes = tiktoken.Encoding(
        "bytes",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([value]): value for value in range(256)},
        special_tokens={},
    )
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: by_bytes)
    texts = ["a red fox", "a lighthouse at dusk"]
    options = {
        "model": "limner/tiny-clip",
        "base_url": f"{main.url}/v1",
        "api_key": "unused",
        "max_retries": 0,
    }
    with pytest.raises(openai.BadRequestError) as refused:
        langchain_openai.OpenAIEmbeddings(**options).embed_documents(texts)
    assert "check_embedding_ctx_length=False" in str(refused.value)

    embeddings = langchain_openai.OpenAIEmbeddings(**options, check_embedding_ctx_length=False)
    vectors = np.array(embeddings.embed_documents(texts))
    query = np.array(embeddings.embed_query(texts[0]))
    client = client_for(main)
    direct = client.embeddings.create(model="limner/tiny-clip", input=texts)
    alone = client.embeddings.create(model="limner/tiny-clip", input=texts[0])
    assert vectors.shape == (2, 64)
    assert np.allclose(vectors, [row.embedding for row in direct.data], atol=1e-6)
    assert np.allclose(query, alone.data[0].embedding, atol=1e-6)
