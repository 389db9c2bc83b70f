"""A tiny random-weight CLIP, generated on first use into the Hugging Face cache.

It has the real architecture and the real preprocessing (224 px input, 32 px patches), only
tiny widths, so tests and offline demos exercise exactly the code path of the real keys:
``from_pretrained`` from the cache layout. Its vectors mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import limner

__all__ = ["TINY_KEY", "TINY_REVISION", "ensure_tiny_clip", "write_tiny_clip"]

TINY_KEY = "limner/tiny-clip"
#: Bump the recipe whenever the architecture, seed or files below change, so caches holding
#: the old snapshot are not reused for a different model.
TINY_REVISION = limner.tiny_revision("limner/tiny-clip@1")

TINY_IMAGE_SIZE = 224
TINY_PROJECTION_DIM = 64
_SEED = 20240531

# The tokenizer: byte-level BPE without merges, so every byte is a token and every text
# tokenizes. Ids follow the layout of the real CLIP vocabulary: the 256 byte symbols, their
# end-of-word variants, then the two special tokens.
_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_BOS_ID = 512
_EOS_ID = 513
_VOCAB_SIZE = 514
_MAX_TEXT_POSITIONS = 77


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte, in byte order (what ByteLevel emits)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols: dict[int, str] = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def tiny_vocab() -> dict[str, int]:
    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": 256 + index for index, symbol in enumerate(symbols)})
    vocab[_BOS] = _BOS_ID
    vocab[_EOS] = _EOS_ID
    return vocab


def write_tiny_clip(directory: Path) -> None:
    """Write the tiny model, its preprocessor config and tokenizer into ``directory``."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    config = CLIPConfig(
        text_config={
            "vocab_size": _VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": _MAX_TEXT_POSITIONS,
            "bos_token_id": _BOS_ID,
            "eos_token_id": _EOS_ID,
            "pad_token_id": _EOS_ID,
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

    (directory / "vocab.json").write_text(json.dumps(tiny_vocab()), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # positional: transformers 5 names them vocab/merges, transformers 4 vocab_file/merges_file
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"),
        str(directory / "merges.txt"),
        model_max_length=_MAX_TEXT_POSITIONS,
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
    return limner.materialize_in_hf_cache(
        TINY_KEY, TINY_REVISION, write_tiny_clip, cache_dir=cache_dir
    )
