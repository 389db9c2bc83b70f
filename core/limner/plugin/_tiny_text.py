"""Tiny text encoders for generated models, and tokenizers for them that need no files.

The encoders are transformers' CLIP and T5 v1.1 text encoders with tiny widths. Every text
tokenizes with the tokenizers. The CLIP tokenizer is byte-level BPE without merges, so every
byte is a token. Ids follow the real CLIP vocabulary's layout: the 256 byte symbols, their
end-of-word variants, then the two special tokens. The T5 tokenizer is a unigram model over
single characters (with and without the word-start marker), so every ASCII text tokenizes;
anything else becomes ``<unk>``. Ids 0-2 are T5's. transformers is imported only when an
encoder or a tokenizer is built.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = [
    "CLIP_BOS",
    "CLIP_BOS_ID",
    "CLIP_EOS",
    "CLIP_EOS_ID",
    "CLIP_MAX_LENGTH",
    "CLIP_TOKENS",
    "CLIP_VOCAB_SIZE",
    "T5_EOS_ID",
    "T5_PAD_ID",
    "T5_VOCAB_SIZE",
    "clip_vocab",
    "t5_vocab",
    "tiny_clip_text_encoder",
    "tiny_clip_tokenizer",
    "tiny_t5_encoder",
    "tiny_t5_tokenizer",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
CLIP_BOS_ID = 512
CLIP_EOS_ID = 513  # also CLIP's padding and unknown token
CLIP_VOCAB_SIZE = 514
CLIP_MAX_LENGTH = 77
#: A text config's token fields for :func:`tiny_clip_tokenizer`'s vocabulary, e.g.
#: ``SiglipTextConfig(**CLIP_TOKENS, hidden_size=32, ...)``.
CLIP_TOKENS: Mapping[str, int] = MappingProxyType(
    {
        "vocab_size": CLIP_VOCAB_SIZE,
        "bos_token_id": CLIP_BOS_ID,
        "eos_token_id": CLIP_EOS_ID,
        "pad_token_id": CLIP_EOS_ID,
    }
)

_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
T5_PAD_ID = 0
T5_EOS_ID = 1
T5_VOCAB_SIZE = 256


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


def clip_vocab() -> dict[str, int]:
    """The byte-level CLIP vocabulary: ``CLIP_VOCAB_SIZE`` tokens."""
    symbols = _byte_symbols()
    vocab = {symbol: index for index, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": 256 + index for index, symbol in enumerate(symbols)})
    vocab[CLIP_BOS] = CLIP_BOS_ID
    vocab[CLIP_EOS] = CLIP_EOS_ID
    return vocab


def t5_vocab() -> list[tuple[str, float]]:
    """(piece, log-probability) pairs; the marker-prefixed pieces score higher, so a word's
    first character takes the word-start piece as real SentencePiece vocabularies do."""
    pieces: list[tuple[str, float]] = [(token, 0.0) for token in _T5_SPECIALS]
    pieces.append(("▁", -3.0))
    for code in range(ord("!"), ord("~") + 1):
        pieces.append(("▁" + chr(code), -4.0))
        pieces.append((chr(code), -5.0))
    return pieces


def tiny_clip_tokenizer() -> Any:
    """A transformers ``CLIPTokenizer`` over :func:`clip_vocab`."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        vocab=clip_vocab(),
        merges=[],
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        unk_token=CLIP_EOS,
        model_max_length=CLIP_MAX_LENGTH,
    )


def tiny_t5_tokenizer() -> Any:
    """A transformers ``T5Tokenizer`` (in transformers 5 the tokenizers-backed class the
    diffusers pipelines load) over :func:`t5_vocab`."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=512)


def tiny_clip_text_encoder(width: int, *, projection: bool = False, layers: int = 2) -> Any:
    """A CLIP text encoder ``width`` wide over :func:`tiny_clip_tokenizer`'s vocabulary:
    ``CLIPTextModelWithProjection`` when the pipeline reads the projected pooled vector
    (SD3), else ``CLIPTextModel``. Random weights: seed torch first."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return model_class(
        CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=width,
            bos_token_id=CLIP_BOS_ID,
            eos_token_id=CLIP_EOS_ID,
            pad_token_id=CLIP_EOS_ID,
        )
    )


def tiny_t5_encoder(width: int) -> Any:
    """A T5 v1.1 encoder ``width`` wide (gated GELU, like the real t5-v1_1-xxl) over
    :func:`tiny_t5_tokenizer`'s vocabulary. Random weights: seed torch first."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=T5_VOCAB_SIZE,
            d_model=width,
            d_ff=2 * width,
            d_kv=16,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            feed_forward_proj="gated-gelu",
            pad_token_id=T5_PAD_ID,
            eos_token_id=T5_EOS_ID,
        )
    )
