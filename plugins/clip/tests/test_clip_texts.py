"""Texts on the tiny CLIP: the tokens and vectors of the plain transformers path, long texts
cut cheaply before tokenizing, and tokenizing outside the model's turn."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, cast

import anyio
import numpy as np
import pytest
import torch

import limner
import limner_clip
from limner.plugin import BuiltOnFirstUse
from limner_clip._backend import ClipBackend, token_prefix
from limner_clip._tiny import TINY_KEY, ensure_tiny_clip

#: Texts of every shape: short, odd spacing, non-ASCII, a special token, past 77 tokens, long
#: enough to be cut (words, a run of spaces, one giant word, ideographic spaces).
TEXTS = [
    "a red fox",
    "  A   Red\tFox\n\n",
    "Ünïcödé, naïve café — 東京 🦊",
    "<|endoftext|> inside a text",
    "word " * 40,
    "lighthouse at dusk. " * 1_500,
    " " * 50_000 + "after a long run of spaces " * 20,
    "x" * 20_000,
    "fox\u3000" * 3_000,
]


@pytest.fixture
def long_texts() -> limner.Registry:
    """A registry whose CLIP takes texts of megabytes, to measure them rather than refuse."""
    registry = limner.Registry(entry_points=False, max_text_chars=16 * 2**20)
    registry.register_plugin(limner_clip)
    registry.configure(TINY_KEY, dtype="float32")
    return registry


def _backend(model: limner.ImageEmbedder) -> ClipBackend:
    backend = model.backend
    assert isinstance(backend, ClipBackend)
    return backend


def reference(texts: list[str]) -> np.ndarray[Any, np.dtype[np.float32]]:
    """What a transformers user writes: the tokenizer on the whole texts, then the model."""
    from transformers import AutoTokenizer, CLIPModel

    snapshot = ensure_tiny_clip()
    tokenizer = AutoTokenizer.from_pretrained(snapshot)
    model = CLIPModel.from_pretrained(snapshot, dtype=torch.float32)
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.inference_mode():
        output = model.get_text_features(**tokens)
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        vectors: np.ndarray[Any, np.dtype[np.float32]] = torch.nn.functional.normalize(
            features, dim=-1
        ).numpy()
    return vectors


@pytest.mark.anyio
async def test_texts_give_the_tokens_and_vectors_of_the_transformers_path(
    long_texts: limner.Registry,
) -> None:
    from transformers import AutoTokenizer

    model = long_texts.embedder(TINY_KEY)
    ours = await model.embed_text(TEXTS)
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_clip())
    backend = _backend(model)
    for text in TEXTS:
        expected = tokenizer(text, truncation=True, max_length=77)["input_ids"]
        assert backend.prepare_text(text) == expected, text[:40]
    np.testing.assert_allclose(ours, reference(TEXTS), atol=1e-5)


@pytest.mark.anyio
async def test_a_long_text_embeds_as_the_same_text_cut_cheaply(
    long_texts: limner.Registry,
) -> None:
    model = long_texts.embedder(TINY_KEY)
    long = "a lighthouse at dusk, " * (8 * 2**20 // 22)  # 8 MiB
    vector = await model.embed_text(long)
    np.testing.assert_array_equal(vector, await model.embed_text(long[:5_000]))
    np.testing.assert_allclose(vector, reference([long[:5_000]])[0], atol=1e-5)
    # What is tokenized: a prefix of a few thousand characters, not the 8 MiB.
    assert len(token_prefix(long, _backend(model)._text_encoder.get().prefix_chars)) < 5_000


def test_token_prefix_keeps_short_texts_and_whole_words() -> None:
    assert token_prefix("short", 10) == "short"
    assert token_prefix("aa bb cc dd", 5) == "aa bb cc"  # ends with the word the 5th letter is in
    assert token_prefix("  \n aa   bb   cc", 3) == "  \n aa   bb"  # spaces count for nothing
    assert token_prefix("x" * 100, 10) == "x" * 20  # no word end in sight: cut past the mark


@pytest.mark.anyio
async def test_a_short_text_is_not_held_up_by_a_long_ones_tokenizing() -> None:
    """The long text's tokenizing is stopped inside the tokenizer until the short request is
    answered: were tokenizing under the model's lock or in the pool's turn, the short request
    could never be answered, and the hang guard would fail the test."""
    registry = limner.Registry(entry_points=False)
    registry.register_plugin(limner_clip)
    entered, release = threading.Event(), threading.Event()

    class StoppingTokenizer:
        def __init__(self, rust: Any) -> None:
            self.rust = rust

        def encode(self, text: str) -> Any:
            if len(text) > 1_000:
                entered.set()
                release.wait(timeout=120)
            return self.rust.encode(text)

    finished: list[str] = []
    async with limner.Pool() as pool:
        model = registry.embedder(TINY_KEY).using(pool)
        await model.embed_text("warm up")  # weights and tokenizer loaded
        backend = _backend(model)
        encoder = backend._text_encoder.get()
        stopping = dataclasses.replace(encoder, rust=cast(Any, StoppingTokenizer(encoder.rust)))
        backend._text_encoder = BuiltOnFirstUse(lambda: stopping)

        async def long_request() -> None:
            await model.embed_text("a lighthouse at dusk " * 400)
            finished.append("long")

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(long_request)
                assert await anyio.to_thread.run_sync(entered.wait, 60)
                with anyio.fail_after(60):  # a hang guard, not a measurement
                    short = await model.embed_text("a red fox")
                finished.append("short")
                assert short.shape == (64,)
                release.set()
        finally:
            release.set()
    assert finished == ["short", "long"]
