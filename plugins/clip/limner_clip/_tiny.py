"""A tiny random-weight CLIP, generated on first use into the Hugging Face cache.

It has the real architecture and the real preprocessing (224 px input, 32 px patches), only
tiny widths, so tests and offline demos exercise exactly the code path of the real keys:
``from_pretrained`` from the cache layout. Its vectors mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from limner.plugin import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    TinyModel,
    clip_vocab,
    materialize_in_hf_cache,
    tiny_revision,
)

__all__ = ["TINY", "TINY_KEY", "TINY_REVISION", "ensure_tiny_clip", "write_tiny_clip"]

TINY_KEY = "limner/tiny-clip"
#: Bump the recipe whenever the architecture, seed or files below change, so caches holding
#: the old snapshot are not reused for a different model.
TINY_REVISION = tiny_revision("limner/tiny-clip@1")

TINY_IMAGE_SIZE = 224
TINY_PROJECTION_DIM = 64
_SEED = 20240531


def write_tiny_clip(directory: Path) -> None:
    """Write the tiny model, its preprocessor config and tokenizer into ``directory``."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    config = CLIPConfig(
        text_config={
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": CLIP_MAX_LENGTH,
            "bos_token_id": CLIP_BOS_ID,
            "eos_token_id": CLIP_EOS_ID,
            "pad_token_id": CLIP_EOS_ID,
        },
        vision_config={
            "image_size": TINY_IMAGE_SIZE,
            "patch_size": 32,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        projection_dim=TINY_PROJECTION_DIM,
    )
    torch.manual_seed(_SEED)
    model = CLIPModel(config)
    model.save_pretrained(directory)  # safetensors

    _image_processor_class()().save_pretrained(directory)  # preprocessor_config.json

    # The tokenizer: byte-level BPE without merges, so every byte is a token and every text
    # tokenizes (see limner.plugin.clip_vocab).
    (directory / "vocab.json").write_text(json.dumps(clip_vocab()), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # positional: transformers 5 names them vocab/merges, transformers 4 vocab_file/merges_file
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=CLIP_MAX_LENGTH,
    )
    tokenizer.save_pretrained(directory)


def _image_processor_class() -> type[Any]:
    """CLIP's image processor; the PIL one on transformers 5, which warns when torchvision is
    missing and the default class is asked for."""
    try:
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil
    except ImportError:  # transformers 4: one class, PIL based
        from transformers import CLIPImageProcessor

        return CLIPImageProcessor


def ensure_tiny_clip(cache_dir: Path | None = None) -> Path:
    """The tiny model's snapshot directory in the HF cache, written there if missing."""
    return materialize_in_hf_cache(TINY_KEY, TINY_REVISION, write_tiny_clip, cache_dir=cache_dir)


#: What the backend's weight location writes into the cache when the tiny key is loaded.
TINY = TinyModel(key=TINY_KEY, revision=TINY_REVISION, ensure=ensure_tiny_clip)
